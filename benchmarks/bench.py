"""What each probe costs against a bare forward pass, and how the cost scales, measured in one run.

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
second of each, per training config, and the data path's share of a `probe train` step.
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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
import weakref
from pathlib import Path

import psutil
import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from probes.methods.attention import run_attention
from probes.methods.ffn_ablation import run_ablation
from probes.methods.ffn_readout import last_position_updates, run_readout
from probes.methods.ffn_transplant import Variant, add_sweep, control_vectors
from probes.methods.lens import run_lens
from probes.methods.readout import last_residuals, lens_tensors, stats_rows, target_ids
from probes.models.loading import load_model
from probes.models.registry import parse_entry, resolve_model
from probes.runs.selfcheck import self_check
from probes.tasks.files import load_task

PROC = psutil.Process()


class PeakRSS:
    """Peak resident set size while the block runs (a sampling thread), in bytes."""

    def __enter__(self):
        self.peak = PROC.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, PROC.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, PROC.memory_info().rss)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the operations run under it and still alive (activations, not the
    allocator's cache or the weights): each new storage counts from its creation until its tensor is freed."""

    def __enter__(self):
        self.live = self.peak = 0
        return super().__enter__()

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def activation_peak(fn) -> int:
    with PeakTensorBytes() as m:
        fn()
    return m.peak


