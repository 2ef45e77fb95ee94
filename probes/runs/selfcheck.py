"""The self-check every run makes before its first batch: on the model being probed and one batch of the run's own
prompts, in two extra forwards, that what the probes read is what the model computes.

- lens = logits: the last residual decoded through the architecture table's final norm and unembedding equals the
  model's own logits (same top-1, differences within the dtype's tolerance);
- identity: each block's output = its input + attention update + FFN update, for the families whose table claims
  it (a residual block with an FFN), where the table's modules are the updates;
- padding: the prompt with the most left padding in the batch gets the logits it gets alone.

Silently wrong numbers are what users of the peer tools meet most (a left-padding bug that moved GPT-2's
next-token distribution; an argument ignored without a word); a failed check stops the run with one line naming
it, unless the user asks to go on (`--no-self-check`, recorded in meta.json).
"""

from __future__ import annotations

import math

import nnsight
import torch

from ..errors import ProbeError
from ..methods.readout import finite_instead
from ..models.devices import smaller_batch

# largest difference accepted, relative to the largest magnitude of what is compared (a block's output, the logits),
# per compute dtype; a quantized model's by its quantization (its matmuls round far more than its compute dtype)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}
QUANTIZED_TOLERANCE = {"8bit": 5e-2, "4bit": 1e-1}
# a quantized model's outputs depend on its batchmates without any padding (LLM.int8 decides its outlier columns
# per batch): its padding figure is judged against that dependence, measured on an unpadded batch of the same
# prompts, up to this factor (padding adds batchmate tokens, the pads, so it moves a little more)
BATCH_FACTOR = 2.0
PROMPTS = 8  # of the run's first batch


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)


def _top1_agrees(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Same top-1 per row, unless the reference's best two are closer than the tolerance (a near tie); never
    where either holds a non-finite value."""
    got, ref = got.float(), ref.float()
    if not (bool(got.isfinite().all()) and bool(ref.isfinite().all())):
        return False
    top2 = ref.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) <= tol * ref.abs().amax(dim=-1)
    return bool(((got.argmax(-1) == ref.argmax(-1)) | tie).all())


def claims_identity(arch) -> bool:
    return arch.residual and arch.has_ffn


def _kept(t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """`t` with the pad positions' rows zeroed (a pad's row may overflow unread: no figure is taken over it)."""
    if mask is None or t.dim() < 2 or t.shape[:2] != mask.shape:
        return t
    return torch.where(mask.to(t.device).bool().view(*mask.shape, *[1] * (t.dim() - 2)), t, torch.zeros((), dtype=t.dtype,
                                                                                                 device=t.device))


def _finite(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Whether every value of `t` is finite (at the positions `mask` keeps: a pad's row may overflow unread)."""
    ok = t.isfinite()
    if mask is not None and ok.dim() >= 2 and ok.shape[:2] == mask.shape:
        ok = ok | ~mask.to(ok.device).bool().view(*mask.shape, *[1] * (ok.dim() - 2))
    return ok.all()


def measure(loaded, prompts: list, lengths: list[int] | None) -> dict:
    """The figures (relative differences) on `prompts` (token `lengths`, None for vectors), in two forwards: the
    batch (left-padded), then its most padded prompt alone; a quantized model's also on an unpadded batch (its
    batch dependence by itself). Padding is 'n/a' where every prompt has one length. `nonfinite` names the first
    place (block and module, in forward order) where a value is NaN or infinite, if any."""
    arch, tol = loaded.arch, tolerance(loaded)
    identity = claims_identity(arch)
    mask = loaded.tokenizer(prompts, padding=True, return_tensors="pt").attention_mask if lengths else None
    with loaded.trace(prompts, logits_to_keep=1):
        misses, finite = [], [_finite(arch.resid(0), mask).to(arch.unembed_device)]
        for i in range(arch.n_layers):
            if identity:
                x = arch.block_input(i)
                a, f = arch.attn_update(i), arch.ffn_update(i, like=x)
                finite += [_finite(a, mask).to(arch.unembed_device), _finite(f, mask).to(arch.unembed_device)]
                misses.append(_relative(_kept(x + a + f, mask), _kept(arch.block_output(i), mask))
                              .to(arch.unembed_device))
            finite.append(_finite(arch.block_output(i), mask).to(arch.unembed_device))
        last = nnsight.save(arch.resid(arch.n_layers)[:, -1])
        logits = nnsight.save(loaded.model.output.logits[:, -1].float())
        worst = nnsight.save(torch.stack(misses).max()) if misses else None
        flags = nnsight.save(torch.stack(finite))
    lens = arch.decode(last)
    out = {"prompts": len(prompts), "lens_logits": float(_relative(lens, logits)),
           "lens_top1": _top1_agrees(lens, logits, tol), "identity": float(worst) if identity else "n/a",
           "nonfinite": _first_nonfinite(arch, flags.tolist(), identity, bool(logits.isfinite().all()))}
    if lengths is None or len(set(lengths)) < 2:
        return {**out, "padding": "n/a"}
    shortest = min(range(len(prompts)), key=lengths.__getitem__)
    alone = _last_logits(loaded, [prompts[shortest]])
    out = {**out, "padding": float(_relative(logits[shortest], alone[0])),
           "padding_top1": _top1_agrees(logits[shortest:shortest + 1], alone, tol)}
    if loaded.quantize:
        out["batch"] = batch_dependence(loaded, prompts[shortest], alone[0])
    return out


