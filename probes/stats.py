"""Uncertainty for every figure a user reads: one module, used by every probe, aggregate, plot and report.

- proportions (accuracy, top-1, hit and false-alarm rates, consistency): Wilson score intervals;
- means of per-item values (reciprocal rank, logit differences, entropy) and figures derived from items (d' from
  hit and false-alarm counts, differences between conditions): a seeded percentile bootstrap over items;
- two conditions on the same items (with vs without o, ablated vs not): an exact McNemar test for right/wrong
  outcomes, a sign-flip permutation test for paired values;
- a figure picked as the best of K (a block, a scale): its interval at level 1 - (1 - level) / K (Bonferroni).

The level is 0.95 unless set with `confidence(level)` (the command's --ci).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

_LEVEL = contextvars.ContextVar("confidence_level", default=0.95)
BOOTSTRAP_SAMPLES = 2000


def level() -> float:
    """The confidence level in force (0.95 by default)."""
    return _LEVEL.get()


@contextlib.contextmanager
def confidence(value: float):
    """Intervals computed inside the block use `value` (e.g. 0.9)."""
    token = _LEVEL.set(float(value))
    try:
        yield
    finally:
        _LEVEL.reset(token)


def _z(conf: float) -> float:
    return NormalDist().inv_cdf(0.5 + conf / 2)


def wilson(k: int, n: int, conf: float | None = None) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n == 0."""
    if n == 0:
        return math.nan, math.nan
    z = _z(level() if conf is None else conf)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def proportion(k: int, n: int, name: str, conf: float | None = None) -> dict:
    """{name: k/n, name_lo, name_hi, name_n}: a rate with its interval and count, as summaries carry it."""
    lo, hi = wilson(int(k), int(n), conf)
    return {name: (k / n) if n else None, f"{name}_lo": finite_or_none(lo), f"{name}_hi": finite_or_none(hi), f"{name}_n": int(n),
            f"{name}_k": int(k)}


def _draws(statistic: Callable[..., float], samples: Sequence, seed: int, n_boot: int,
           vectorized: bool) -> tuple[float, np.ndarray]:
    """(statistic on the data, its values on n_boot resamples of the items, non-finite ones dropped)."""
    arrays = [np.asarray(s, dtype=float) for s in samples]
    n = len(arrays[0])
    if n == 0:
        return math.nan, np.array([])
    value = float(statistic(*arrays))
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    if vectorized:
        stats = np.asarray(statistic(*(a[idx] for a in arrays)), dtype=float)
    else:
        stats = np.array([statistic(*(a[i] for a in arrays)) for i in idx], dtype=float)
    return value, stats[np.isfinite(stats)]


def _percentiles(draws: np.ndarray, conf: float | None) -> tuple[float, float]:
    if not len(draws):
        return math.nan, math.nan
    alpha = 1 - (level() if conf is None else conf)
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap(statistic: Callable[..., float], *samples: Sequence, conf: float | None = None, seed: int = 0,
              n_boot: int = BOOTSTRAP_SAMPLES, vectorized: bool = False) -> tuple[float, float, float]:
    """(statistic, lo, hi): a percentile bootstrap that resamples items (the same indices in every sample, so
    paired samples stay paired). `statistic` takes the arrays and returns a number; `vectorized`: it takes arrays
    of shape (resamples, items) and returns one number per resample (much faster)."""
    value, draws = _draws(statistic, samples, seed, n_boot, vectorized)
    return (value, *_percentiles(draws, conf))


def difference(statistic: Callable[..., float], a: Sequence[Sequence], b: Sequence[Sequence],
               conf: float | None = None, seed: int = 0, n_boot: int = BOOTSTRAP_SAMPLES) -> tuple[float, float, float]:
    """(statistic(*a) - statistic(*b), lo, hi) for two conditions on different items (e.g. the FFN-ablation drop of
    an abstractive and of an extractive task): each resampled on its own; `statistic` vectorized as in bootstrap."""
    va, da = _draws(statistic, a, seed, n_boot, True)
    vb, db = _draws(statistic, b, seed + 1, n_boot, True)
    m = min(len(da), len(db))
    return (va - vb, *_percentiles(da[:m] - db[:m], conf))