def measure(fn, reps: int) -> tuple[float, int]:
    """(median seconds, most memory taken above what the process held just before) of fn over `reps` runs after a
    warm-up."""
    fn()
    times, extra = [], 0
    for _ in range(reps):
        before = PROC.memory_info().rss
        with PeakRSS() as m:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        extra = max(extra, m.peak - before)
    return statistics.median(times), extra


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def bench_model(name: str, batch: int, reps: int, cold: bool) -> dict:
    loads = {}
    if cold:  # an empty cache: the GGUF is dequantized and written, then read back as safetensors
        with tempfile.TemporaryDirectory() as cache:
            os.environ["PROBE_CACHE"] = cache
            first = load_model(resolve_model(name))
            loads["cold"] = first.load_seconds
            del first
            loads["cached"] = load_model(resolve_model(name)).load_seconds
            del os.environ["PROBE_CACHE"]
    start_rss = PROC.memory_info().rss
    lm = load_model(resolve_model(name))
    loaded_rss = PROC.memory_info().rss
    eager = load_model(resolve_model(name), attn_implementation="eager")
    hf, tok = lm.model._module, lm.tokenizer
    items = load_task("capitals").items(limit=batch)
    prompts = [it.prompt for it in items]
    enc = tok(prompts, return_tensors="pt", padding=True)
    one = tok(prompts[:1], return_tensors="pt")
    seqs = load_task("nback-sequence", {"sequences": 1, "n": [2]}).items(limit=1)
    seq_enc = tok([it.prompt for it in seqs], return_tensors="pt")
    L = lm.arch.n_layers
    o = last_position_updates(lm, prompts[:1])["ffn"][0, L // 2]
    vectors = control_vectors(o.float().cpu())
    sweep = [Variant("none")] + [Variant("o", (i,)) for i in range(L)]
    hidden = last_residuals(lm, prompts)
    targets = target_ids(lm, items)

    runs = {
        "bare forward": lambda: hf(**enc, output_hidden_states=True),
        "bare forward (1 prompt)": lambda: hf(**one, output_hidden_states=True),
        "bare eager forward (N-back sequence)": lambda: eager.model._module(**seq_enc, output_attentions=True,
                                                                            output_hidden_states=True),
        "logit-lens": lambda: run_lens(lm, items),
        "  lens: traced forward saving residuals": lambda: last_residuals(lm, prompts),
        "  lens: decode + ranks + top-k": lambda: stats_rows(tok, lens_tensors(lm.arch, hidden, targets, 5)),
        "ffn-readout": lambda: run_readout(lm, items),
        "ffn-ablation (7 variants)": lambda: run_ablation(lm, items),
        "transplant sweep, all blocks (1 prompt)": lambda: add_sweep(lm, prompts[0], sweep, vectors),
        "attention (N-back sequence)": lambda: run_attention(eager, seqs),
        "self-check (before a run's first batch)": lambda: self_check(lm, items),
    }
    check = "self-check (before a run's first batch)"
    lens_batches = -(-len(load_task("capitals").scored_items(tok)[0]) // batch)
    seconds, extra, act = {}, {}, {}
    for key, fn in runs.items():
        seconds[key], extra[key] = measure(fn, reps)
        act[key] = activation_peak(fn)
    weights = weight_bytes(hf)
    tokens = int(enc.attention_mask.sum())
    base, base1, base_seq = (seconds[k] for k in ("bare forward", "bare forward (1 prompt)",
                                                   "bare eager forward (N-back sequence)"))
    baseline_of = {k: base_seq if "N-back" in k else base1 if "1 prompt" in k else base for k in seconds}
    d = lm.arch.config.hidden_size
    # what a lens run must keep besides the weights: every layer's last-position residual and their logits
    kept = hidden.numel() * 4 + (L + 1) * batch * lm.arch.config.vocab_size * 4
    return {"model": name, "layers": L, "batch": batch, "tokens": tokens, "hidden": d, "loads": loads,
            "seconds": seconds,
            "ratio_to_bare": {k: seconds[k] / baseline_of[k] for k in seconds},
            "prompts_per_second": {k: (1 if "1 prompt" in k or "N-back" in k else batch) / v
                                   for k, v in seconds.items()},
            "weights_bytes": weights, "lens_kept_bytes": kept, "load_rss_bytes": loaded_rss - start_rss,
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "extra_rss_bytes": extra, "activation_peak_bytes": act,
            "sweep_in_bare_forwards": seconds["transplant sweep, all blocks (1 prompt)"] / base1,
            "sweep_target": L / 4, "lens_run_batches": lens_batches,
            # what the self-check adds to a `probe run --probe logit-lens --task capitals` (every scored item)
            "self_check_share": seconds[check] / (seconds[check] + lens_batches * seconds["logit-lens"])}


def fetch(dataset, indices: list[int]):
    """A batch as torch's DataLoader (and so the trainer) takes it: the dataset's `__getitems__` if it has one."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(indices)
    return [dataset[i] for i in indices]


def bench_training(config: str, steps: int, reps: int) -> dict:
    """Seconds and sequences per second of `probe train` and of a bare loop doing the same work; and the data
    path's share of a `probe train` step: the seconds its batches take to make (index, collate), in the loader
    the trainer builds, over the seconds of a step."""
    import torch.nn.functional as F

    from probes.training.config import load_training_config
    from probes.training.data import GENERATORS, IGNORE, tokenizer_for
    from probes.training.trainer import build_model, train

    cfg = load_training_config(config, {"train.steps": steps, "train.eval_steps": steps, "train.save_steps": steps})
    t, gen = cfg["train"], GENERATORS[cfg["task"]["generator"]]

    def ours():
        with tempfile.TemporaryDirectory() as d:
            train(cfg, Path(d) / "run", progress=False)

    def bare():
        """The same work by hand: the generator's data and batches, the loss over its readout, the optimizer, an
        evaluation of every test set (before the first step too where the trainer does), the weights saved."""
        tok = tokenizer_for(cfg["task"])
        data = gen.splits(cfg["task"], tok)
        collate = gen.collate(data)
        model = build_model(cfg, tok)
        readout = gen.readout(cfg["task"])
        ids = tok.convert_tokens_to_ids(list(readout)) if readout else None
        if t.get("optimizer") == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])
        tests = data["test"] if isinstance(data["test"], dict) else {"test": data["test"]}

        def loss_of(batch):
            target = batch.pop("target")
            logits = model(**batch).logits
            logits = logits[..., ids] if ids else logits
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE)

        def evaluate():
            model.eval()
            with torch.no_grad():
                for test in tests.values():
                    for start in range(0, len(test), gen.eval_batch):
                        loss_of(collate(fetch(test, list(range(start, min(start + gen.eval_batch, len(test)))))))
                if gen.extra_metrics is not None:
                    gen.extra_metrics(model, data["test"])  # as the trainer passes its eval_dataset
            model.train()

        order = torch.Generator().manual_seed(t["seed"])
        if gen.eval_on_start:
            evaluate()
        model.train()
        done, train_set = 0, data["train"]
        while done < steps:
            for idx in torch.randperm(len(train_set), generator=order).split(t["batch_size"]):
                loss = loss_of(collate(fetch(train_set, idx.tolist())))
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        evaluate()
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)

    def data_path():
        """`steps` batches from the trainer's own train loader (sampler, fetch, collate), nothing else."""
        from probes.training.trainer import _trainer_class

        tok = tokenizer_for(cfg["task"])
        data = gen.splits(cfg["task"], tok)
        with tempfile.TemporaryDirectory() as d:
            from transformers import TrainingArguments

            args = TrainingArguments(d, per_device_train_batch_size=t["batch_size"], report_to=[],
                                     remove_unused_columns=False, use_cpu=not torch.cuda.is_available())
            trainer = _trainer_class()(model=torch.nn.Linear(1, 1), args=args, train_dataset=data["train"],
                                       data_collator=gen.collate(data))
            loader, done = trainer.get_train_dataloader(), 0
            timer = time.perf_counter()
            while done < steps:
                for _ in loader:
                    done += 1
                    if done == steps:
                        break
            return time.perf_counter() - timer

    with torch.enable_grad():
        (ours_s, _), (bare_s, _) = measure(ours, reps), measure(bare, reps)
    data_s = sorted(data_path() for _ in range(reps))[reps // 2]
    seqs = steps * t["batch_size"]
    return {"config": cfg["name"], "steps": steps, "batch": t["batch_size"], "sequences": seqs,
            "bare_seconds": bare_s, "ours_seconds": ours_s, "bare_seq_per_s": seqs / bare_s,
            "ours_seq_per_s": seqs / ours_s, "ratio": ours_s / bare_s, "data_seconds": data_s,
            "data_share": data_s / ours_s}


def bench_value_residual(reps: int) -> list[dict]:
    """Training-step time (forward, backward, SGD) of a model with the value residual against the same model
    without it (same weights, same batches, timed alternately in one run): the 2-layer in-context classifier
    (icl-cpu, batch 128) and the 8M GPT-2 language model (8 layers, width 256, 16 heads, 4 x 256 tokens)."""
    import math

    import torch.nn.functional as F

    from probes.models.custom import (ProbeTransformerConfig, ProbeTransformerForCausalLM, ValueResidualGPT2Config,
                                      ValueResidualGPT2LMHeadModel)

    def icl(mode):
        return ProbeTransformerForCausalLM(ProbeTransformerConfig(
            vocab_size=34, n_positions=17, n_layer=2, n_head=1, n_embd=64, residual=True, positions=False,
            attn_bias=False, attn_out=False, attn_scale=False, value_residual=mode, head_layers=3,
            init_attn_std=1 / math.sqrt(39)))

    def lm(mode):
        return ValueResidualGPT2LMHeadModel(ValueResidualGPT2Config(
            value_residual=mode, n_layer=8, n_embd=256, n_head=16, n_positions=256, vocab_size=4096,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True))

    g = torch.Generator().manual_seed(0)
    cases = {"icl-cpu (2 layers, width 64, batch 128 x 17)":
             (icl, {"inputs_embeds": torch.randn(128, 17, 64, generator=g)}, 20),
             "8M GPT-2 LM (8 layers, width 256, batch 4 x 256)":
             (lm, {"input_ids": torch.randint(0, 4096, (4, 256), generator=g)}, 3)}
    out = []
    for name, (build, batch, steps) in cases.items():
        models = {mode: build(mode) for mode in ("none", "previous")}
        models["previous"].load_state_dict(models["none"].state_dict())
        params = sum(p.numel() for p in models["none"].parameters())

        def step(model):
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)
            def run():
                for _ in range(steps):
                    logits = model(**batch).logits
                    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), logits[:, 1:].argmax(-1).reshape(-1))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            return run

        with torch.enable_grad():
            times = {mode: [] for mode in models}
            for _ in range(reps):  # alternately, so drift in the machine's speed hits both alike
                for mode, model in models.items():
                    times[mode].append(measure(step(model), 1)[0])
        best = {mode: min(v) for mode, v in times.items()}
        out.append({"model": name, "params": params, "steps": steps, "none_seconds": best["none"],
                    "previous_seconds": best["previous"], "cost": best["previous"] / best["none"] - 1})
    return out


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


