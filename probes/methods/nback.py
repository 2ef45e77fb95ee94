"""nback (Gong & Zhang's working-memory task, prompted): per N, hit rate, false-alarm rate, accuracy and signed
d' = z(H) - z(F), with the log-linear correction (0.5 added to hits and false alarms, 1 to each count). The
model's choice is the likelier of the two allowed responses (" m" or " -") at the answer position; its plain
greedy token is kept too.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from ..errors import ProbeError
from ..tasks.base import Item, first_token, item_columns
from .lens import next_token_logits


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


def nback_table(df):
    import pandas as pd

    out = []
    for n, g in df.groupby("n"):
        match, non = g[g.match], g[~g.match]
        hit, fa, d = dprime(int((match.choice == "m").sum()), len(match), int((non.choice == "m").sum()), len(non))
        out.append({"n": int(n), "trials": len(g), "hit_rate": hit, "false_alarm_rate": fa,
                    "accuracy": float(g.correct.mean()), "dprime": d})
    return pd.DataFrame(out).set_index("n")


def summarize_nback(df) -> dict:
    t = nback_table(df)
    return {"by_n": {int(n): {k: float(v) for k, v in r.items()} for n, r in t.iterrows()},
            "accuracy": float(df.correct.mean())}


def report_nback(df, summary) -> str:
    return nback_table(df).round(3).to_string() + "\n\n(d' signed, log-linear correction; choice = likelier of ' m' / ' -')"


# --- attention ------------------------------------------------------------------------------------------------
