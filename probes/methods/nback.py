"""nback (Gong & Zhang's working-memory task, prompted): per N, hit rate, false-alarm rate, accuracy and signed
d' = z(H) - z(F), with the log-linear correction (0.5 added to hits and false alarms, 1 to each count). The
model's choice is the likelier of the two allowed responses (" m" or " -") at the answer position; its plain
greedy token is kept too.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from ..errors import ProbeError
from ..stats import bootstrap, finite_or_none, interval_text, level, proportion
from ..tasks.base import Item, first_token, item_columns
from .readout import next_token_logits


def run_nback(loaded, items: list[Item]) -> list[dict]:
    if not items or "match" not in items[0].extra:
        raise ProbeError("the nback probe needs N-back trials; accepted: --task nback")
    tok = loaded.tokenizer
    m_id, n_id = first_token(tok, " m"), first_token(tok, " -")
    if m_id == n_id:
        raise ProbeError(f"{loaded.spec.name}'s tokenizer gives ' m' and ' -' the same first token")
    logits = next_token_logits(loaded, [it.prompt for it in items])
    pair = logits[:, [m_id, n_id]].log_softmax(-1).exp()[:, 0].tolist()
    top = logits.argmax(-1).tolist()
    rows = []
    for b, it in enumerate(items):
        choice = "m" if pair[b] > 0.5 else "-"
        rows.append({**item_columns(tok, it), "p_match": pair[b], "choice": choice, "correct": choice == it.output,
                     "greedy": tok.decode(top[b])})
    return rows


def dprime(hits: int, n_signal: int, false_alarms: int, n_noise: int) -> tuple[float, float, float]:
    """(hit rate, false-alarm rate, d') with the log-linear correction; d' is signed."""
    h = (hits + 0.5) / (n_signal + 1)
    f = (false_alarms + 0.5) / (n_noise + 1)
    z = NormalDist().inv_cdf
    return hits / n_signal if n_signal else math.nan, false_alarms / n_noise if n_noise else math.nan, z(h) - z(f)


def _dprime_resampled(match, said_m):
    """Signed d' with the log-linear correction per resample (rows of the (resamples, trials) arrays)."""
    match, said_m = match.astype(bool), said_m.astype(bool)
    h = ((match & said_m).sum(-1) + 0.5) / (match.sum(-1) + 1)
    f = ((~match & said_m).sum(-1) + 0.5) / ((~match).sum(-1) + 1)
    z = np.vectorize(NormalDist().inv_cdf)
    return z(h) - z(f)


def nback_table(df, seed: int = 0):
    """Per N: trials, hit and false-alarm rates and accuracy with Wilson intervals, d' with a bootstrap interval
    over trials."""
    import pandas as pd

    out = []
    for n, g in df.groupby("n"):
        match, non = g[g.match], g[~g.match]
        hits, fas = int((match.choice == "m").sum()), int((non.choice == "m").sum())
        _, _, d = dprime(hits, len(match), fas, len(non))
        _, d_lo, d_hi = bootstrap(_dprime_resampled, g.match.to_numpy(), (g.choice == "m").to_numpy(),
                                  seed=[seed, int(n)], vectorized=True)
        row = {"n": int(n), "trials": len(g), **proportion(hits, len(match), "hit_rate"),
               **proportion(fas, len(non), "false_alarm_rate"), **proportion(int(g.correct.sum()), len(g), "accuracy"),
               "dprime": d, "dprime_lo": d_lo, "dprime_hi": d_hi}
        out.append(row)
    return pd.DataFrame(out).set_index("n")


def summarize_nback(df, seed: int = 0) -> dict:
    t = nback_table(df, seed)
    return {"by_n": {int(n): {k: finite_or_none(v) for k, v in r.items()} for n, r in t.iterrows()},
            **proportion(int(df.correct.sum()), len(df), "accuracy")}


def report_nback(df, summary) -> str:
    t = nback_table(df)
    shown = t[["trials", "hit_rate", "false_alarm_rate", "accuracy", "accuracy_lo", "accuracy_hi", "dprime",
               "dprime_lo", "dprime_hi"]]
    return (shown.round(3).to_string() + f"\n\naccuracy over all {len(df)} trials {interval_text(summary, 'accuracy')}"
            f"\n(d' signed, log-linear correction, {level():.0%} bootstrap interval over trials; rates with "
            f"{level():.0%} Wilson intervals; choice = likelier of ' m' / ' -')")
