"""What the probes share to read a model out: the next token's logits, the residual stream at the last position,
decoding residual vectors through the final norm and unembedding into ranks, probabilities and top-k (in chunks,
on the model's devices, inside a trace or out), the tokens `--vocab text` leaves out, and the rows those reductions
become. The logit lens (lens.py) is the probe that decodes every layer; ffn-readout, accuracy, ffn-ablation,
ffn-transplant, logit-difference, nback and the patching engine read through the same functions.

`--vocab text` leaves the tokenizer's special and control tokens (`<start_of_image>`, `<unused0>`, ...) out of
every top-k, rank and probability; the default, `all`, is the paper's (the whole vocabulary). Rows say whether the
model's own top-1 is a special token (`special_top1`), so a run can warn when it often is.
"""

from __future__ import annotations

import json
import re

import nnsight
import torch


from ..errors import ProbeError
from ..tasks.base import Item, answer_token, first_token


VOCABS = ("all", "text")


# modality markers that some tokenizers add without marking them special (Gemma 3's GGUF: <start_of_image>)
MARKER = re.compile(r"<(start|end)_of_\w+>|<\w*(image|audio|video)\w*>|\[multimodal\]")


def special_ids(tokenizer) -> list[int]:
    """The tokenizer's special and control tokens: its special tokens, every added token marked special, and
    added modality markers (`MARKER`). Added text tokens (whitespace runs, HTML tags) stay."""
    ids = set(tokenizer.all_special_ids)
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False) or MARKER.fullmatch(str(t)):
            ids.add(i)
    return sorted(ids)


def excluded_ids(tokenizer, vocab: str | None) -> torch.Tensor | None:
    """The ids `--vocab` leaves out of top-k and ranks: None for all, the special tokens for text."""
    if vocab in (None, "all"):
        return None
    if vocab != "text":
        raise ProbeError(f"unknown --vocab {vocab!r}; accepted: {', '.join(VOCABS)}")
    return torch.tensor(special_ids(tokenizer), dtype=torch.long)


