"""Tables across training runs: the runs of one config (a sweep's `set` values x seeds) grouped by what varies
between them (e.g. model.value_residual), their evaluation curves pooled over seeds with t bands, and the steps each
run takes to reach given levels of its headline test accuracy (the generator's `milestone`), and every metric's
value at the end of training, compared between variants.

A training run's log.csv holds every evaluation (step, eval_<set>_accuracy, eval_<set>_loss, other eval_ metrics);
seeds are the replicates, so intervals are over seeds (Student t), never over the sequences of one test set.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..stats import finite_or_none, level, permutation, student_half

LEVELS = (0.5, 0.95)


def training_runs(folder: Path) -> list[dict]:
    """meta.json of every complete training run under `folder`, with its log ('log' DataFrame) and path."""
    runs = []
    for meta_path in sorted(Path(folder).rglob("meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        log = meta_path.parent / "log.csv"
        if isinstance(meta, dict) and meta.get("kind") == "training" and meta.get("status") == "complete" and log.exists():
            runs.append({**meta, "path": str(meta_path.parent), "log": pd.read_csv(log)})
    return runs


def _flat(cfg: dict) -> dict:
    return {f"{section}.{k}": json.dumps(v) if isinstance(v, (list, dict)) else v
            for section in ("task", "model", "train") for k, v in cfg.get(section, {}).items()}


def label_runs(runs: list[dict]) -> pd.DataFrame:
    """One row per run: training_config, variant ('value_residual=previous', from the fields that differ between
    the runs of its config, the seed aside), seed, path."""
    rows = []
    for name in sorted({r["config"]["name"] for r in runs}):
        mine = [r for r in runs if r["config"]["name"] == name]
        flats = [_flat(r["config"]) for r in mine]
        keys = sorted({k for f in flats for k in f})
        varying = [k for k in keys if k != "train.seed" and len({json.dumps(f.get(k)) for f in flats}) > 1]
        for r, f in zip(mine, flats):
            variant = ", ".join(f"{k.split('.', 1)[1]}={f.get(k)}" for k in varying) or "all"
            rows.append({"training_config": name, "variant": variant, "seed": f.get("train.seed"), "path": r["path"]})
    return pd.DataFrame(rows)


def curves(runs: list[dict]) -> pd.DataFrame:
    """training_config, variant, step, metric, mean, lo, hi, seeds: each eval metric over seeds at each step."""
    labels = label_runs(runs)
    long = []
    for r, (_, lab) in zip(sorted(runs, key=lambda r: r["path"]), labels.sort_values("path").iterrows()):
        log = r["log"]
        metrics = [c for c in log if c.startswith("eval_")]
        m = log.melt(id_vars="step", value_vars=metrics, var_name="metric").dropna(subset=["value"])
        long.append(m.assign(training_config=lab.training_config, variant=lab.variant, seed=lab.seed))
    if not long:
        return pd.DataFrame()
    df = pd.concat(long)
    g = df.groupby(["training_config", "variant", "metric", "step"]).value
    out = g.agg(mean="mean", sd="std", seeds="count").reset_index()
    half = [student_half(sd, n) for sd, n in zip(out.sd, out.seeds)]
    out["lo"], out["hi"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns="sd")[["training_config", "variant", "metric", "step", "mean", "lo", "hi", "seeds"]]


def reached(log: pd.DataFrame, metric: str, level: float) -> float | None:
    """The step at which `metric` first reaches `level`, linearly interpolated between the two evaluations around
    it (the first evaluation itself if it is already there); None if it never does."""
    d = log.dropna(subset=[metric]).sort_values("step")
    steps, values = d.step.to_numpy(float), d[metric].to_numpy(float)
    above = np.flatnonzero(values >= level)
    if not len(above):
        return None
    i = above[0]
    if i == 0:
        return float(steps[0])
    s0, s1, v0, v1 = steps[i - 1], steps[i], values[i - 1], values[i]
    return float(s0 + (level - v0) / (v1 - v0) * (s1 - s0))


def milestones(runs: list[dict], levels=LEVELS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per run: the step each level is reached; per variant and level: runs reaching it, mean step with its t
    interval, and against the baseline variant (the one named none, else the first): the difference of means with
    a bootstrap interval over seeds, how much sooner in %, and a permutation p-value)."""
    from ..training.data import GENERATORS

    labels = label_runs(runs).set_index("path")
    per_run = []
    for r in runs:
        generator = GENERATORS.get(r["config"].get("task", {}).get("generator", "nback"))
        metric = generator.milestone if generator else None
        if metric is None or metric not in r["log"]:
            continue
        lab = labels.loc[r["path"]]
        for level in levels:
            per_run.append({"training_config": lab.training_config, "variant": lab.variant, "seed": lab.seed,
                            "metric": metric, "level": level, "step": reached(r["log"], metric, level),
                            "last_step": int(r["log"].step.max())})
    per_run = pd.DataFrame(per_run)
    rows = []
    if not len(per_run):
        return per_run, pd.DataFrame()
    for (config, metric, level), sub in per_run.groupby(["training_config", "metric", "level"], sort=False):
        variants = list(dict.fromkeys(sub.variant))
        base = _baseline(variants)
        base_steps = sub[sub.variant == base].step.dropna().to_numpy(float)
        for v in variants:
            s = sub[sub.variant == v]
            steps = s.step.dropna().to_numpy(float)
            m = steps.mean() if len(steps) else np.nan
            half = student_half(steps.std(ddof=1), len(steps)) if len(steps) > 1 else np.nan
            row = {"training_config": config, "variant": v, "metric": metric, "level": level,
                   "reached": len(steps), "runs": len(s), "mean_step": finite_or_none(m),
                   "mean_step_lo": finite_or_none(m - half), "mean_step_hi": finite_or_none(m + half),
                   "baseline": base}
            complete = len(steps) == len(s) and len(base_steps) == (sub.variant == base).sum()
            if v != base and complete and len(steps) > 1 and len(base_steps) > 1:
                diff, lo, hi = _difference(steps, base_steps)
                row.update(difference=diff, difference_lo=lo, difference_hi=hi,
                           sooner_pct=finite_or_none(-100 * diff / base_steps.mean()),
                           p_permutation=permutation(steps, base_steps))
            rows.append(row)
    return per_run, pd.DataFrame(rows)