def _last_logits(loaded, prompts: list) -> torch.Tensor:
    with loaded.trace(prompts, logits_to_keep=1):
        logits = nnsight.save(loaded.model.output.logits[:, -1].float())
    return logits


def batch_dependence(loaded, prompt: str, alone: torch.Tensor) -> float | str:
    """How far `prompt`'s logits move when it shares an unpadded batch (a second prompt of the same token count:
    its reversed tokens) against `alone`: what a quantization does by itself, with no padding in the batch."""
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids[0]
    if len(ids) < 2:
        return "n/a"
    batch = torch.stack([ids, torch.cat([ids[:1], ids[1:].flip(0)])])  # token ids: no re-encoding, one length
    with loaded.trace({"input_ids": batch, "attention_mask": torch.ones_like(batch)}, logits_to_keep=1):
        logits = nnsight.save(loaded.model.output.logits[:, -1].float())
    return float(_relative(logits[0], alone))


def _first_nonfinite(arch, flags: list[bool], identity: bool, logits_finite: bool) -> str | None:
    """'block 3's attention update (model.layers.3.self_attn)', or None when every value read is finite."""
    names = ["the embedding output"]
    for i in range(arch.n_layers):
        block = f"{arch.spec.layers}.{i}"
        if identity:
            names += [f"block {i}'s attention update ({block}.{arch.spec.attn})",
                      f"block {i}'s FFN update ({block}.{arch.spec.ffn})"]
        names.append(f"block {i}'s output ({block})")
    bad = next((name for name, ok in zip(names, flags) if not ok), None)
    if bad is None and not logits_finite:
        return f"the final norm or unembedding ({arch.spec.final_norm}, {arch.spec.unembed})"
    return bad


def tolerance(loaded) -> float:
    """The one tolerance a run's figures are judged by: its quantization's, else its compute dtype's."""
    if loaded.quantize:
        return QUANTIZED_TOLERANCE[loaded.quantize]
    return TOLERANCE.get(loaded.arch.hf.dtype, 5e-2)


