"""induction: Olsson et al.'s induction-head score and in-context copying, on repeated random sequences (task
`repeat`). For each head, the attention from each token of the repeat to the token just after that token's first
occurrence (mean over the repeat's tokens but its first); for the model, the mean next-token loss over the first
pass and over the repeat (what it copies from context).

Rows: one per item, layer and head (the score), plus one per item with the two losses. Summary: each head's mean
score with a bootstrap interval over items; the best head (chosen on half the items, its score reported on the
other half, since the best of many heads is biased upward); heads scoring above 0.4; the loss drop.
"""

from __future__ import annotations

import torch

from ..errors import ProbeError
from ..stats import halves, interval_text, level, mean
from ..tasks.base import Item, item_columns
from ..tasks.repeat import repeat_start
from .attention import attention_weights

THRESHOLD = 0.4  # a head whose score passes this is counted as an induction head


def run_induction(loaded, items: list[Item]) -> list[dict]:
    tok = loaded.tokenizer
    rows = []
    for it in items:
        start = repeat_start(tok, it.prompt)
        if start is None:
            raise ProbeError(f"item {it.index} is not a repeated sequence for {loaded.spec.name}'s tokenizer; "
                             "accepted: --task repeat")
        ids = torch.tensor([tok(it.prompt).input_ids])
        weights, logits = attention_weights(loaded, ids, with_logits=True)
        k = ids.shape[1] - start  # segment length in tokens
        queries = torch.arange(start + 1, ids.shape[1])  # the repeat's tokens but its first
        keys = queries - k + 1  # the token after each one's first occurrence
        cols = item_columns(tok, it)
        for layer, w in enumerate(weights):
            score = w[:, queries, keys].mean(-1)  # (heads,)
            rows += [{**cols, "layer": layer, "head": h, "score": float(score[h])} for h in range(len(score))]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        first, repeat = loss[start - k: start - 1], loss[start:]  # predicting tokens of each pass but its first
        rows.append({**cols, "layer": None, "head": None, "loss_first": float(first.mean()),
                     "loss_repeat": float(repeat.mean()), "tokens": int(k)})
    return rows


def summarize_induction(df, seed: int = 0) -> dict:
    heads = df.dropna(subset=["head"]).astype({"layer": int, "head": int})
    per = {f"{l}.{h}": mean(g.score, "score", seed=seed) for (l, h), g in heads.groupby(["layer", "head"])}
    select, report = halves(sorted(heads.item.unique()), seed)
    chosen = heads[heads.item.isin(select)].groupby(["layer", "head"]).score.mean().idxmax()
    held = heads[heads.item.isin(report) & (heads.layer == chosen[0]) & (heads["head"] == chosen[1])].score
    losses = df[df["head"].isna()]
    out = {"items": int(heads.item.nunique()), "heads": per,
           "best_head": f"{chosen[0]}.{chosen[1]}", **mean(held, "best_head_score", seed=seed),
           "induction_heads": sorted(k for k, v in per.items() if v["score"] > THRESHOLD),
           **mean(losses.loss_first, "loss_first", seed=seed), **mean(losses.loss_repeat, "loss_repeat", seed=seed),
           **mean(losses.loss_first - losses.loss_repeat, "loss_drop", seed=seed)}
    return out


def report_induction(df, summary) -> str:
    top = sorted(summary["heads"].items(), key=lambda kv: -kv[1]["score"])[:5]
    lines = [f"items {summary['items']}: best head {summary['best_head']} (chosen on half the items), on the other "
             f"half {interval_text(summary, 'best_head_score')}",
             f"heads scoring above {THRESHOLD}: {', '.join(summary['induction_heads']) or 'none'}",
             "top heads (layer.head): " + "; ".join(f"{k} {interval_text(v, 'score')}" for k, v in top),
             f"loss on the first pass {interval_text(summary, 'loss_first')}, on the repeat "
             f"{interval_text(summary, 'loss_repeat')}: drop {interval_text(summary, 'loss_drop')}"]
    return "\n".join(lines) + f"\n[{level():.0%} bootstrap intervals over items]"


def plot_induction(df, meta: dict, path) -> None:
    from ..reports.plots import _save, plt

    heads = df.dropna(subset=["head"]).astype({"layer": int, "head": int})
    grid = heads.groupby(["layer", "head"]).score.mean().unstack()
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * grid.shape[1] + 2), max(3, 0.3 * grid.shape[0] + 1.5)))
    im = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
    ax.set(xlabel="head", ylabel="layer", title=f"{meta['model']}: induction score (repeated sequences)")
    fig.colorbar(im, ax=ax)
    _save(fig, path)