def bench_lens_positions(name: str, batch: int, reps: int) -> dict:
    """The lens over all positions of `batch` capitals prompts against the lens at the last position and a bare
    forward with full-vocabulary logits at every position; peak memory above the loaded model, against the logits
    an unchunked decode of every layer and position would hold at once."""
    from probes.methods.readout import LOGITS_CHUNK

    lm = load_model(resolve_model(name))
    task = load_task("capitals")
    items = task.scored_items(lm.tokenizer, batch)[0]
    hf, tok = lm.model._module, lm.tokenizer
    enc = tok([it.prompt for it in items], return_tensors="pt", padding=True)
    bare_s, bare_mem = measure(lambda: hf(**enc), reps)
    last_s, last_mem = measure(lambda: run_lens(lm, items), reps)
    all_s, all_mem = measure(lambda: run_lens(lm, items, positions="all"), reps)
    tokens = sum(len(tok(it.prompt).input_ids) for it in items)
    vectors = enc.input_ids.shape[1] * len(items) * (lm.arch.n_layers + 1)
    return {"model": name, "prompts": len(items), "tokens": tokens, "decoded_vectors": vectors,
            "bare_seconds": bare_s, "last_seconds": last_s, "all_seconds": all_s, "all_ratio": all_s / bare_s,
            "bare_peak": bare_mem, "last_peak": last_mem, "all_peak": all_mem,
            "unchunked_logits": vectors * lm.arch.vocab_size * 4, "chunk": LOGITS_CHUNK}


