"""What each probe costs against a bare forward pass, measured in one run (medians over repetitions).

    python benchmarks/bench.py [--models smollm2-135m gemma3-270m] [--batch 8] [--reps 3]

Baseline: a bare transformers forward pass with output_hidden_states on the same prompts and batch. Ratios are
probe time / baseline time. The transplant sweep puts a vector after every block of the model, one variant per
block, for one prompt; its cost is given in bare single-prompt forward passes, against the target of L/4.
Writes benchmarks/results.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from probes.ffn import Variant, add_sweep, control_vectors, last_position_updates, run_ablation, run_readout
from probes.lens import run_lens
from probes.loading import load_model
from probes.registry import resolve_model
from probes.tasks import load_task


def median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(name: str, batch: int, reps: int) -> dict:
    lm = load_model(resolve_model(name))
    hf, tok = lm.model._module, lm.tokenizer
    items = load_task("capitals").items(limit=batch)
    prompts = [it.prompt for it in items]
    enc = tok(prompts, return_tensors="pt", padding=True)
    one = tok(prompts[:1], return_tensors="pt")

    def bare():
        with torch.no_grad():
            hf(**enc, output_hidden_states=True)

    def bare_one():
        with torch.no_grad():
            hf(**one, output_hidden_states=True)

    L = lm.arch.n_layers
    o = last_position_updates(lm, prompts[:1])["ffn"][0, L // 2]
    vectors = control_vectors(o.float().cpu())
    sweep = [Variant("none")] + [Variant("o", (i,)) for i in range(L)]
    t = {"bare forward (batch)": median_time(bare, reps), "bare forward (1 prompt)": median_time(bare_one, reps)}
    t["logit-lens"] = median_time(lambda: run_lens(lm, items), reps)
    t["ffn-readout"] = median_time(lambda: run_readout(lm, items), reps)
    t["ffn-ablation (7 variants)"] = median_time(lambda: run_ablation(lm, items), reps)
    t["transplant sweep, all blocks (1 prompt)"] = median_time(lambda: add_sweep(lm, prompts[0], sweep, vectors), reps)
    base, base1 = t["bare forward (batch)"], t["bare forward (1 prompt)"]
    return {"model": name, "layers": L, "batch": batch, "seconds": t,
            "ratio_to_bare": {k: v / base for k, v in t.items() if "1 prompt" not in k},
            "sweep_in_bare_forwards": t["transplant sweep, all blocks (1 prompt)"] / base1,
            "sweep_target": L / 4}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    results = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
               "models": [bench_model(m, args.batch, args.reps) for m in args.models]}
    for r in results["models"]:
        print(f"\n{r['model']} ({r['layers']} blocks, batch {r['batch']})")
        for k, v in r["seconds"].items():
            ratio = r["ratio_to_bare"].get(k)
            print(f"  {k:42s} {v:8.3f} s" + (f"   {ratio:5.2f}x bare" if ratio is not None else ""))
        print(f"  transplant sweep over all {r['layers']} blocks = {r['sweep_in_bare_forwards']:.2f} bare forwards "
              f"of that prompt (target <= L/4 = {r['sweep_target']:.1f})")
    out = Path(__file__).parent / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
