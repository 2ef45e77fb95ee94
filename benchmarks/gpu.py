"""The GPU check: every probe on tiny models of every family on a device against the CPU, quantized loads, a
GPU+CPU split against all on the GPU, the speed ratios the GPU work is judged by, and training's steps per second,
in one command.

    python benchmarks/gpu.py --training-out DIR   # on the first CUDA GPU (an H200 session: about 5 minutes before
                                                  # the training section; DIR keeps the training window's checkpoint)
    python benchmarks/gpu.py --device cpu --models tiny-gpt2 --speed-model tiny-llama --reps 1 --no-training   # dry run

- probes: each probe on its task (6 items) with the model loaded on --device and on the CPU, both float32: the rank
  columns equal, every other number within 1e-4 (ranks are what the lens reports; float32 sums in another order
  differ in the last bits);
- quantized (CUDA): 8-bit and 4-bit loads of --speed-model, their weight bytes and the lens's accuracy beside the
  unquantized one's;
- split (CUDA): --speed-model over GPU 0 (--split-gib of it) and the CPU, against all on GPU 0: lens ranks equal;
- speed: medians over --reps after a warm-up, each against a bare forward with hidden states on the same prompts
  and batch (CUDA-synchronised): the lens at 8 and 64 prompts, ffn-readout, ffn-ablation (7 variants), the lens
  over all positions;
- training (--no-training to skip it, --only-training for it alone; where `probe train` trains: the first GPU when
  there is one, whatever --device says): steady steps per second (from a tenth of the steps on to the last but one,
  the GPU synchronised at those two points only) of tree-paper's model at its batch of 64 as `probe train` runs it,
  eagerly, with `train.compile: default` and with `train.compile: reduce-overhead`, against a bare torch loop
  compiled in the default mode (the floor); of the N-back model (nback-paper) eagerly; each its config cut to
  --training-steps steps of one epoch (tests of --training-test sequences, evaluated and saved at the last step
  only). Host synchronisations per step between logging steps of `probe train` and the bare loop (eager
  tree-paper; on a GPU, device-to-host copies count too). A window of tree-paper (`probe train --minutes
  --training-minutes`) into --training-out, so that its checkpoint can be brought back and continued with
  `--resume`, as the JSON's "resume" line says. --training-set FIELD=VALUE changes every training config
  (train.bf16=true); --quick makes every part small (a dry run: seconds each on a CPU, where torch.compile takes
  longest; TORCH_COMPILE_DISABLE=1 leaves it out).
Writes benchmarks/gpu.json and prints a table; exit status 1 when a probe's results differ from the CPU's.

    python benchmarks/gpu.py --device cuda --only-training --training-out $OUT/training   # the training section
    python benchmarks/gpu.py --device cpu --only-training --quick                        # its dry run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from probes.methods.catalog import PROBES
from probes.methods.ffn_ablation import run_ablation
from probes.methods.ffn_readout import run_readout
from probes.methods.lens import run_lens
from probes.models.loading import load_model
from probes.models.registry import resolve_model
from probes.runs.execution import run_probe
from probes.tasks.files import load_task
from gpu_training import print_training, training

FLAG = {"ambiguous": "flag"}
# probe -> (task, task options, probe options): the kinds that need no trained model
TASKS = {"nback": ("nback", {}, {}), "attention": ("nback-sequence", {"sequences": 1}, {}),
         "induction": ("repeat", {"sequences": 4}, {}), "icl-score": ("text-stdlib", {}, {"early": 5, "late": 60}),
         "linear-probe": ("past-tense", FLAG, {}), "tree-scrub": ("tree-trained-first", {"trees": 200, **FLAG}, {}),
         "ffn-transplant": ("capitals", FLAG, {"source_items": "Abkhazia,France", "source_layer": 0})}
TINY = ["tiny-gpt2", "tiny-gptj", "tiny-bloom", "tiny-gpt-neox", "tiny-opt", "tiny-llama", "tiny-gemma2",
        "tiny-gemma3", "tiny-falcon"]


def compare(a: pd.DataFrame, b: pd.DataFrame) -> tuple[bool, float]:
    """(rank columns equal and the rest within 1e-4, the largest numeric difference)."""
    if a.shape != b.shape or list(a.columns) != list(b.columns):
        return False, float("inf")
    worst, ok = 0.0, True
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y):
            d = float((x.astype(float) - y.astype(float)).abs().max()) if len(x) else 0.0
            d = 0.0 if pd.isna(d) else d
            worst = max(worst, d)
            ok &= (d == 0) if "rank" in col else d <= 1e-4
        else:
            # token texts may differ at a near tie in the last bits; the ranks above say whether they matter
            ok &= x.equals(y) or col in ("top1", "topk", "predicted")
    return bool(ok), worst


def check_probes(models: list[str], device: str, probes: list[str], out: Path) -> list[dict]:
    rows = []
    for name in models:
        spec = resolve_model(name)
        pair = {}
        for where in (device, "cpu"):
            pair[where] = (load_model(spec, dtype="float32", device_map=where),
                           load_model(spec, dtype="float32", device_map=where, attn_implementation="eager"))
        for probe in probes:
            task_name, task_opts, opts = TASKS.get(probe, ("capitals", FLAG, {}))
            task = load_task(task_name, task_opts)
            tables = {}
            try:
                for where, (lm, eager) in pair.items():
                    model = eager if PROBES[probe].load else lm
                    tables[where], _ = run_probe(model, task, probe, out / name / probe / where.replace(":", ""),
                                                 limit=6, options=opts, overwrite=True, progress=False)
                ok, worst = compare(tables[device], tables["cpu"])
                rows.append({"model": name, "probe": probe, "ok": ok, "max_diff": worst})
            except Exception as e:  # a probe that fails on the device is a finding, not the end of the check
                rows.append({"model": name, "probe": probe, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{name:16s} {probe:20s} {'ok' if rows[-1]['ok'] else 'DIFFERS'} {rows[-1].get('max_diff', '')}"
                  f"{rows[-1].get('error', '')}", flush=True)
    return rows


def timed(fn, reps: int, cuda: bool) -> float:
    fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(name: str, device: str, dtype: str, reps: int) -> dict:
    lm = load_model(resolve_model(name), dtype=dtype, device_map=device)
    cuda = device.startswith("cuda")
    task = load_task("capitals", FLAG)
    out = {}
    for batch in (8, 64):
        items = task.scored_items(lm.tokenizer, batch)[0]
        enc = lm.tokenizer([it.prompt for it in items], return_tensors="pt", padding=True).to(lm.arch.hf.device)
        with torch.no_grad():
            bare = timed(lambda: lm.arch.hf(**enc, output_hidden_states=True), reps, cuda)
        runs = {"logit-lens": lambda: run_lens(lm, items)}
        if batch == 8:
            runs.update({"ffn-readout": lambda: run_readout(lm, items), "ffn-ablation (7 variants)":
                         lambda: run_ablation(lm, items), "lens over all positions":
                         lambda: run_lens(lm, items, positions="all")})
        for key, fn in runs.items():
            out[f"{key} / bare, {batch} prompts"] = timed(fn, reps, cuda) / bare
    return out


def quantized(name: str, device: str, work: Path) -> dict:
    task = load_task("capitals", FLAG)
    out = {}
    for q in (None, "8bit", "4bit"):
        lm = load_model(resolve_model(name), quantize=q, device_map=device, dtype="bfloat16")
        table, summary = run_probe(lm, task, "logit-lens", work / f"quantized-{q}", limit=32, overwrite=True,
                                   progress=False)
        out[q or "bfloat16"] = {"weight_bytes": int(lm.arch.hf.get_memory_footprint()),
                                "accuracy": summary["accuracy"]}
    return out


def split(name: str, gib: float, work: Path) -> dict:
    task = load_task("capitals", FLAG)
    tables = {}
    for key, kw in (("gpu", {"device_map": "cuda:0"}), ("split", {"device_map": "auto",
                                                                  "max_memory": f"0={gib}GiB,cpu=200GiB"})):
        lm = load_model(resolve_model(name), dtype="bfloat16", **kw)
        tables[key], _ = run_probe(lm, task, "logit-lens", work / f"split-{key}", limit=32, overwrite=True,
                                   progress=False)
        tables[key + "_devices"] = lm.placement["devices"]
    same = tables["gpu"]["answer_rank"].equals(tables["split"]["answer_rank"])
    return {"devices": tables["split_devices"], "answer_ranks_equal": bool(same)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--models", nargs="+", default=TINY)
    p.add_argument("--probes", default=",".join(PROBES), help="comma-separated (default: every probe)")
    p.add_argument("--speed-model", default="configs/llama-3.2-1b.json", help="the model the speed and quantized "
                   "loads are measured on (default: a random Llama-3.2-1B)")
    p.add_argument("--split-gib", type=float, default=1.0, help="GiB of GPU 0 the split run may use")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "gpu.json"))
    p.add_argument("--no-training", action="store_true", help="skip the training section")
    p.add_argument("--only-training", action="store_true", help="only the training section")
    p.add_argument("--training-steps", type=int, default=500, help="steps of each timed training run (default 500)")
    p.add_argument("--training-test", type=int, default=1000, help="test sequences of each (default 1000)")
    p.add_argument("--training-minutes", type=float, default=0.5, help="the tree-paper window (default 0.5)")
    p.add_argument("--training-out", help="where the window's run folder (tree-paper-window/) is kept, to bring back "
                   "and continue (default: a temporary folder, removed)")
    p.add_argument("--training-set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a field of every training config (train.bf16=true; repeatable)")
    p.add_argument("--quick", action="store_true", help="the training section at small sizes (a dry run)")
    a = p.parse_args()
    if a.training_steps < 12 or not a.training_minutes > 0:
        p.error("--training-steps: at least 12; --training-minutes: more than 0")
    cuda = a.device.startswith("cuda")
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="probe-gpu-"))  # run folders, removed at the end
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "probes": []}
    if not a.only_training:
        result["probes"] = check_probes(a.models, a.device, a.probes.split(","), work)
        result["speed"] = speed(a.speed_model, a.device, "bfloat16" if cuda else "float32", a.reps)
        if cuda:
            result["quantized"] = quantized(a.speed_model, a.device, work)
            result["split"] = split(a.speed_model, a.split_gib, work)
    if not a.no_training:
        result["training"] = training(a, work)
    shutil.rmtree(work, ignore_errors=True)
    Path(a.out).write_text(json.dumps(result, indent=2, default=str))
    print("\n" + "\n".join(f"{k:42s} {v:6.2f}x" for k, v in result.get("speed", {}).items()))
    for k in ("quantized", "split"):
        if k in result:
            print(f"{k}: {result[k]}")
    if "training" in result:
        print_training(result["training"])
    bad = [r for r in result["probes"] if not r["ok"]]
    if not a.only_training:
        print(f"\nprobes: {len(result['probes']) - len(bad)} of {len(result['probes'])} equal the CPU's")
    print(f"written {a.out}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
