"""Accuracy of plain greedy answers: is the answer's first token the model's top-1 next token?

`correct` is the paper's strict rule (top-1 == the answer's first token as the tokenizer writes it).
`consistent` is looser: the top-1 token's text is a non-blank prefix of the answer (" S" for " SOLVE"), for
models that would spell the right answer with other tokens.
"""

from __future__ import annotations

import torch

from .lens import excluded_ids, next_token_logits, rank_of, restrict, special_flags
from ..stats import interval_text, level, proportion
from ..tasks.base import Item, answer_token, item_columns


def run_accuracy(loaded, items: list[Item], vocab: str | None = None) -> list[dict]:
    tok = loaded.tokenizer
    logits = restrict(next_token_logits(loaded, [it.prompt for it in items]), excluded_ids(tok, vocab))
    ids = torch.tensor([answer_token(tok, it) for it in items], device=logits.device)
    rank = rank_of(logits, ids).tolist()
    prob = logits.softmax(-1).gather(-1, ids[:, None])[:, 0].tolist()
    top = logits.argmax(-1).tolist()
    predicted, special = [tok.decode(t) for t in top], special_flags(tok, top)
    return [{**item_columns(tok, it), "predicted": predicted[b], "correct": rank[b] == 0,
             "consistent": bool(predicted[b].strip()) and it.answer.startswith(predicted[b]),
             "answer_rank": rank[b], "answer_prob": prob[b], "special_top1": special[b]} for b, it in enumerate(items)]


def summarize_accuracy(df, seed: int = 0) -> dict:
    n = len(df)
    out = {"items": int(n), **proportion(int(df.correct.sum()), n, "accuracy"),
           **proportion(int(df.consistent.sum()), n, "consistent")}
    if "group" in df:
        groups = df.groupby(df["group"].astype("string").fillna(""))
        if len(groups) > 1:
            out["by_group"] = {str(g): proportion(int(sub.correct.sum()), len(sub), "accuracy") for g, sub in groups}
    return out


def report_accuracy(df, summary) -> str:
    lines = [f"items {summary['items']}  accuracy {interval_text(summary, 'accuracy')}  "
             f"(top-1 a prefix of the answer: {interval_text(summary, 'consistent')})"]
    for group, acc in summary.get("by_group", {}).items():
        lines.append(f"  {group}: {interval_text(acc, 'accuracy')}")
    return "\n".join(lines) + f"\n[{level():.0%} Wilson intervals; (right/items)]"
