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

import nnsight
import torch

from ..errors import ProbeError
from ..models.devices import smaller_batch

# largest difference accepted, relative to the largest magnitude of what is compared (a block's output, the logits)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.float16: 1e-2, torch.bfloat16: 5e-2}
PROMPTS = 8  # of the run's first batch


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)


def _top1_agrees(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    """Same top-1 per row, unless the reference's best two are closer than the tolerance (a near tie)."""
    got, ref = got.float(), ref.float()
    top2 = ref.topk(2, dim=-1).values
    tie = (top2[..., 0] - top2[..., 1]) <= tol * ref.abs().amax(dim=-1)
    return bool(((got.argmax(-1) == ref.argmax(-1)) | tie).all())


def claims_identity(arch) -> bool:
    return arch.residual and arch.has_ffn


def measure(loaded, prompts: list, lengths: list[int] | None) -> dict:
    """The figures (relative differences) on `prompts` (token `lengths`, None for vectors), in two forwards: the
    batch (left-padded), then its most padded prompt alone. Padding is 'n/a' where every prompt has one length."""
    arch, tol = loaded.arch, tolerance(loaded)
    identity = claims_identity(arch)
    with loaded.trace(prompts, logits_to_keep=1):
        misses = []
        for i in range(arch.n_layers) if identity else ():
            x = arch.block_input(i)
            a, f = arch.attn_update(i), arch.ffn_update(i, like=x)
            misses.append(_relative(x + a + f, arch.block_output(i)).to(arch.unembed_device))
        last = nnsight.save(arch.resid(arch.n_layers)[:, -1])
        logits = nnsight.save(loaded.model.output.logits[:, -1].float())
        worst = nnsight.save(torch.stack(misses).max()) if misses else None
    lens = arch.decode(last)
    out = {"prompts": len(prompts), "lens_logits": float(_relative(lens, logits)),
           "lens_top1": _top1_agrees(lens, logits, tol), "identity": float(worst) if identity else "n/a"}
    if lengths is None or len(set(lengths)) < 2:
        return {**out, "padding": "n/a"}
    shortest = min(range(len(prompts)), key=lengths.__getitem__)
    with loaded.trace([prompts[shortest]], logits_to_keep=1):
        alone = nnsight.save(loaded.model.output.logits[:, -1].float())
    return {**out, "padding": float(_relative(logits[shortest], alone[0])),
            "padding_top1": _top1_agrees(logits[shortest:shortest + 1], alone, tol)}


def tolerance(loaded) -> float:
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
    got = {**got, "tolerance": tol, "dtype": str(loaded.arch.hf.dtype).removeprefix("torch.")}
    failed = _failure(got, tol, loaded.spec.name, loaded.arch.model_type)
    if failed and strict:
        raise ProbeError(f"{failed}; accepted: --no-self-check to run anyway (recorded in meta.json)")
    return {**got, "failed": failed, "went_on": bool(failed)} if failed else got


def _failure(got: dict, tol: float, name: str, family: str) -> str | None:
    if got["lens_logits"] > tol or not got["lens_top1"]:
        return (f"self-check failed on {name}: the lens of the last layer is not the model's logits (relative "
                f"difference {got['lens_logits']:.2g}, tolerance {tol:g}{'' if got['lens_top1'] else ', another top-1'}"
                f"): the architecture table's final norm or unembedding for {family} is not what the model computes")
    if got["identity"] != "n/a" and got["identity"] > tol:
        return (f"self-check failed on {name}: block output = input + attention update + FFN update does not hold "
                f"(relative difference {got['identity']:.2g}, tolerance {tol:g}): the architecture table's attention "
                f"or FFN module for {family} is not the update")
    if got["padding"] != "n/a" and (got["padding"] > tol or not got["padding_top1"]):
        return (f"self-check failed on {name}: a left-padded prompt does not get the logits it gets alone (relative "
                f"difference {got['padding']:.2g}, tolerance {tol:g}{'' if got['padding_top1'] else ', another top-1'}"
                "): batched results would depend on the batch")
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
    pad = figures["padding"]
    parts.append("padding n/a (one length)" if pad == "n/a" else f"padding invariant ({pad:.1g})")
    return "self-check: " + ", ".join(parts) + f" [{figures['dtype']}, {figures['prompts']} prompts]"
