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


def next_token_logits(loaded, prompts: list[str]) -> torch.Tensor:
    """(batch, vocab) float logits of the next token after each (left-padded) prompt."""
    with loaded.model.trace(prompts, logits_to_keep=1):
        logits = loaded.model.output.logits[:, -1].save()
    return logits.float()


def rank_of(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """0-based rank of token ids[b] in logits[b, ..., :] (number of strictly larger logits)."""
    target = logits.gather(-1, ids.view(-1, *[1] * (logits.dim() - 1)).expand(*logits.shape[:-1], 1))
    return (logits > target).sum(-1)


def target_ids(loaded, items: list[Item]) -> dict[str, torch.Tensor]:
    """First token ids of each item's answer (as emitted after its prompt) and argument."""
    tok, device = loaded.tokenizer, loaded.arch.unembed_device
    return {"answer": torch.tensor([answer_token(tok, it) for it in items], device=device),
            "argument": torch.tensor([first_token(tok, it.argument) for it in items], device=device)}


def decode_stats(loaded, targets: dict, hidden: torch.Tensor, topk: int = 5, prefix: str = "",
                 logit: bool = False) -> list[list[dict]]:
    """Lens statistics of `hidden` (batch, n, d) as stats[b][index]: top-1 and top-k tokens, and per target its
    rank, reciprocal rank and probability (and raw logit if asked); column names prefixed by `prefix`."""
    tok = loaded.tokenizer
    batch, n = hidden.shape[:2]
    out = [[{} for _ in range(n)] for _ in range(batch)]
    for index in range(n):
        logits = loaded.arch.decode(hidden[:, index])  # (batch, vocab), one index at a time to bound memory
        logp = logits.log_softmax(-1)
        top = logits.topk(topk, dim=-1).indices.tolist()
        cols = {}
        for name, ids in targets.items():
            rank = rank_of(logits, ids)
            cols[f"{name}_rank"] = rank.tolist()
            cols[f"{name}_rr"] = (1.0 / (rank + 1)).tolist()
            cols[f"{name}_prob"] = logp.gather(-1, ids[:, None])[:, 0].exp().tolist()
            if logit:
                cols[f"{name}_logit"] = logits.gather(-1, ids[:, None])[:, 0].tolist()
        for b in range(batch):
            row = out[b][index]
            row[prefix + "top1"] = tok.decode(top[b][0])
            row[prefix + "topk"] = json.dumps([tok.decode(t) for t in top[b]], ensure_ascii=False)
            for key, values in cols.items():
                row[prefix + key] = values[b]
    return out


def run_lens(loaded, items: list[Item], topk: int = 5) -> list[dict]:
    hidden = last_residuals(loaded, [it.prompt for it in items])
    stats = decode_stats(loaded, target_ids(loaded, items), hidden, topk=topk)
    return [{**item_columns(loaded.tokenizer, it), "layer": index, **stats[b][index]}
            for b, it in enumerate(items) for index in range(hidden.shape[1])]


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
