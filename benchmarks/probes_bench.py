"""What each probe costs against a bare forward pass on the bundled models, the lens over every position, and the
scale curves on tiny random Llamas (bench.py's default run, --lens-positions and the scale curves)."""

from __future__ import annotations

import os
import resource
import tempfile

import torch

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
from timing import PROC, activation_peak, measure


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



def print_lens_positions(r: dict) -> None:
    print(f"lens over positions {r['model']}: {r['prompts']} prompts, {r['tokens']} tokens, "
          f"{r['decoded_vectors']} vectors decoded: bare forward (logits everywhere) {r['bare_seconds']:.2f} s, "
          f"lens at the last position {r['last_seconds']:.2f} s, at all {r['all_seconds']:.2f} s = "
          f"{r['all_ratio']:.2f}x; peak memory above the model: bare {r['bare_peak'] / 2**20:.0f} MB, last "
          f"{r['last_peak'] / 2**20:.0f} MB, all {r['all_peak'] / 2**20:.0f} MB (unchunked logits would be "
          f"{r['unchunked_logits'] / 2**20:.0f} MB; chunks of {r['chunk'] / 2**20:.0f} MB)")
