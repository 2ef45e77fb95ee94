"""A static HTML report of a results folder: the aggregate tables, a scale plot per probe and every run's plot,
in one self-contained file (images inlined), so it opens offline and can be mailed or archived as is."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import re
from pathlib import Path

from .aggregate import CURVES, HEADLINE, SETUP_COLUMNS, TASK_SETUP, aggregate, complete_runs, curve_wide
from ..runs.rundir import atomic_write
from ..stats import level

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1200px; color: #222; }
*, *::before, *::after { box-sizing: border-box; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.table { overflow-x: auto; max-width: 100%; margin: .5em 0 1em; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; }
"""


def _png(path_or_fig) -> str:
    if isinstance(path_or_fig, Path):
        data = path_or_fig.read_bytes()
    else:
        buf = io.BytesIO()
        path_or_fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure(src: str, caption: str) -> str:
    return (f'<figure><img src="{src}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def with_intervals(df):
    """For reading: each metric with `_lo`/`_hi` columns becomes one cell "0.602 [0.532, 0.668]" (its `_k` and
    spread columns dropped, its count `_n` kept); the CSV and Parquet tables keep every column."""
    import pandas as pd

    out = df.copy()
    for c in [c for c in df.columns if f"{c}_lo" in df and f"{c}_hi" in df]:
        def cell(v, lo, hi):
            if pd.isna(v):
                return ""
            return f"{v:.4g}" + (f" [{lo:.3g}, {hi:.3g}]" if pd.notna(lo) and pd.notna(hi) else "")
        out[c] = [cell(*r) for r in zip(pd.to_numeric(df[c]), pd.to_numeric(df[f"{c}_lo"]),
                                        pd.to_numeric(df[f"{c}_hi"]))]
        out = out.drop(columns=[x for x in (f"{c}_lo", f"{c}_hi", f"{c}_k") if x in out])
    return out


def _html_table(df) -> str:
    """A table in a box of its own that scrolls sideways, so a wide table never widens the page."""
    table = with_intervals(df).to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="", border=0)
    return f"<div class='table'>{table}</div>"


def headline_name(probe: str) -> str:
    """HEADLINE's pattern as text: 'nback_head.N.nback_mass_nonmatch'."""
    return HEADLINE[probe].replace("\\d+", "N").replace("\\", "")