def tiny_llama(layers: int, hidden: int = 512):
    spec = parse_entry(f"bench-llama-{layers}x{hidden}", {"random": {
        "model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": 8,
        "num_key_value_heads": 4, "intermediate_size": 4 * hidden, "max_position_embeddings": 2048}}, "bench")
    return load_model(spec)


def scale_curves(reps: int) -> dict:
    """Time and peak memory of bare forward, logit lens and the transplant sweep as one factor varies."""
    task = load_task("capitals", {"ambiguous": "flag"})
    pool = task.items(limit=64)
    out = {"batch": [], "prompt_tokens": [], "layers": []}

    def point(lm, items, prompt):
        hf, tok = lm.model._module, lm.tokenizer
        enc = tok([it.prompt for it in items], return_tensors="pt", padding=True)
        L = lm.arch.n_layers
        vectors = control_vectors(torch.randn(lm.arch.config.hidden_size))
        sweep = [Variant("none")] + [Variant("o", (i,)) for i in range(L)]
        one = tok([prompt], return_tensors="pt")
        bare = lambda: hf(**enc, output_hidden_states=True)  # noqa: E731
        lens = lambda: run_lens(lm, items)  # noqa: E731
        t_bare, t_lens = measure(bare, reps)[0], measure(lens, reps)[0]
        t_one = measure(lambda: hf(**one, output_hidden_states=True), reps)[0]
        t_sweep = measure(lambda: add_sweep(lm, prompt, sweep, vectors), reps)[0]
        return {"bare_s": t_bare, "lens_s": t_lens, "lens_ratio": t_lens / t_bare, "sweep_s": t_sweep,
                "sweep_in_forwards": t_sweep / t_one, "act_bare_mb": activation_peak(bare) / 2**20,
                "act_lens_mb": activation_peak(lens) / 2**20}

    lm = tiny_llama(8)
    for b in (1, 2, 4, 8, 16, 32, 64):
        out["batch"].append({"batch": b, **point(lm, pool[:b], pool[0].prompt)})
    for repeat in (1, 2, 4, 8, 16):  # longer prompts: the one-shot prompt with more shots
        items = load_task("capitals", {"ambiguous": "flag", "shots": repeat}).items(limit=8)
        n = int(lm.tokenizer([items[0].prompt], return_tensors="pt").attention_mask.sum())
        out["prompt_tokens"].append({"shots": repeat, "tokens": n, **point(lm, items, items[0].prompt)})
    for layers in (2, 4, 8, 16, 32):
        lm = tiny_llama(layers)
        out["layers"].append({"layers": layers, **point(lm, pool[:8], pool[0].prompt)})
    return out


def print_model(r: dict) -> None:
    print(f"\n{r['model']} ({r['layers']} blocks, batch {r['batch']}, {r['tokens']} tokens)")
    if r["loads"]:
        print(f"  load: cold (GGUF dequantize) {r['loads']['cold']:.1f} s, cached {r['loads']['cached']:.2f} s "
              f"({r['loads']['cached'] / r['loads']['cold']:.3f} of cold; target <= 0.1)")
    w = r["weights_bytes"]
    kept = r["lens_kept_bytes"]
    print(f"  {'':44s} {'seconds':>8s} {'x bare':>7s} {'prompts/s':>9s} {'activations':>11s} "
          f"{'(weights + activations) / (1.5 weights + kept)':>47s}")
    for k, v in r["seconds"].items():
        a = r["activation_peak_bytes"][k]
        print(f"  {k:44s} {v:8.3f} {r['ratio_to_bare'][k]:7.2f} {r['prompts_per_second'][k]:9.1f} "
              f"{a / 2**20:8.0f} MB {(w + a) / (1.5 * w + kept):47.2f}")
    print(f"  weights {w / 2**20:.0f} MB; process peak RSS {r['max_rss_bytes'] / 2**20:.0f} MB (eager copy included); "
          f"a lens run must keep {r['lens_kept_bytes'] / 2**20:.0f} MB of residuals and logits; transplant sweep over all {r['layers']} blocks = "
          f"{r['sweep_in_bare_forwards']:.2f} bare forwards of that prompt (target <= L/4 = {r['sweep_target']:.1f})")
    print(f"  the self-check adds {100 * r['self_check_share']:.1f}% to a lens run over capitals ({r['lens_run_batches']} "
          "batches; target <= 10%)")