def restrict(logits: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
    """Logits with the excluded ids at -inf (never top-k, never ahead of a target, probability 0)."""
    if excluded is None or not len(excluded):
        return logits
    return logits.index_fill(-1, excluded.to(logits.device), float("-inf"))


def special_flags(tokenizer, top_ids) -> list[bool]:
    """Per predicted token id: is it a special token?"""
    special = set(special_ids(tokenizer))
    return [int(t) in special for t in top_ids]


def residuals_in_trace(arch) -> torch.Tensor:
    """Called inside a trace: (batch, L + 1, d) residual stream at the last position, every layer, gathered on
    the unembedding's device."""
    return torch.stack([arch.resid(index)[:, -1].to(arch.unembed_device) for index in range(arch.n_layers + 1)],
                       dim=1)


def last_residuals(loaded, prompts: list[str]) -> torch.Tensor:
    """(batch, L + 1, d) residual stream at the last position of each (left-padded) prompt, every layer."""
    with loaded.trace(prompts, logits_to_keep=1):  # the lens decodes itself: skip the full-vocab logits
        residuals = nnsight.save(residuals_in_trace(loaded.arch))
    return residuals


def next_token_logits(loaded, prompts: list[str]) -> torch.Tensor:
    """(batch, vocab) float logits of the next token after each (left-padded) prompt."""
    with loaded.trace(prompts, logits_to_keep=1):
        logits = loaded.model.output.logits[:, -1].save()
    return logits.float()


def finite_instead(dtype: str) -> str:
    """What to use instead of a dtype that computes NaN or inf (the 'accepted' part of the one-line errors)."""
    return {"float16": "--dtype bfloat16 or float32 (float16 overflows where bfloat16's range does not)",
            "bfloat16": "--dtype float32"}.get(dtype, "a model whose weights and inputs are finite")


def require_finite(logits: torch.Tensor, loaded, what: str) -> None:
    """Stop where a probe would turn non-finite logits into ranks (a NaN row ranks last: a plausible integer)."""
    if not bool(logits.isfinite().all()):  # one read per batch
        dtype = str(loaded.arch.hf.dtype).removeprefix("torch.")
        raise ProbeError(f"{what} computes non-finite logits on {loaded.spec.name} in {dtype}; accepted: "
                         f"{finite_instead(dtype)}")


def rank_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of token ids[b] in logits[b, ..., :] (number of strictly larger logits). NaN explicitly: a NaN
    logit counts as larger, and a NaN target ranks last (a comparison with NaN is False, which would make every
    token of a NaN row "top-1")."""
    target = logits.gather(-1, ids.view(-1, *[1] * (logits.dim() - 1)).expand(*logits.shape[:-1], 1))
    rank = ((logits > target) | logits.isnan()).sum(-1)
    return torch.where(target.squeeze(-1).isnan(), logits.shape[-1], rank)


def target_ids(loaded, items: list[Item]) -> dict[str, torch.Tensor]:
    """First token ids of each item's answer (as emitted after its prompt) and argument (when every item has one:
    a user's prompts may give none)."""
    tok = loaded.tokenizer
    out = {"answer": torch.tensor([answer_token(tok, it) for it in items])}
    if all(it.argument for it in items):
        out["argument"] = torch.tensor([first_token(tok, it.argument) for it in items])
    return out


LOGITS_CHUNK = 2**28  # bytes of float32 logits decoded at once: bounds memory for big vocabularies and batches


def lens_tensors(arch, hidden: torch.Tensor, targets: dict, topk: int, logit: bool = False,
                 excluded: torch.Tensor | None = None, final_every: int | None = None) -> dict:
    """Decode residual vectors hidden (batch, n, d) and reduce the logits to what the rows keep: top-k ids, and
    per target (ids of shape (batch,)) its rank, probability (and raw logit if asked), each (batch, n[, k]).
    What is decoded is the caller's: the vectors themselves (the logit lens) or tuned_lens.translated's.

    All batch x n vectors go through the unembedding together, in chunks of LOGITS_CHUNK bytes of logits: with a
    few prompts, one decode per layer would read the whole unembedding matrix once per layer, which costs more than
    the forward pass. Plain torch on the model's modules, so it also runs inside a trace (on a remote server).
    `excluded`: token ids left out of the vocabulary (see `restrict`). `final_every` g: each run of g vectors ends
    with the last residual (index L, whose decoding is the model's distribution) at the others' position, and each
    vector's KL(model's distribution || its distribution) in nats, over the vocabulary `excluded` leaves, is kept
    as `kl_to_final` (0 for the last itself)."""
    batch, n, _ = hidden.shape
    flat = hidden.reshape(batch * n, -1)
    rows = max(1, LOGITS_CHUNK // (4 * arch.vocab_size))
    if final_every:
        rows = max(1, rows // final_every) * final_every  # whole runs of g per chunk
    parts = []
    for start in range(0, batch * n, rows):
        raw = arch.decode(flat[start:start + rows])  # (rows, vocab) float32
        logits = restrict(raw, excluded)
        norm = logits.logsumexp(-1)  # not log_softmax: no second (rows, vocab) tensor
        part = {"top": logits.topk(topk, dim=-1).indices}
        if final_every:  # KL_i = sum_v p_v (l_v - N - l_iv + N_i), p the final's probabilities (0 where excluded)
            runs, norms = raw.view(-1, final_every, raw.shape[-1]), norm.view(-1, final_every)
            p = (logits.view(runs.shape)[:, -1] - norms[:, -1:]).exp()
            cross = torch.bmm(runs, p[..., None])[..., 0]  # (runs, g): sum_v p_v l_iv, raw logits (finite)
            part["kl_to_final"] = ((cross[:, -1:] - norms[:, -1:]) - (cross - norms)).flatten()
        for name, ids in targets.items():
            ids = ids.to(logits.device).repeat_interleave(n)[start:start + rows]
            target = logits.gather(-1, ids[:, None])[:, 0]
            part[f"{name}_rank"] = rank_of(logits, ids)
            part[f"{name}_prob"] = (target - norm).exp()
            if logit:
                part[f"{name}_logit"] = target
        parts.append(part)
    return {k: torch.cat([p[k] for p in parts]).reshape(batch, n, *parts[0][k].shape[1:]) for k in parts[0]}


def stats_rows(tok, stats: dict, prefix: str = "") -> list[list[dict]]:
    """`lens_tensors` output -> rows[b][index]: top-1 and top-k tokens, and per target its rank, reciprocal rank
    and probability (and logit); column names prefixed by `prefix`."""
    top = stats["top"].tolist()
    text = {i: tok.decode(i) for i in {i for per_b in top for per_i in per_b for i in per_i}}
    cols = {}
    for key, values in stats.items():
        if key != "top":
            cols[prefix + key] = values.tolist()
            if key.endswith("_rank"):
                cols[prefix + key[:-5] + "_rr"] = (1.0 / (values.double() + 1)).tolist()
    return [[{prefix + "top1": text[ids[0]],
              prefix + "topk": json.dumps([text[i] for i in ids], ensure_ascii=False),
              **{key: values[b][index] for key, values in cols.items()}}
             for index, ids in enumerate(per_b)] for b, per_b in enumerate(top)]
