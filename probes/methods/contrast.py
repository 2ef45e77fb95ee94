"""logit-difference: the answer against the item's argument as the next token, per item: the logit difference, both
probabilities, and which is preferred. On IOI prompts (tasks/ioi.py) that is the indirect object against the
repeated subject (Burns, Fukai & Earls' measure: P(IO) against P(S), here on many prompts and with intervals); on a
relational task, recalling the answer against copying the argument.

Summary: mean logit difference, mean P(answer), P(argument) and their difference, each with a bootstrap interval
over items, and the share of items whose answer is more likely (Wilson), overall and by group (IOI: which name the
sentence opens with).
"""

from __future__ import annotations

import dataclasses

import torch

from ..stats import interval_text, level, mean, proportion
from ..tasks.base import Item, answer_token, item_columns
from .readout import next_token_logits


def run_contrast(loaded, items: list[Item]) -> list[dict]:
    tok = loaded.tokenizer
    logits = next_token_logits(loaded, [it.prompt for it in items])
    answer = torch.tensor([answer_token(tok, it) for it in items], device=logits.device)
    # the argument as it would be emitted after the prompt, like the answer
    argument = torch.tensor([answer_token(tok, dataclasses.replace(it, answer=it.argument)) for it in items],
                            device=logits.device)
    probs = logits.softmax(-1)
    la, lb = logits.gather(-1, answer[:, None])[:, 0], logits.gather(-1, argument[:, None])[:, 0]
    pa, pb = probs.gather(-1, answer[:, None])[:, 0], probs.gather(-1, argument[:, None])[:, 0]
    return [{**item_columns(tok, it), "logit_diff": float(la[b] - lb[b]), "answer_prob": float(pa[b]),
             "argument_prob": float(pb[b]), "prob_diff": float(pa[b] - pb[b]), "answer_preferred": bool(la[b] > lb[b])}
            for b, it in enumerate(items)]


def _summary(df, seed: int) -> dict:
    return {**mean(df.logit_diff, "logit_diff", seed=seed), **mean(df.answer_prob, "answer_prob", seed=seed),
            **mean(df.argument_prob, "argument_prob", seed=seed), **mean(df.prob_diff, "prob_diff", seed=seed),
            **proportion(int(df.answer_preferred.sum()), len(df), "answer_preferred")}


def summarize_contrast(df, seed: int = 0) -> dict:
    out = {"items": int(len(df)), **_summary(df, seed)}
    if "group" in df and df.group.nunique() > 1:
        out["by_group"] = {str(g): _summary(sub, seed) for g, sub in df.groupby("group")}
    return out


def report_contrast(df, summary) -> str:
    lines = [f"items {summary['items']}: answer over argument preferred {interval_text(summary, 'answer_preferred')}",
             f"logit difference {interval_text(summary, 'logit_diff')}",
             f"P(answer) {interval_text(summary, 'answer_prob')}  P(argument) {interval_text(summary, 'argument_prob')}"
             f"  difference {interval_text(summary, 'prob_diff')}"]
    for g, s in summary.get("by_group", {}).items():
        lines.append(f"  {g}: preferred {interval_text(s, 'answer_preferred')}; logit difference "
                     f"{interval_text(s, 'logit_diff')}")
    return "\n".join(lines) + f"\n[{level():.0%} intervals: Wilson for the share, bootstrap over items for means]"