def _baseline(variants: list[str]) -> str:
    return next((v for v in variants if v.endswith("=none")), variants[0])


def finals(runs: list[dict]) -> pd.DataFrame:
    """Per config, metric and variant: the value at each run's last evaluation, its mean over seeds with a t
    interval, and against the baseline variant the difference of means (bootstrap over seeds) and a permutation
    p-value."""
    last = final_values(runs)
    rows = []
    for (config, metric), sub in last.groupby(["training_config", "metric"], sort=False):
        variants = list(dict.fromkeys(sub.variant))
        base = _baseline(variants)
        b = sub[sub.variant == base].value.to_numpy(float)
        for v in variants:
            a = sub[sub.variant == v].value.to_numpy(float)
            half = student_half(a.std(ddof=1), len(a)) if len(a) > 1 else np.nan
            row = {"training_config": config, "metric": metric, "variant": v, "runs": len(a),
                   "step": int(sub[sub.variant == v].step.max()), "mean": finite_or_none(a.mean()),
                   "mean_lo": finite_or_none(a.mean() - half), "mean_hi": finite_or_none(a.mean() + half),
                   "se": finite_or_none(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else None,
                   "baseline": base}
            if v != base and len(a) > 1 and len(b) > 1:
                diff, lo, hi = _difference(a, b)
                row.update(difference=diff, difference_lo=lo, difference_hi=hi, p_permutation=permutation(a, b))
            rows.append(row)
    return pd.DataFrame(rows)


def final_values(runs: list[dict]) -> pd.DataFrame:
    """One row per run and metric: training_config, variant, seed, path, metric, step, value: each eval_ metric at
    the run's last evaluation; each train_ metric (measured during training, e.g. on the first batch of each
    epoch) at its last measurement and, as `<metric>_min`, its minimum over the run (Gong & Zhang's total entropy
    is the minimum over epochs)."""
    labels = label_runs(runs).set_index("path")
    last = []
    for r in runs:
        lab, log = labels.loc[r["path"]], r["log"]
        base = {"training_config": lab.training_config, "variant": lab.variant, "seed": lab.seed, "path": r["path"]}
        for metric in (c for c in log if c.startswith(("eval_", "train_"))):
            d = log.dropna(subset=[metric]).sort_values("step")
            if not len(d):
                continue
            last.append({**base, "metric": metric, "step": int(d.step.iloc[-1]), "value": float(d[metric].iloc[-1])})
            if metric.startswith("train_"):
                last.append({**base, "metric": f"{metric}_min", "step": int(d.step.iloc[-1]),
                             "value": float(d[metric].min())})
    return pd.DataFrame(last)


def trend(runs: list[dict], field: str) -> pd.DataFrame:
    """Per config (and the other fields that vary between its runs) and metric: the slope of each run's final value
    over the config field `field` (`n` or `task.n`), the runs as replicates (reports/trend.py); empty where no
    config has that field varying."""
    from .trend import parse_trend, trend_table

    spec, field = field, parse_trend(field)[0]
    last = final_values(runs)
    if last.empty:
        return pd.DataFrame()
    flats = {r["path"]: _flat(r["config"]) for r in runs}
    name = lambda f: next((k for k in f if k == field or k.split(".", 1)[1] == field), None)  # noqa: E731
    wide = last.pivot_table(index=["training_config", "path", "seed"], columns="metric", values="value").reset_index()
    wide.columns.name = None
    wide[field] = [flats[p].get(name(flats[p])) if name(flats[p]) else None for p in wide.path]
    others = sorted({k for p in wide.path for k in flats[p]} - {"train.seed", name(flats[wide.path.iloc[0]]) or field})
    for k in others:  # the fields that vary within a config besides `field` split it into groups
        wide[k] = [json.dumps(flats[p].get(k)) for p in wide.path]
    keys = ["training_config"] + [k for k in others if wide.groupby("training_config")[k].nunique().max() > 1]
    metrics = sorted(set(last.metric))
    return trend_table(wide, spec, keys, metrics)


def _difference(a: np.ndarray, b: np.ndarray) -> tuple:
    """Mean of a minus mean of b, with a bootstrap interval resampling each group's seeds on its own."""
    from ..stats import difference

    mean = lambda x: x.mean(-1)  # noqa: E731
    return tuple(finite_or_none(v) for v in difference(mean, [a], [b]))


def training_tables(folder: Path, trend_field: str | None = None) -> dict[str, pd.DataFrame]:
    """{'training-curves', 'training-final', 'training-milestones', 'training-milestones-runs'} for the training
    runs under `folder` (milestones where the runs' generator has one), and 'training-trend' over `trend_field`;
    {} if there are none."""
    runs = training_runs(folder)
    if not runs:
        return {}
    per_run, summary = milestones(runs)
    tables = {"training-curves": curves(runs), "training-final": finals(runs)}
    if trend_field:
        tables["training-trend"] = trend(runs, trend_field)
    if len(summary):
        tables["training-milestones"] = summary
        tables["training-milestones-runs"] = per_run
    return tables


def _panels(metrics: list[str]) -> list[tuple[str, list[str]]]:
    """[(panel title, metrics)]: each test set's accuracy, its loss, then the query-attention metrics per layer."""
    order = ["in", "ic", "ic2", "iw"]  # the in-context classification test sets, in the paper's order; others after
    key = lambda m: (order.index(m.split("_")[1]) if m.split("_")[1] in order else len(order), m)  # noqa: E731
    acc = sorted((m for m in metrics if m.endswith("accuracy")), key=key)
    loss = sorted((m for m in metrics if m.endswith("loss") or "_loss_" in m), key=key)
    attention = sorted({m.rsplit("_", 1)[-1] for m in metrics if re.search(r"_query_\w+_L\d+$", m)})
    panels = [("test accuracy", acc), ("test loss", loss),
              ("in-context learning score (late - early loss)", [m for m in metrics if m.endswith("icl_score")])]
    for layer in attention:
        panels.append((f"query attention, layer {layer[1:]}", [m for m in metrics if m.endswith(f"_{layer}")]
                       + [m for m in metrics if m.endswith("_query_uniform")]))
    return [(t, ms) for t, ms in panels if ms]


def plot_curves(curve: pd.DataFrame, config: str):
    """A figure per training config: each panel one kind of metric against step, a line per variant and metric,
    with its band over seeds (t interval)."""
    from .plots import plt

    d = curve[curve.training_config == config]
    panels = _panels(list(dict.fromkeys(d.metric)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    styles = ["-", "--", ":", "-."]
    variants = list(dict.fromkeys(d.variant))
    for ax, (title, metrics) in zip(axes[0], panels):
        for j, metric in enumerate(metrics):
            for i, v in enumerate(variants):
                s = d[(d.metric == metric) & (d.variant == v)].sort_values("step")
                if not len(s):
                    continue
                name = metric[len("eval_"):].replace("_accuracy", "").replace("_loss", "").replace("ic_query_", "")
                line, = ax.plot(s.step, s["mean"], styles[j % len(styles)], color=f"C{i}", lw=1.2,
                                label=f"{v} · {name}" if len(metrics) > 1 else v)
                ax.fill_between(s.step, s.lo, s.hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=6)
    seeds = int(d.seeds.max()) if len(d) else 0
    fig.suptitle(f"{config}: mean over {seeds} seeds, {level():.0%} t bands", fontsize=9)
    fig.tight_layout()
    plt.close(fig)
    return fig
