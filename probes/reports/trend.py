"""Trends across replicates: how a metric moves with a numeric setting (an N-back model's N, a task option), with
each run (a trained model, a seed) one replicate. Per group of runs that differ only in that setting and their
seed, and per metric: the least-squares slope with its t interval and a permutation p-value (stats.slope), and
the mean per value of the setting with its t interval. Pooled trials would understate the spread: models trained
from different seeds differ more than the trials of one model do (Gong & Zhang report means and standard errors
across 50 models per N)."""

from __future__ import annotations

import json
import math

import pandas as pd

from ..errors import ProbeError
from ..stats import slope, student_half


REPLICATES = ("model", "seed", "training_run", "path")
TREND_SETUP = ("limit", "options", "dtype", "quantize", "task_version")  # the task's digest and options hold `field`


def parse_trend(spec: str) -> tuple[str, float, float]:
    """'n' -> ('n', -inf, inf); 'n:1-3' -> ('n', 1, 3): the field, and the range of its values the slope is over."""
    field, _, span = spec.partition(":")
    if not span:
        return field, -math.inf, math.inf
    lo, sep, hi = span.partition("-")
    try:
        bounds = float(lo), float(hi)
    except ValueError:
        bounds = None
    if not field or not sep or bounds is None or bounds[0] >= bounds[1]:
        raise ProbeError(f"--trend {spec!r}; accepted: FIELD or FIELD:LOW-HIGH (e.g. n or n:1-3)")
    return field, *bounds


def setting(df: pd.DataFrame, field: str) -> pd.Series:
    """The numeric value of `field` per row: a column (a curve's `n`), else a task option of the run."""
    if field in df:
        values = df[field]
    elif "task_options" in df:
        values = df.task_options.map(lambda o: _one(json.loads(o).get(field)) if isinstance(o, str) else None)
    else:
        values = pd.Series([None] * len(df), index=df.index)
    return pd.to_numeric(values, errors="coerce")


def _one(value):
    """A task option's value, a one-element list (an N-back task at one N: n: [2]) as its element."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def trend_table(df: pd.DataFrame, spec: str, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per group (`by`, without the field) and metric: runs, the slope over the field of `spec` (FIELD or
    FIELD:LOW-HIGH, parse_trend) with its interval, standard error and permutation p-value, and `mean_at_<value>`
    (t interval `_lo`/`_hi`) per value of the field. `df` has one row per run (a replicate); rows without a numeric
    value of the field in range are left out."""
    field, lo, hi = parse_trend(spec)
    x = setting(df, field)
    df = df.assign(_x=x)[x.notna() & (x >= lo) & (x <= hi)]
    if df.empty:
        return pd.DataFrame()
    # the runs are the replicates (never a key), and runs of another setup are never pooled (as aggregate.group)
    keys = [c for c in [*by, *TREND_SETUP] if c in df and c != field and c not in REPLICATES]
    keys = list(dict.fromkeys(keys))
    rows = []
    for key, sub in (df.groupby(keys, dropna=False, sort=False) if keys else [((), df)]):
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            d = sub[["_x", m]].apply(pd.to_numeric, errors="coerce").dropna()
            if d._x.nunique() < 2:
                continue
            row = {**dict(zip(keys, key)), "metric": m, "runs": len(d),
                   **{k.replace(f"{m}_", "", 1): v for k, v in slope(d._x, d[m], m).items()}}
            for value, at in d.groupby("_x")[m]:
                half = student_half(at.std(), len(at))
                label = f"{value:g}"
                row.update({f"mean_at_{label}": at.mean(), f"mean_at_{label}_lo": at.mean() - half,
                            f"mean_at_{label}_hi": at.mean() + half, f"runs_at_{label}": len(at)})
            rows.append(row)
    return pd.DataFrame(rows)


def headline_metrics(df: pd.DataFrame) -> list[str]:
    """The metrics of a per-run table that carry an interval (x with x_lo and x_hi), the counts and bounds aside."""
    return [c for c in df if f"{c}_lo" in df and f"{c}_hi" in df and pd.api.types.is_numeric_dtype(
        pd.to_numeric(df[c], errors="coerce"))]


def check_field(field: str, found: bool) -> None:
    if not found:
        raise ProbeError(f"--trend {field!r}: no group of runs has two or more values of a numeric {field!r} (a "
                         "task option, a curve's dimension or a training config field); accepted: such a field, "
                         "e.g. n, over runs that differ in it")
