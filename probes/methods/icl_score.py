"""icl-score: Olsson et al.'s in-context learning score on natural text (task kind `text`): the next-token loss at a
late token of each document minus the loss at an early one (token 500 minus token 50 in their paper; here
`--late`/`--early`, defaults 500 and 50; the late token is capped to the last one the model's context can predict,
and the report says so). Negative: later tokens are predicted better, from the context. Each document must reach
the late token (shorter ones are counted and left out). The plot: the mean loss against token index.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from ..errors import ProbeError
from ..stats import interval_text, level, mean
from ..tasks.base import Item, item_columns

EARLY, LATE = 50, 500  # Olsson et al.'s tokens


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(batch, positions) next-token losses (nats): position p's logits (batch, positions, vocab) scored on the token
    it predicts, targets[:, p]. The one computation of the score's losses, for this probe and the training log
    (training/lm_data.py)."""
    return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def _index(value, name: str) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise ProbeError(f"bad --{name} {value!r}; accepted: a token index >= 1")
    return int(value)


def run_icl_score(loaded, items: list[Item], early=EARLY, late=LATE) -> list[dict]:
    early, late = _index(early, "early"), _index(late, "late")
    if early >= late:
        raise ProbeError(f"--early {early} is not before --late {late}; accepted: early < late")
    tok = loaded.tokenizer
    limit = loaded.arch.context_length
    if limit and late > limit - 1:
        late = limit - 1  # token `late` is predicted from the late tokens before it: the context holds late + 1
        if early >= late:
            raise ProbeError(f"--early {early} is not before token {late}, the last this model's context of {limit} "
                             "tokens predicts; accepted: a smaller --early")
    rows = []
    for it in items:
        ids = tok(it.prompt, truncation=bool(limit), max_length=limit).input_ids if limit else tok(it.prompt).input_ids
        cols = {**item_columns(tok, it), "early": early, "late": late}
        if len(ids) <= late:
            rows.append({**cols, "tokens": len(ids), "reaches_late": False})
            continue
        ids = torch.tensor([ids[: late + 1]])
        with loaded.trace(ids):
            logits = loaded.model.output.logits.save()
        loss = token_losses(logits[:, :-1], ids[:, 1:])[0]
        # loss[t - 1] is the loss of predicting token t (0-based) from the t tokens before it
        rows.append({**cols, "tokens": int(ids.shape[1]), "reaches_late": True, "loss_early": float(loss[early - 1]),
                     "loss_late": float(loss[late - 1]), "score": float(loss[late - 1] - loss[early - 1]),
                     "losses": json.dumps([round(float(x), 4) for x in loss])})
    return rows


def summarize_icl_score(df, seed: int = 0) -> dict:
    used = df[df.reaches_late.astype(bool)]
    if not len(used):
        raise ProbeError("no document reaches the late token; accepted: a smaller --late or longer documents")
    return {"documents": int(len(used)), "too_short": int(len(df) - len(used)), "early": int(df.early.iloc[0]),
            "late": int(df.late.iloc[0]),
            **mean(used.score, "score", seed=seed), **mean(used.loss_early, "loss_early", seed=seed),
            **mean(used.loss_late, "loss_late", seed=seed)}


def report_icl_score(df, summary) -> str:
    return (f"documents {summary['documents']} ({summary['too_short']} too short, left out): in-context learning "
            f"score (loss at token {summary['late']} - loss at token {summary['early']}) "
            f"{interval_text(summary, 'score')}\nloss at the early token {interval_text(summary, 'loss_early')}, at "
            f"the late token {interval_text(summary, 'loss_late')}\n"
            f"[{level():.0%} bootstrap intervals over documents]")


def plot_icl_score(df, meta: dict, path) -> None:
    from ..reports.plots import _save, plt

    used = df[df.reaches_late.astype(bool)]
    curves = np.array([json.loads(x) for x in used.losses])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), lw=1)
    ax.set(xscale="log", xlabel="token index", ylabel="next-token loss (nats)",
           title=f"{meta['model']}: loss against position ({len(used)} documents)")
    _save(fig, path)
