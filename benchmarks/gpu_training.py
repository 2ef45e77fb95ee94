"""The GPU check's training section (gpu.py; its docstring says what it measures): `probe train`'s steady steps per
second on tree-paper's model (eager, train.compile default and reduce-overhead) against a bare compiled loop, the
N-back model's, host synchronisations per step, and a window of tree-paper's training kept under --training-out."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from probes.tasks.files import parse_overrides
from probes.training.config import load_training_config
from probes.training.trainer import train
from training_bench import bare_loop, host_syncs
from training_hooks import Clock, StepHooks

TRAINING = Path(__file__).resolve().parent.parent / "configs" / "training"
TREE = TRAINING / "tree-paper.yaml"
# --quick: small models and batches, so that every part takes seconds on a CPU
QUICK = {"tree": {"model.n_layer": 1, "model.n_embd": 32, "model.n_inner": 64, "train.batch_size": 8},
         "nback": {"model.n_embd": 32, "train.batch_size": 8}}
TREE_VARIANTS = {"eager": {}, "compile default": {"train.compile": "default"},
                 "compile reduce-overhead": {"train.compile": "reduce-overhead"}}


def short(config: Path, steps: int, test: int, extra: dict) -> dict:
    """`config` (with `extra`) cut to `steps` steps of one epoch and `test` test sequences, logging, evaluating and
    saving at the last step only."""
    batch = load_training_config(config, extra)["train"]["batch_size"]
    return load_training_config(config, {**extra, "train.steps": steps, "train.eval_steps": steps,
                                         "train.save_steps": steps, "task.train": steps * batch, "task.test": test})


def steady(cfg: dict, work: Path, compile: str | None = None, bare: bool = False) -> dict:
    """Steady steps per second of `probe train` of `cfg` (or of the bare loop, compiled in `compile`'s mode) and
    the whole run's seconds; a run that fails is a finding, not the end of the check."""
    steps, cuda = cfg["train"]["steps"], torch.cuda.is_available()
    clock = Clock(max(2, steps // 10), steps - 1, cuda)
    torch._dynamo.reset()  # each compiled model from scratch (and within dynamo's limit on recompilations)
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            if bare:
                bare_loop(cfg, steps, [clock], compile=compile)
            else:
                train(cfg, work / f"{cfg['name']}-{cfg['train'].get('compile', 'eager')}", progress=False,
                      callbacks=[StepHooks(clock)])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"steps_per_second": clock.steps_per_second, "seconds": time.perf_counter() - start}


def training(a, work: Path) -> dict:
    sets = parse_overrides(a.training_set)
    extra = {k: {**(QUICK[k] if a.quick else {}), **sets} for k in QUICK}
    steps, test = (12, 32) if a.quick else (a.training_steps, a.training_test)
    tree = short(TREE, steps, test, extra["tree"])
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "compile_disabled": bool(torch._dynamo.config.disable), "set": extra, "steps": steps,
           "timed_steps": f"{max(2, steps // 10) + 1} to {steps - 1}", "tree": {"config": "tree-paper",
           "batch": tree["train"]["batch_size"]}}
    for name, change in TREE_VARIANTS.items():
        out["tree"][name] = steady(short(TREE, steps, test, {**extra["tree"], **change}), work)
        print(f"training tree-paper, {name}: {out['tree'][name]}", flush=True)
    out["tree"]["bare compiled loop"] = floor = steady(tree, work, compile="default", bare=True)
    for name in TREE_VARIANTS:
        if floor.get("steps_per_second") and out["tree"][name].get("steps_per_second"):
            out["tree"][name]["x_floor"] = floor["steps_per_second"] / out["tree"][name]["steps_per_second"]
    nback = short(TRAINING / "nback-paper.yaml", steps, test, extra["nback"])
    out["nback"] = {"config": "nback-paper", "batch": nback["train"]["batch_size"], "eager": steady(nback, work)}
    sync_steps = 8 if a.quick else 20
    try:
        out["syncs"] = host_syncs(str(TREE), sync_steps, {
            **extra["tree"], "task.train": sync_steps * tree["train"]["batch_size"], "task.test": test})
    except Exception as e:
        out["syncs"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    out["window"] = window(a, extra["tree"], work)
    return out


def window(a, extra: dict, work: Path) -> dict:
    """A window of tree-paper's training (`probe train --minutes`) into --training-out (resumed where it holds one):
    where it paused, and the command that continues it."""
    changes = {**extra, **({"task.train": 8 * 100, "task.test": 32, "train.steps": 100, "train.eval_steps": 4,
                            "train.save_steps": 100} if a.quick else {})}
    minutes = 0.005 if a.quick else a.training_minutes
    run = Path(a.training_out or work / "training") / f"tree-paper-window{'-quick' if a.quick else ''}"
    try:
        with torch.enable_grad():
            train(load_training_config(TREE, changes), run, resume=True, progress=False, minutes=minutes)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    meta = json.loads((run / "meta.json").read_text())
    sets = "".join(f" --set {k}={v}" for k, v in changes.items())
    return {"minutes": minutes, "folder": str(run), "status": meta["status"],
            **{k: meta.get(k) for k in ("steps", "total_steps", "steps_per_second", "eta_seconds")},
            "checkpoints": sorted(p.name for p in run.glob("checkpoint-*")),
            "resume": f"probe train configs/training/tree-paper.yaml --output {run} --resume{sets} --minutes M"}


def print_training(t: dict) -> None:
    def rate(r):
        return r.get("error") or f"{r['steps_per_second']:8.1f} steps/s ({r['seconds']:.1f} s in all)" + (
            f", {r['x_floor']:.2f}x the floor" if "x_floor" in r else "")
    print(f"\ntraining on {t['device']}, steps {t['timed_steps']} of {t['steps']} timed"
          f"{' (torch.compile disabled)' if t['compile_disabled'] else ''}:")
    for name in [*TREE_VARIANTS, "bare compiled loop"]:
        print(f"  tree-paper, batch {t['tree']['batch']}, {name:24s} {rate(t['tree'][name])}")
    print(f"  nback-paper, batch {t['nback']['batch']}, eager {'':12s} {rate(t['nback']['eager'])}")
    s, w = t["syncs"], t["window"]
    print("  host syncs per step between logging steps: " + (s["error"] if "error" in s else
          f"probe train {s['syncs_per_step']}, bare loop {s['bare_syncs_per_step']} (over {s['quiet_steps']} steps)"))
    if "error" in w:
        print(f"  window: {w['error']}")
    else:
        print(f"  window of {w['minutes']:g} min: {w['status']} at step {w['steps']} of {w['total_steps']}, "
              f"checkpoints {', '.join(w['checkpoints'])}; continue with: {w['resume']}")