def check_batch(loaded, items, truncates: bool, size: int) -> tuple[list, list[int] | None]:
    """The run's first `size` prompts (its batch size at most) and their token lengths; when they are all of one
    length, the last becomes the first half of the first (shorter: within the context), so that the batch is
    padded (one prompt: no padding to check)."""
    prompts = [_within_context(loaded, it.prompt) if truncates else it.prompt for it in items[:size]]
    if loaded.spec.reads_vectors:
        return prompts, None
    if len(prompts) == 1 and size > 1:
        prompts.append(prompts[0])
    lengths = [len(loaded.tokenizer(p).input_ids) for p in prompts]
    if len(set(lengths)) < 2 and len(prompts) > 1:
        prompts[-1] = prompts[0][:max(1, len(prompts[0]) // 2)]
        lengths[-1] = len(loaded.tokenizer(prompts[-1]).input_ids)
    return prompts, lengths


def _within_context(loaded, prompt: str) -> str:
    """A document's start that fits the context (probes that read each document's first context-length tokens):
    its first half-context of tokens, decoded (re-encoding a decoded text can take a few more tokens)."""
    limit = loaded.arch.context_length
    ids = loaded.tokenizer(prompt).input_ids
    return prompt if limit is None or len(ids) <= limit else loaded.tokenizer.decode(ids[:limit // 2])


def self_check(loaded, items, truncates: bool = False, strict: bool = True, batch_size: int | str = PROMPTS) -> dict:
    """Run the checks on the run's first prompts, a batch no larger than the run's (`auto`: halved on out of
    memory, as the run's batches are): their figures for meta.json. A failed check is a one-line ProbeError naming
    it; not `strict` (--no-self-check), the figures carry the failure and the run goes on."""
    tol = tolerance(loaded)
    size = PROMPTS if batch_size == "auto" else min(PROMPTS, batch_size)
    while True:
        try:
            got = measure(loaded, *check_batch(loaded, items, truncates, size))
            break
        except Exception as e:
            size = smaller_batch(e, size, batch_size == "auto")
    got = {**got, "tolerance": tol, "dtype": str(loaded.arch.hf.dtype).removeprefix("torch."),
           "quantize": loaded.quantize, "batch_factor": BATCH_FACTOR if loaded.quantize else None}
    failed = _failure(got, tol, loaded.spec.name, loaded.arch.model_type)
    if failed and strict:  # non-finite values: running anyway would stop at the first row (execution.check_finite)
        raise ProbeError(failed if got["nonfinite"] else
                         f"{failed}; accepted: --no-self-check to run anyway (recorded in meta.json)")
    return {**got, "failed": failed, "went_on": bool(failed)} if failed else got


def _within(value, limit: float) -> bool:
    """value <= limit, False for NaN (a comparison that is False for NaN must never pass a check)."""
    return value == "n/a" or (math.isfinite(value) and value <= limit)


def _failure(got: dict, tol: float, name: str, family: str) -> str | None:
    if got["nonfinite"]:
        instead = finite_instead(got["dtype"])
        return (f"self-check failed on {name}: {got['dtype']}{' ' + got['quantize'] if got['quantize'] else ''} "
                f"computes non-finite values (NaN or inf), first in {got['nonfinite']}: every figure would be "
                f"meaningless; accepted: {instead}")
    if not _within(got["lens_logits"], tol) or not got["lens_top1"]:
        return (f"self-check failed on {name}: the lens of the last layer is not the model's logits (relative "
                f"difference {got['lens_logits']:.2g}, tolerance {tol:g}{'' if got['lens_top1'] else ', another top-1'}"
                f"): the architecture table's final norm or unembedding for {family} is not what the model computes")
    if not _within(got["identity"], tol):
        return (f"self-check failed on {name}: block output = input + attention update + FFN update does not hold "
                f"(relative difference {got['identity']:.2g}, tolerance {tol:g}): the architecture table's attention "
                f"or FFN module for {family} is not the update")
    batch = got.get("batch", "n/a")  # the quantization's own batch dependence: recorded and said, not a failure
    limit = min(max(tol, BATCH_FACTOR * batch), 4 * tol) if got["quantize"] and batch != "n/a" else tol  # capped
    if not _within(got["padding"], limit) or (got["padding"] != "n/a" and not got["padding_top1"]):
        cause = (f", beyond {BATCH_FACTOR:g}x the {got['quantize']} batch dependence measured without padding "
                 f"({batch:.2g})" if got["quantize"] and batch != "n/a" else "")
        return (f"self-check failed on {name}: a padded prompt does not get the logits it gets alone (relative "
                f"difference {got['padding']:.2g}, tolerance {limit:.2g}{cause}"
                f"{'' if got['padding_top1'] else ', another top-1'}): batched results would depend on the padding")
    return None


def describe(figures: dict) -> str:
    """'self-check: lens = logits (1e-07), identity 3e-06, padding invariant (2e-07)' or what was skipped."""
    if "skipped" in figures:
        return f"self-check: skipped ({figures['skipped']})"
    if figures.get("failed"):
        return f"{figures['failed']}; going on (--no-self-check)"
    parts = [f"lens = logits ({figures['lens_logits']:.1g})"]
    ident = figures["identity"]
    parts.append("identity not claimed (no residual FFN block)" if ident == "n/a" else f"identity {ident:.1g}")
    pad, batch = figures["padding"], figures.get("batch", "n/a")
    if pad == "n/a":
        parts.append("padding n/a (one length)")
    elif batch != "n/a":
        parts.append(f"padding {pad:.1g} within {figures['batch_factor']:g}x the {figures['quantize']} batch "
                     f"dependence without padding ({batch:.1g})" if pad > figures["tolerance"]
                     else f"padding invariant ({pad:.1g}; {figures['quantize']} batch dependence {batch:.1g})")
    else:
        parts.append(f"padding invariant ({pad:.1g})")
    kind = figures["dtype"] + (f" {figures['quantize']}" if figures.get("quantize") else "")
    return "self-check: " + ", ".join(parts) + f" [{kind}, {figures['prompts']} prompts, tolerance {figures['tolerance']:g}]"
