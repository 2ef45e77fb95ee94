"""Accuracy of plain greedy answers: is the answer's first token the model's top-1 next token?

`correct` is the paper's strict rule (top-1 == the answer's first token as the tokenizer writes it).
`consistent` is looser: the top-1 token's text is a non-blank prefix of the answer (" S" for " SOLVE"), for
models that would spell the right answer with other tokens.
"""

from __future__ import annotations

import torch

from .readout import excluded_ids, next_token_logits, rank_of, restrict, special_flags
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


WHOLE = ("tree", "sequence")  # item columns that tie steps into one whole (a tree's path, an N-back sequence)


def summarize_accuracy(df, seed: int = 0) -> dict:
    """Accuracy (and top-1 a prefix of the answer) with Wilson intervals, by group; where items are the steps of
    a whole (a tree's path, an N-back sequence), also how many wholes have every step right (teacher-forced)."""
    n = len(df)
    out = {"items": int(n), **proportion(int(df.correct.sum()), n, "accuracy"),
           **proportion(int(df.consistent.sum()), n, "consistent")}
    group = df["group"].astype("string").fillna("") if "group" in df else None
    if group is not None and group.nunique() > 1:
        subs = dict(list(df.groupby(group)))
        order = sorted(subs, key=lambda g: (0, int(g), "") if str(g).isdigit() else (1, 0, str(g)))  # 2 before 13
        out["by_group"] = {str(g): proportion(int(subs[g].correct.sum()), len(subs[g]), "accuracy") for g in order}
    unit = next((c for c in WHOLE if c in df), None)
    if unit is not None and _complete(df, unit):
        whole = df.assign(group=group if group is not None else "").groupby(unit).agg(
            right=("correct", "all"), group=("group", "first"))
        out["whole_unit"] = unit
        out.update(proportion(int(whole.right.sum()), len(whole), "whole_accuracy"))
        if "by_group" in out:
            for g, sub in whole.groupby("group"):
                out["by_group"][str(g)].update(proportion(int(sub.right.sum()), len(sub), "whole_accuracy"))
    return out


def _complete(df, unit: str) -> bool:
    """Whether every whole has all its steps (a --limit sample has some steps of some wholes): a tree as many as
    its path's length, N-back sequences all the same number."""
    sizes = df.groupby(unit).size()
    if "path_length" in df:
        return bool((sizes == df.groupby(unit).path_length.first()).all())
    return sizes.nunique() == 1


def report_accuracy(df, summary) -> str:
    lines = [f"items {summary['items']}  accuracy {interval_text(summary, 'accuracy')}  "
             f"(top-1 a prefix of the answer: {interval_text(summary, 'consistent')})"]
    if "whole_unit" in summary:
        lines.append(f"every step of a {summary['whole_unit']} right: {interval_text(summary, 'whole_accuracy')}")
    for group, acc in summary.get("by_group", {}).items():
        lines.append(f"  {group}: {interval_text(acc, 'accuracy')}"
                     + (f"; whole {summary['whole_unit']}s {interval_text(acc, 'whole_accuracy')}"
                        if "whole_accuracy" in acc else ""))
    return "\n".join(lines) + f"\n[{level():.0%} Wilson intervals; (right/items)]"
