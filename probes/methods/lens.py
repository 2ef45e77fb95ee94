"""The logit lens: decode the last position's residual stream at every layer through final norm and unembedding.

Rows are one per prompt x residual index (0 = embedding output, i = output of block i-1, L = last block, whose
lens equals the model's logits). Ranks are 0-based (0 = top-1) and the reciprocal rank is 1 / (rank + 1), as in
Merullo et al.
"""

from __future__ import annotations

import json

import nnsight
import torch

import pandas as pd

from ..stats import interval_text, level, median_reached, proportion
from ..tasks.base import Item, answer_token, first_token, item_columns


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


def rank_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of token ids[b] in logits[b, ..., :] (number of strictly larger logits)."""
    target = logits.gather(-1, ids.view(-1, *[1] * (logits.dim() - 1)).expand(*logits.shape[:-1], 1))
    return (logits > target).sum(-1)


def target_ids(loaded, items: list[Item]) -> dict[str, torch.Tensor]:
    """First token ids of each item's answer (as emitted after its prompt) and argument."""
    tok = loaded.tokenizer
    return {"answer": torch.tensor([answer_token(tok, it) for it in items]),
            "argument": torch.tensor([first_token(tok, it.argument) for it in items])}


LOGITS_CHUNK = 2**28  # bytes of float32 logits decoded at once: bounds memory for big vocabularies and batches


def lens_tensors(arch, hidden: torch.Tensor, targets: dict, topk: int, logit: bool = False) -> dict:
    """Decode residual vectors hidden (batch, n, d) and reduce the logits to what the rows keep: top-k ids, and
    per target (ids of shape (batch,)) its rank, probability (and raw logit if asked), each (batch, n[, k]).

    All batch x n vectors go through the unembedding together, in chunks of LOGITS_CHUNK bytes of logits: with a
    few prompts, one decode per layer would read the whole unembedding matrix once per layer, which costs more than
    the forward pass. Plain torch on the model's modules, so it also runs inside a trace (on a remote server)."""
    batch, n, _ = hidden.shape
    flat = hidden.reshape(batch * n, -1)
    rows = max(1, LOGITS_CHUNK // (4 * arch.vocab_size))
    parts = []
    for start in range(0, batch * n, rows):
        logits = arch.decode(flat[start:start + rows])  # (rows, vocab) float32
        norm = logits.logsumexp(-1)  # not log_softmax: no second (rows, vocab) tensor
        part = {"top": logits.topk(topk, dim=-1).indices}
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


def run_lens(loaded, items: list[Item], topk: int = 5) -> list[dict]:
    """Decoded inside the trace: the residuals never leave the model's devices (or the remote server), only the
    per-layer ranks, probabilities and top-k ids do."""
    arch = loaded.arch
    targets = target_ids(loaded, items)
    with loaded.trace([it.prompt for it in items], logits_to_keep=1):
        # assigned, then saved: a remote trace returns only the names it assigns and saves
        stats = nnsight.save(lens_tensors(arch, residuals_in_trace(arch), targets, topk))
    stats = stats_rows(loaded.tokenizer, stats)
    return [{**item_columns(loaded.tokenizer, it), "layer": index, **stats[b][index]}
            for b, it in enumerate(items) for index in range(arch.n_layers + 1)]


def first_top1(df, col: str, items) -> list:
    """Per item (in `items` order), the first residual index at which `col` is 0 (top-1), None if never."""
    first = df[df[col] == 0].groupby("item").layer.min()
    return [None if pd.isna(v) else float(v) for v in first.reindex(items)]


def summarize_lens(df, seed: int = 0) -> dict:
    """Accuracy at the last layer (with its interval) and the median first layer at which the answer / argument is
    top-1, over the items that ever reach it (their count is kept)."""
    last = df[df.layer == df.layer.max()]
    n = int(last.item.nunique())
    return {"items": n, **proportion(int((last.answer_rank == 0).sum()), len(last), "accuracy"),
            **median_reached(first_top1(df, "answer_rank", last.item), n, "answer_top1_layer"),
            **median_reached(first_top1(df, "argument_rank", last.item), n, "argument_top1_layer"),
            "n_layers": int(df.layer.max())}


def reached_text(summary: dict, name: str, where: str = "layer") -> str:
    """'at layer 13.5 (median of 141 of 196 items; 55 never)', or 'never (none of 196 items)'."""
    k, n = summary[f"{name}_reached"], summary[f"{name}_of"]
    if not k:
        return f"never (none of {n} items)"
    return f"at {where} {summary[name]:g} (median of {k} of {n} items" + (f"; {n - k} never)" if n > k else ")")


def report_lens(table, summary) -> str:
    """Per-layer top-1 fraction and mean reciprocal rank of answer and argument, then the summary line."""
    by_layer = table.groupby("layer").agg(
        answer_top1=("answer_rank", lambda r: (r == 0).mean()), answer_rr=("answer_rr", "mean"),
        argument_top1=("argument_rank", lambda r: (r == 0).mean()), argument_rr=("argument_rr", "mean"))
    return (f"per residual index (0 = embeddings), over {summary['items']} items: *_top1 = fraction whose token "
            "is the lens top-1, *_rr = mean reciprocal rank 1/(rank+1)\n" + by_layer.round(3).to_string()
            + f"\n\nitems {summary['items']}  accuracy {interval_text(summary, 'accuracy')} [{level():.0%} Wilson]"
            f"\nanswer first top-1 {reached_text(summary, 'answer_top1_layer')}"
            f"\nargument first top-1 {reached_text(summary, 'argument_top1_layer')}"
            f"\nof {summary['n_layers']} layers (0 = embeddings)")
