"""Activation patching (the full residual sweep as the probe runs it, against one trace per patch) and attribution
patching (AtP and its corrections against the exact batched sweep): bench.py's --patching and --attribution."""

from __future__ import annotations

import dataclasses
import time

import pandas as pd
import torch

from probes.models.loading import load_model
from probes.models.registry import resolve_model
from probes.tasks.files import load_task
from timing import PROC, PeakRSS, PeakTensorBytes, measure


def bench_patching(name: str, task: str, pairs: int, sample: int) -> dict:
    """The full residual patching sweep (every block x position) of the task's first `pairs` clean/corrupted pairs,
    as the activation-patching probe runs it (`patch_logits`; and with every patch run, none taken as unchanged
    before the pair's first differing token), against one nnsight trace per patch (the clean run traced once and
    saved, then the corrupted run once per patch; timed on `sample` patches per pair and scaled to all); same
    numbers (the answers' logits and the clean answer's rank, which is what the probe keeps of each chunk). Peak
    memory: resident above what the loaded model held, and the activations' tensor bytes."""
    import nnsight

    from probes.methods.patch_engine import PATCH_ROWS, answer_columns, patch_list, patch_logits
    from probes.methods.patching import prepare_patching
    from probes.tasks.base import answer_token

    lm = load_model(resolve_model(name))
    arch, tok = lm.arch, lm.tokenizer
    t = load_task(task)
    items = prepare_patching(lm, t, t.items(), {})[0][:pairs]
    sweeps = []
    for it in items:
        n = len(tok(it.prompt).input_ids)
        answers = answer_token(tok, it), answer_token(tok, dataclasses.replace(it, answer=it.extra["corrupted_answer"]))
        sweeps.append((it.prompt, it.extra["corrupted"], patch_list(["resid"], list(range(arch.n_layers)), list(range(n))),
                       lambda logits, a=answers: answer_columns(logits, *a)))  # the probe's: one chunk's logits held

    def one(corrupted: str, block: int, pos: int, saved: list) -> torch.Tensor:
        with lm.trace(corrupted, logits_to_keep=1):
            x = arch.block_input(block)
            x[0, pos] = saved[block][0, pos]
            logits = nnsight.save(lm.model.output.logits[0, -1])
        return logits

    def clean_run(clean: str) -> list:
        with lm.trace(clean):
            saved = nnsight.save([arch.block_input(i) for i in range(arch.n_layers)])
        return saved

    clean, corrupted, patches, _ = sweeps[0]
    patch_logits(lm, clean, corrupted, patches[-1:], skip_unchanged=False)  # warm-up: nnsight reads each trace's
    one(corrupted, 0, 0, clean_run(clean))                                  # source once
    out = {"model": name, "task": task, "pairs": len(sweeps), "patches": sum(len(s[2]) for s in sweeps),
           "blocks": arch.n_layers, "positions": sorted({len(s[2]) // arch.n_layers for s in sweeps}),
           "chunk": PATCH_ROWS}
    batched = []
    for key, skip in (("batched", True), ("batched_every_patch", False)):
        before = PROC.memory_info().rss
        with PeakRSS() as rss, PeakTensorBytes() as tensors:
            start = time.perf_counter()
            got = [patch_logits(lm, c, d, p, skip_unchanged=skip, reduce=r)[2:] for c, d, p, r in sweeps]
            out[f"{key}_seconds"] = time.perf_counter() - start
        out[f"{key}_peak_rss"], out[f"{key}_peak_tensors"] = rss.peak - before, tensors.peak
        batched.append(got)
    loop_s, diff = 0.0, 0.0
    for (clean, corrupted, patches, reduce), *rows in zip(sweeps, *batched):
        start = time.perf_counter()
        saved = clean_run(clean)
        clean_s = time.perf_counter() - start
        loop = [reduce(one(corrupted, block, pos, saved)[None].float())[0] for _, block, pos in patches[:sample]]
        loop_s += clean_s + (time.perf_counter() - start - clean_s) / len(loop) * len(patches)
        diff = max([diff] + [float((r[j] - loop[j]).abs().max()) for r in rows for j in range(len(loop))])
    return {**out, "loop_seconds": loop_s, "speedup": loop_s / out["batched_seconds"],
            "speedup_every_patch": loop_s / out["batched_every_patch_seconds"], "max_diff": diff}


ESTIMATORS = {"AtP": {}, "AtP + QK fix": {"qk_fix": True}, "AtP + GradDrop": {"graddrop": True},
              "AtP*": {"qk_fix": True, "graddrop": True}}


def bench_attribution(name: str, task: str, pairs: int, reps: int) -> dict:
    """The full residual sweep (every block x position) of the task's first `pairs` clean/corrupted pairs by
    attribution (plain AtP, with AtP*'s QK fix, with GradDrop, and with both; nothing re-run) against the exact
    batched sweep (activation-patching's engine) on the same pairs, in one run; with how well each estimate ranks
    the patches: Spearman per pair (mean, bootstrap interval; GradDrop's unsigned scores against |exact|) and the
    share of each pair's exact top 10 in the estimate's top 20."""
    from probes.methods.attribution import run_attribution, summarize_attribution
    from probes.methods.patching import prepare_patching, run_patching

    lm = load_model(resolve_model(name))
    t = load_task(task)
    items = prepare_patching(lm, t, t.items(), {})[0][:pairs]
    options = {"sites": "resid", "positions": "all"}
    exact_s, _ = measure(lambda: run_patching(lm, items, **options), reps)
    key = ["item", "site", "block", "position"]
    ex = pd.DataFrame(run_patching(lm, items, **options))
    out = {"model": name, "task": task, "pairs": len(items), "exact_seconds": exact_s, "estimators": []}
    for label, fixes in ESTIMATORS.items():
        est_s, _ = measure(lambda: run_attribution(lm, items, verify=0, **options, **fixes), reps)  # noqa: B023
        est = pd.DataFrame(run_attribution(lm, items, verify=0, **options, **fixes))
        both = est.drop(columns=["verified", "effect_exact", "recovery_exact"]).merge(
            ex[key + ["ld_patched", "ld_dest", "recovery"]].rename(columns={"ld_dest": "ld_dest_exact",
                                                                            "recovery": "recovery_exact"}), on=key)
        both["verified"], both["effect_exact"] = True, both.ld_patched - both.ld_dest_exact
        check = summarize_attribution(both)["verification"]
        out["patches"] = len(both)
        out["estimators"].append({"estimator": label, "estimate_seconds": est_s, "speedup": exact_s / est_s,
                                  **{k: check.get(k) for k in ("spearman", "spearman_lo", "spearman_hi", "spearman_n",
                                                               "spearman_abs", "spearman_abs_lo", "spearman_abs_hi",
                                                               "top_found", "top_found_lo", "top_found_hi")}})
    return out


def print_patching(r: dict) -> None:
    print(f"patching {r['model']} ({r['task']}): {r['pairs']} pair(s), {r['patches']} patches ({r['blocks']} blocks "
          f"x {r['positions']} positions): batched {r['batched_seconds']:.1f} s, every patch run "
          f"{r['batched_every_patch_seconds']:.1f} s, one trace per patch {r['loop_seconds']:.1f} s = "
          f"{r['speedup']:.2f}x and {r['speedup_every_patch']:.2f}x faster; max difference {r['max_diff']:.1e}; "
          f"peak above the model: resident {r['batched_peak_rss'] / 2**20:.0f} MB (every patch run "
          f"{r['batched_every_patch_peak_rss'] / 2**20:.0f} MB), activations "
          f"{r['batched_every_patch_peak_tensors'] / 2**20:.0f} MB")


def print_attribution(r: dict) -> None:
    def f(v, spec=".3f"):  # None where a figure is undefined (GradDrop's unsigned scores, a pair with no spread)
        return "n/a" if v is None else format(v, spec)

    print(f"attribution {r['model']} ({r['task']}): {r['pairs']} pairs, {r['patches']} patches, exact "
          f"{r['exact_seconds']:.2f} s")
    for e in r["estimators"]:
        print(f"  {e['estimator']}: {e['estimate_seconds']:.2f} s = {e['speedup']:.1f}x faster; Spearman per pair "
              f"{f(e['spearman'])} [{f(e['spearman_lo'])}, {f(e['spearman_hi'])}] (n={e['spearman_n']}), of "
              f"magnitudes {f(e['spearman_abs'])} [{f(e['spearman_abs_lo'])}, {f(e['spearman_abs_hi'])}]; exact "
              f"top 10 in the estimate's top 20: {f(e['top_found'], '.2f')} [{f(e['top_found_lo'], '.2f')}, "
              f"{f(e['top_found_hi'], '.2f')}]")