def mean(values: Sequence, name: str, conf: float | None = None, seed: int = 0) -> dict:
    """{name: mean, name_lo, name_hi, name_n}, the interval from the bootstrap over items."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    m, lo, hi = bootstrap(lambda x: x.mean(-1), values, conf=conf, seed=seed, vectorized=True)
    return {name: finite_or_none(m), f"{name}_lo": finite_or_none(lo), f"{name}_hi": finite_or_none(hi), f"{name}_n": int(len(values))}


def student_half(sd: float, n: int, conf: float | None = None) -> float:
    """Half-width of the t interval of a mean of `n` replicates (seeds) with standard deviation `sd`; nan if n < 2."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.5 + (level() if conf is None else conf) / 2, n - 1) * sd / math.sqrt(n))


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired right/wrong outcomes (a[i], b[i]) on the same items."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def sign_flip(a: Sequence[float], b: Sequence[float], seed: int = 0, n_perm: int = 10000) -> float:
    """Two-sided permutation p-value for the mean of paired differences a - b (signs flipped at random)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if not len(d) or not np.any(d):
        return 1.0
    rng = np.random.default_rng(seed)
    flips = rng.choice([-1.0, 1.0], size=(n_perm, len(d)))
    observed = abs(d.mean())
    return float((np.sum(np.abs((flips * d).mean(axis=1)) >= observed - 1e-12) + 1) / (n_perm + 1))


def best_of(k: int, conf: float | None = None) -> float:
    """The level for the interval of a figure picked as the best of `k` (Bonferroni)."""
    return 1 - (1 - (level() if conf is None else conf)) / max(1, k)


def halves(items: Sequence, seed: int = 0, strata: Sequence | None = None) -> tuple[set, set]:
    """Items split at random (seeded) into (selecting half, reporting half), within each stratum if given (each N
    of an N-back task), for figures picked as a best (block, scale, head) and reported where they were not picked.
    A stratum of one item cannot be split: that item is in both halves (callers say so)."""
    items = list(items)
    strata = [0] * len(items) if strata is None else list(strata)
    select, report = set(), set()
    for key in sorted(set(strata)):
        group = sorted({i for i, s in zip(items, strata) if s == key})
        perm = np.random.default_rng([seed, int(key)]).permutation(group).tolist()
        cut = len(perm) // 2 if len(perm) > 1 else 1
        select |= set(perm[:cut])
        report |= set(perm[cut:] if len(perm) > 1 else perm)
    return select, report


def median_reached(values: Sequence, total: int, name: str) -> dict:
    """{name: median of the items that reach an event, name_reached: how many did, name_of: of how many}; the
    median is None when none did (never a bare nan)."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    return {name: float(np.median(values)) if len(values) else None, f"{name}_reached": int(len(values)),
            f"{name}_of": int(total)}


def interval_text(summary: dict, name: str, digits: int = 3) -> str:
    """'0.602 [0.532, 0.668] (118/196)' for a proportion, '0.41 [0.38, 0.44] (n=196)' for a mean."""
    value = summary.get(name)
    if value is None:
        return "n/a (no items)"
    lo, hi = summary.get(f"{name}_lo"), summary.get(f"{name}_hi")
    band = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if lo is not None and hi is not None else ""
    count = (f" ({summary[f'{name}_k']}/{summary[f'{name}_n']})" if f"{name}_k" in summary
             else f" (n={summary[f'{name}_n']})" if f"{name}_n" in summary else "")
    return f"{value:.{digits}f}{band}{count}"


def finite_or_none(x) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else float(x)


def permutation(a: Sequence[float], b: Sequence[float], seed: int = 0, n_perm: int = 20000) -> float:
    """Two-sided permutation p-value for the difference of means of two independent groups (seeds of two variants):
    every relabelling when there are at most n_perm of them (5 + 5 seeds: 252), else n_perm random ones."""
    import itertools

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled, k = np.concatenate([a, b]), len(a)
    if not len(a) or not len(b):
        return 1.0
    observed = abs(a.mean() - b.mean())
    if math.comb(len(pooled), k) <= n_perm:
        picks = np.array([list(c) for c in itertools.combinations(range(len(pooled)), k)])
    else:
        rng = np.random.default_rng(seed)
        picks = np.argsort(rng.random((n_perm, len(pooled))), axis=1)[:, :k]
    chosen = np.zeros((len(picks), len(pooled)), dtype=bool)
    chosen[np.arange(len(picks))[:, None], picks] = True
    diffs = np.abs(np.where(chosen, pooled, 0).sum(1) / k - np.where(~chosen, pooled, 0).sum(1) / (len(pooled) - k))
    return float(np.mean(diffs >= observed - 1e-9))


def reached_text(summary: dict, name: str, where: str = "layer") -> str:
    """'at layer 13.5 (median of 141 of 196 items; 55 never)', or 'never (none of 196 items)'."""
    k, n = summary[f"{name}_reached"], summary[f"{name}_of"]
    if not k:
        return f"never (none of {n} items)"
    return f"at {where} {summary[name]:g} (median of {k} of {n} items" + (f"; {n - k} never)" if n > k else ")")


def slope(x: Sequence[float], y: Sequence[float], name: str, conf: float | None = None, seed: int = 0,
          n_perm: int = 10000) -> dict:
    """A trend across replicates (models, one value each): the least-squares slope of y on x with its standard
    error and t interval (n - 2 degrees of freedom), and a two-sided permutation p-value (x shuffled across the
    replicates). {name_slope, _lo, _hi, _se, _p, _n}; nan where fewer than 3 replicates or one value of x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    out = {f"{name}_slope": None, f"{name}_slope_lo": None, f"{name}_slope_hi": None, f"{name}_slope_se": None,
           f"{name}_slope_p": None, f"{name}_slope_n": int(n)}
    if n < 3 or np.ptp(x) == 0:
        return out
    from scipy.stats import t

    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc ** 2).sum())
    resid = y - y.mean() - b * xc
    se = math.sqrt(float((resid ** 2).sum()) / (n - 2) / float((xc ** 2).sum()))
    half = float(t.ppf(0.5 + (level() if conf is None else conf) / 2, n - 2)) * se
    rng = np.random.default_rng(seed)
    shuffled = np.stack([rng.permutation(xc) for _ in range(n_perm)])  # the slope's numerator under relabelling
    null = np.abs(shuffled @ (y - y.mean()))
    p = float((1 + np.sum(null >= abs(b) * (xc ** 2).sum() - 1e-12)) / (n_perm + 1))
    return {**out, f"{name}_slope": b, f"{name}_slope_lo": b - half, f"{name}_slope_hi": b + half,
            f"{name}_slope_se": se, f"{name}_slope_p": p}
