"""What each probe costs against a bare forward pass, and how the cost scales, measured in one run: the command line.

    python benchmarks/bench.py [--models smollm2-135m gemma3-270m] [--batch 8] [--reps 3] [--no-cold] [--no-scale]

Per bundled model (medians over --reps after a warm-up):
- baseline: a bare transformers forward pass with output_hidden_states on the same prompts and batch;
- each probe on those prompts: logit-lens, ffn-readout, ffn-ablation, a transplant sweep over all blocks (one
  prompt, in bare single-prompt forwards against the target L/4) and attention (eager; whole N-back sequences,
  against a bare eager forward with output_attentions on the same sequences);
- where the lens's time goes: the traced forward with every residual saved, and the decoding of those residuals;
- peak memory (resident set, sampled every 2 ms) above what the process held before loading, against the weights
  plus the activations the probe keeps;
- load time: cold (GGUF dequantized into an empty cache) and cached;
- the self-check every run makes before its first batch, and its share of a whole lens run over capitals.
Scale curves on tiny random Llamas: time and peak memory against batch size, prompt length and layer count.
Training throughput (--training; --only-training for it alone): `probe train` (transformers' Trainer: the run
folder, one evaluation, a checkpoint, the final weights, log and plot) against a bare torch loop over the same
model, data, batch, optimizer and steps, with the same evaluation and a save of the final weights; sequences per
second of each, per training config, the data path's share of a `probe train` step, and the host synchronisations
per step between logging steps of each (counted over --sync-steps steps, untimed).
Activation patching (--patching; --only-patching for it alone, --patching-task for the pair): the full residual
sweep of one pair as the probe runs it, against one trace per patch.
Attribution patching (--attribution; --only-attribution, --attribution-task, --attribution-pairs): the full residual
sweep of a task's pairs estimated by AtP, AtP + QK fix, AtP + GradDrop and AtP*, against the exact batched sweep, with
each estimate's rank correlation.
The lens over every position (--lens-positions; --only-lens-positions for it alone): time and peak memory of the
logit lens at all positions and at the last, against a bare forward that computes the logits of every position.
Writes benchmarks/results.json (benchmarks/scale.json with --only-scale, training.json with --only-training,
lens-positions.json with --only-lens-positions, patching.json with --only-patching, attribution.json with
--only-attribution).
What each measures is in its module: probes_bench.py (models, probes, lens positions, scale curves),
training_bench.py (training, value residual), patching_bench.py (patching, attribution); timing.py holds the shared
timing and memory helpers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import psutil
import torch

from probes.tasks.files import parse_overrides
from patching_bench import bench_attribution, bench_patching, print_attribution, print_patching
from probes_bench import bench_lens_positions, bench_model, print_curves, print_lens_positions, print_model, scale_curves
from training_bench import bench_training, bench_value_residual, print_training, print_value_residual


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-cold", action="store_true", help="skip the cold GGUF loads (about 2 minutes)")
    p.add_argument("--no-scale", action="store_true", help="skip the scale curves")
    p.add_argument("--only-scale", action="store_true", help="only the scale curves")
    p.add_argument("--training", nargs="*", metavar="CONFIG", help="also training throughput, for these configs "
                   "(default: configs/training/nback-paper.yaml and nback-standard.yaml)")
    p.add_argument("--only-training", action="store_true", help="only training throughput")
    p.add_argument("--steps", type=int, default=250, help="training steps per timed run (default 250: the paper's)")
    p.add_argument("--training-set", action="append", metavar="SECTION.FIELD=VALUE", help="override a field of "
                   "every training config, as probe train's --set (e.g. task.train=4000; repeatable)")
    p.add_argument("--sync-steps", type=int, default=20, help="training steps over which host synchronisations are "
                   "counted, untimed (default 20)")
    p.add_argument("--patching", action="store_true", help="also the residual patching sweep against one trace per "
                   "patch (on the first of --models)")
    p.add_argument("--only-patching", action="store_true", help="only the patching sweep")
    p.add_argument("--patching-task", default="capitals", help="the task whose pairs the patching sweep patches "
                   "(default capitals; tree-trained-first for a trained tree model)")
    p.add_argument("--patching-pairs", type=int, default=1, help="how many of its pairs (default 1)")
    p.add_argument("--attribution", action="store_true", help="also the full residual sweep by attribution against "
                   "the exact batched sweep, with the estimate's rank correlation (--attribution-task, --attribution-pairs)")
    p.add_argument("--attribution-task", default="capitals", help="the task whose pairs it patches (default capitals; "
                   "ioi, or tree-trained on a trained tree model)")
    p.add_argument("--attribution-pairs", type=int, default=8, help="how many of its pairs (default 8)")
    p.add_argument("--only-attribution", action="store_true", help="only the attribution sweep")
    p.add_argument("--lens-positions", action="store_true", help="also the lens over every position (on the first "
                   "of --models)")
    p.add_argument("--only-lens-positions", action="store_true", help="only the lens over every position")
    p.add_argument("--value-residual", action="store_true", help="also the value residual's cost in training steps")
    p.add_argument("--only-value-residual", action="store_true", help="only the value residual's cost")
    args = p.parse_args()
    if args.steps < 3:
        p.error("--steps: at least 3 (the steady rate is timed from the second step to the last but one)")
    if args.only_value_residual:
        args.value_residual, args.no_scale, args.models_run = True, True, False
    elif args.only_patching:
        args.patching, args.no_scale, args.models_run = True, True, False
    elif args.only_attribution:
        args.attribution, args.no_scale, args.models_run = True, True, False
    elif args.only_lens_positions:
        args.lens_positions, args.no_scale, args.models_run = True, True, False
    else:
        args.models_run = not (args.only_scale or args.only_training)
    if args.only_training and args.training is None:
        args.training = []
    torch.set_grad_enabled(False)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
                          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "models": []}
    for m in args.models if args.models_run else []:
        results["models"].append(bench_model(m, args.batch, args.reps, cold=not args.no_cold))
        print_model(results["models"][-1])
    if not args.no_scale and not args.only_training:
        results["scale"] = scale_curves(max(args.reps, 5))
        print_curves(results["scale"])
    if args.training is not None:
        root = Path(__file__).resolve().parent.parent / "configs" / "training"
        configs = args.training or [root / "nback-paper.yaml", root / "nback-standard.yaml"]
        results["training"] = [bench_training(str(c), args.steps, args.reps, args.sync_steps,
                                              parse_overrides(args.training_set)) for c in configs]
        for r in results["training"]:
            print_training(r)
    if args.attribution:
        results["attribution"] = r = bench_attribution(args.models[0], args.attribution_task, args.attribution_pairs,
                                                       args.reps)
        print_attribution(r)
    if args.patching:
        results["patching"] = r = bench_patching(args.models[0], args.patching_task, args.patching_pairs, sample=60)
        print_patching(r)
    if args.lens_positions:
        results["lens_positions"] = r = bench_lens_positions(args.models[0], args.batch, args.reps)
        print_lens_positions(r)
    if args.value_residual:
        results["value_residual"] = bench_value_residual(args.reps)
        print_value_residual(results["value_residual"])
    name = ("scale.json" if args.only_scale else "training.json" if args.only_training else
            "value-residual.json" if args.only_value_residual else
            "lens-positions.json" if args.only_lens_positions else "patching.json" if args.only_patching else
            "attribution.json" if args.only_attribution else
            "results.json")
    out = Path(__file__).parent / name
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()