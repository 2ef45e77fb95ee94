"""The logit lens: decode the last position's residual stream at every layer through final norm and unembedding.

Rows are one per prompt x residual index (0 = embedding output, i = output of block i-1, L = last block, whose
lens equals the model's logits). Ranks are 0-based (0 = top-1) and the reciprocal rank is 1 / (rank + 1), as in
Merullo et al.
"""

from __future__ import annotations

import json

import torch

from .tasks import Item, answer_token, first_token, item_columns


def last_residuals(loaded, prompts: list[str]) -> torch.Tensor:
    """(batch, L + 1, d) residual stream at the last position of each (left-padded) prompt, every layer."""
    arch = loaded.arch
    saved = []
    with loaded.model.trace(prompts, logits_to_keep=1):  # the lens decodes itself: skip the full-vocab logits
        for index in range(arch.n_layers + 1):
            saved.append(arch.resid(index)[:, -1].save())
    return torch.stack([s.to(arch.unembed_device) for s in saved], dim=1)


def rank_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of token ids[b] in logits[b, ..., :] (number of strictly larger logits)."""
    target = logits.gather(-1, ids.view(-1, *[1] * (logits.dim() - 1)).expand(*logits.shape[:-1], 1))
    return (logits > target).sum(-1)


def decode_rows(loaded, items: list[Item], hidden: torch.Tensor, topk: int = 5, prefix: str = "") -> list[dict]:
    """Lens statistics of `hidden` (batch, n, d), one row per item x index, column names prefixed by `prefix`."""
    tok = loaded.tokenizer
    targets = {"answer": torch.tensor([answer_token(tok, it) for it in items], device=hidden.device),
               "argument": torch.tensor([first_token(tok, it.argument) for it in items], device=hidden.device)}
    rows = [dict() for _ in range(len(items) * hidden.shape[1])]
    for layer in range(hidden.shape[1]):
        logits = loaded.arch.decode(hidden[:, layer])  # (batch, vocab), one layer at a time to bound memory
        logp = logits.log_softmax(-1)
        top = logits.topk(topk, dim=-1).indices.tolist()
        stats = {}
        for name, ids in targets.items():
            rank = rank_of(logits, ids)
            stats[f"{name}_rank"] = rank.tolist()
            stats[f"{name}_rr"] = (1.0 / (rank + 1)).tolist()
            stats[f"{name}_prob"] = logp.gather(-1, ids[:, None])[:, 0].exp().tolist()
        for b in range(len(items)):
            row = rows[b * hidden.shape[1] + layer]
            row[prefix + "top1"] = tok.decode(top[b][0])
            row[prefix + "topk"] = json.dumps([tok.decode(t) for t in top[b]], ensure_ascii=False)
            for key, values in stats.items():
                row[prefix + key] = values[b]
    return rows


def run_lens(loaded, items: list[Item], topk: int = 5) -> list[dict]:
    hidden = last_residuals(loaded, [it.prompt for it in items])
    stats = decode_rows(loaded, items, hidden, topk=topk)
    n = hidden.shape[1]
    return [{**item_columns(loaded.tokenizer, it), "layer": layer, **stats[b * n + layer]}
            for b, it in enumerate(items) for layer in range(n)]


def summarize_lens(df) -> dict:
    """Accuracy at the last layer and the median first layer at which the answer / argument is top-1."""
    last = df[df.layer == df.layer.max()]
    first = lambda col: df[df[col] == 0].groupby("item").layer.min().reindex(last.item).median()  # noqa: E731
    return {"items": int(last.item.nunique()), "accuracy": float((last.answer_rank == 0).mean()),
            "answer_top1_layer": first("answer_rank"), "argument_top1_layer": first("argument_rank"),
            "n_layers": int(df.layer.max())}


def report_lens(table, summary) -> str:
    """Per-layer top-1 fraction and mean reciprocal rank of answer and argument, then the summary line."""
    by_layer = table.groupby("layer").agg(
        answer_top1=("answer_rank", lambda r: (r == 0).mean()), answer_rr=("answer_rr", "mean"),
        argument_top1=("argument_rank", lambda r: (r == 0).mean()), argument_rr=("argument_rr", "mean"))
    return (by_layer.round(3).to_string()
            + f"\n\nitems {summary['items']}  accuracy {summary['accuracy']:.3f}  "
            f"answer first top-1 at layer {summary['answer_top1_layer']} (median)  "
            f"argument first top-1 at layer {summary['argument_top1_layer']} (median)  "
            f"of {summary['n_layers']} (0 = embeddings)")