def metric_plot(df, probe: str, x: str = "params"):
    """The probe's headline metric (HEADLINE, a column name or pattern) against model size (`params`, log scale) or
    training step (`step`), one series per task and setup (runs of another limit or options are another series,
    never one line; against step, one per training run), with error bars where the metric has an interval and each
    point's item count. None if there are fewer than two values of `x`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pattern = HEADLINE.get(probe)
    metrics = [c for c in df.columns if pattern and re.fullmatch(pattern, c)]
    if not metrics or x not in df or df[x].nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    setup = [c for c in SETUP_COLUMNS if c in df and df[c].nunique(dropna=False) > 1]
    series = (["training_run"] if x == "step" and "training_run" in df else []) + ["task", *setup]
    # the label leaves out a task's digest and version where its options already tell the series apart
    shown = [c for c in series if not (c in TASK_SETUP and "task_options" in setup)]
    for metric in metrics:
        for key, d in df.groupby(series, dropna=False):
            key = dict(zip(series, key if isinstance(key, tuple) else (key,)))
            d = d.dropna(subset=[metric]).sort_values(x)
            if d.empty:  # e.g. the N-back head of an N this run was not asked for
                continue
            label = (f"{metric}: " if len(metrics) > 1 else "") + ", ".join(
                str(key[c]) if c in ("task", "training_run") else f"{c}={key[c]}" for c in shown)
            lo, hi = f"{metric}_lo", f"{metric}_hi"
            yerr = ([(d[metric] - d[lo]).clip(lower=0), (d[hi] - d[metric]).clip(lower=0)]
                    if lo in d and hi in d and d[lo].notna().any() else None)
            ax.errorbar(d[x], d[metric], yerr=yerr, marker="o", capsize=3, label=label)
            count = f"{metric}_n"
            if count in d:
                for u, y, n in zip(d[x], d[metric], d[count]):
                    if n == n:  # not NaN
                        ax.annotate(f"n={int(n)}", (u, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if x == "params":
        ax.set_xscale("log")
    ax.set_xlabel({"params": "parameters", "step": "training step"}[x])
    ax.set_ylabel(metrics[0] if len(metrics) == 1 else headline_name(probe))
    ax.set_title(f"{probe}: {'by model size' if x == 'params' else 'over training'}")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    plt.close(fig)
    return fig


def build_report(results: Path, by: list[str], trend: str | None = None) -> str:
    results = Path(results)
    tables = aggregate(results, by, trend=trend)
    runs = complete_runs(results)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>probe report: {html.escape(str(results))}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>probe report</h1><p>{len(runs)} complete run(s) under <code>{html.escape(str(results))}</code>, "
             f"grouped by {', '.join(by)}; written {_dt.datetime.now().isoformat(timespec='seconds')}. "
             f"Brackets: {level():.0%} intervals (Wilson for rates, pooled over seeds; bootstrap over items for "
             "means); <code>_mean</code>, <code>_se</code>: the mean over runs (models as replicates) with its t "
             "interval and standard error; <code>_n</code>: items counted; <code>runs</code>/<code>seeds</code>: "
             "runs pooled in a row; <code>-trend</code> tables: the slope over a numeric setting, runs as "
             "replicates (t interval, permutation p).</p>"]
    if "training-curves" in tables:
        parts += training_section(tables)
    for probe in sorted({m["config"]["probe"] for m in runs}):
        parts.append(f"<h2 id='{probe}'>{html.escape(probe)}</h2>")
        df = tables[probe]
        parts.append(_html_table(df))
        if f"{probe}-paired" in tables:
            parts.append(f"<h3>{html.escape(probe)}: trained variants item by item</h3><p>Per item, the mean over "
                         "a variant's seeds; the difference against the reference with a bootstrap interval over "
                         "items and a sign-flip permutation test (p).</p>")
            parts.append(_html_table(with_intervals(tables[f"{probe}-paired"])))
        if f"{probe}-curve" in tables:
            for metric, wide in curve_wide(with_intervals(tables[f"{probe}-curve"]), probe, by, "first").items():
                parts.append(f"<h3>{html.escape(probe)}: {metric} by {CURVES[probe][1]}</h3>")
                parts.append(_html_table(wide))
        figures = []
        for x, what in (("params", "by model size"), ("step", "over training")):
            fig = metric_plot(df, probe, x)
            if fig is not None:
                figures.append(_figure(_png(fig), f"{probe}: {headline_name(probe)} {what}"))
        for m in sorted((m for m in runs if m["config"]["probe"] == probe), key=lambda m: m["path"]):
            plot = Path(m["path"]) / "plot.png"
            if plot.exists():
                c = m["config"]
                figures.append(_figure(_png(plot), f"{c['model']} · {c['task']} · seed {c.get('seed')} "
                                                   f"({Path(m['path']).relative_to(results)})"))
        if figures:
            parts.append("<div class='plots'>" + "".join(figures) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def training_section(tables: dict) -> list[str]:
    """The training runs: steps to each accuracy level per variant (with the test against the baseline), and the
    curves with their bands over seeds."""
    from .training import plot_curves

    curve = tables["training-curves"]
    parts = ["<h2 id='training'>training runs</h2>",
             "<p>Intervals over seeds (Student t; the difference: bootstrap over each variant's seeds); p: permutation "
             "test of the mean steps against the baseline variant; steps interpolated between evaluations.</p>"]
    if "training-milestones" in tables:
        parts.append(_html_table(tables["training-milestones"]))
    if "training-final" in tables:
        parts.append("<h3>at the end of training</h3>" + _html_table(with_intervals(tables["training-final"])))
    figures = [_figure(_png(plot_curves(curve, config)), f"{config}: evaluations against step")
               for config in dict.fromkeys(curve.training_config)]
    return parts + ["<div class='plots'>" + "".join(figures) + "</div>"]


def write_report(results: Path, by: list[str], out: Path | None = None, trend: str | None = None) -> Path:
    out = Path(out or Path(results) / "report.html")
    text = build_report(results, by, trend)
    atomic_write(out, lambda f: f.write(text))
    return out