def print_curves(c: dict) -> None:
    for factor, rows in c.items():
        print(f"\nscale: {factor} (random Llama, hidden 512, vocab 1024; act = peak live activation bytes)")
        keys = list(rows[0])
        print("  " + "  ".join(f"{k:>17s}" for k in keys))
        for row in rows:
            print("  " + "  ".join(f"{row[k]:17.4g}" for k in keys))


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
        results["training"] = [bench_training(str(c), args.steps, args.reps) for c in configs]
        for r in results["training"]:
            print(f"training {r['config']}: {r['steps']} steps x batch {r['batch']}: bare loop {r['bare_seconds']:.2f} s "
                  f"({r['bare_seq_per_s']:.0f} seq/s), probe train {r['ours_seconds']:.2f} s ({r['ours_seq_per_s']:.0f} "
                  f"seq/s) = {r['ratio']:.2f}x; its data path {r['data_seconds']:.2f} s = {r['data_share']:.1%} of it")
    if args.attribution:
        results["attribution"] = r = bench_attribution(args.models[0], args.attribution_task, args.attribution_pairs,
                                                       args.reps)
        print(f"attribution {r['model']} ({r['task']}): {r['pairs']} pairs, {r['patches']} patches, exact "
              f"{r['exact_seconds']:.2f} s")
        for e in r["estimators"]:
            print(f"  {e['estimator']}: {e['estimate_seconds']:.2f} s = {e['speedup']:.1f}x faster; Spearman per pair "
                  f"{e['spearman']:.3f} [{e['spearman_lo']:.3f}, {e['spearman_hi']:.3f}] (n={e['spearman_n']}), of "
                  f"magnitudes {e['spearman_abs']:.3f} [{e['spearman_abs_lo']:.3f}, {e['spearman_abs_hi']:.3f}]; exact "
                  f"top 10 in the estimate's top 20: {e['top_found']:.2f} [{e['top_found_lo']:.2f}, "
                  f"{e['top_found_hi']:.2f}]")
    if args.patching:
        results["patching"] = r = bench_patching(args.models[0], args.patching_task, args.patching_pairs, sample=60)
        print(f"patching {r['model']} ({r['task']}): {r['pairs']} pair(s), {r['patches']} patches ({r['blocks']} blocks "
              f"x {r['positions']} positions): batched {r['batched_seconds']:.1f} s, every patch run "
              f"{r['batched_every_patch_seconds']:.1f} s, one trace per patch {r['loop_seconds']:.1f} s = "
              f"{r['speedup']:.2f}x and {r['speedup_every_patch']:.2f}x faster; max difference {r['max_diff']:.1e}; "
              f"peak above the model: resident {r['batched_peak_rss'] / 2**20:.0f} MB (every patch run "
              f"{r['batched_every_patch_peak_rss'] / 2**20:.0f} MB), activations "
              f"{r['batched_every_patch_peak_tensors'] / 2**20:.0f} MB")
    if args.lens_positions:
        results["lens_positions"] = r = bench_lens_positions(args.models[0], args.batch, args.reps)
        print(f"lens over positions {r['model']}: {r['prompts']} prompts, {r['tokens']} tokens, "
              f"{r['decoded_vectors']} vectors decoded: bare forward (logits everywhere) {r['bare_seconds']:.2f} s, "
              f"lens at the last position {r['last_seconds']:.2f} s, at all {r['all_seconds']:.2f} s = "
              f"{r['all_ratio']:.2f}x; peak memory above the model: bare {r['bare_peak'] / 2**20:.0f} MB, last "
              f"{r['last_peak'] / 2**20:.0f} MB, all {r['all_peak'] / 2**20:.0f} MB (unchunked logits would be "
              f"{r['unchunked_logits'] / 2**20:.0f} MB; chunks of {r['chunk'] / 2**20:.0f} MB)")
    if args.value_residual:
        results["value_residual"] = bench_value_residual(args.reps)
        for r in results["value_residual"]:
            print(f"value residual, {r['model']}, {r['params']:,} parameters: {r['steps']} training steps without "
                  f"{r['none_seconds']:.2f} s, with {r['previous_seconds']:.2f} s: cost {100 * r['cost']:+.1f}%")
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
