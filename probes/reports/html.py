"""A static HTML report of a results folder, in one self-contained file (images inlined, a small inline script, no
network), so it opens offline and can be mailed or archived as is.

Per probe, a section that leads with what was found: a table whose first columns say which run a row is (model,
task) and whose next the probe's headline metrics with interval and count, each row's setup and provenance one
click away (reports/findings.py); then the probe's own figure across runs (reports/figures.py), its headline
metric against model size (pretrained models joined, random-weight and trained-here models apart, never on the
pretrained curve) or training step, its curve, paired and trend tables, every column of its aggregate table, and
every run's plot. Tables sort (click a header) and filter (the box above); a contents list leads; long lists of
plots are collapsed."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import re
from pathlib import Path

from .aggregate import CURVES, HEADLINE, SETUP_COLUMNS, aggregate, complete_runs, curve_wide
from .findings import (KIND_WORDS, LEAD, fmt, findings_table, frame_table, is_missing, model_kind, norm, row_keys,
                       runs_by_row, series_label, setup_words)
from ..runs.rundir import atomic_write
from ..stats import level

OPEN_PLOTS = 8  # a probe's run plots are listed open up to this many, collapsed beyond

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1em; max-width: 1200px; color: #222; }
*, *::before, *::after { box-sizing: border-box; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.about { color: #555; margin-top: -.3em; }
nav.contents { background: #f8f8f8; border: 1px solid #e4e4e4; padding: .5em 1em; }
nav.contents ol { margin: .3em 0; padding-left: 1.5em; } nav.contents li { margin: .15em 0; }
.table { overflow-x: auto; max-width: 100%; margin: .3em 0 1em; }
.table.long { max-height: 40em; overflow-y: auto; } .table.long th { position: sticky; top: 0; z-index: 1; }
table { border-collapse: collapse; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .25em .5em; text-align: right; vertical-align: top; }
th { background: #f4f4f4; cursor: pointer; user-select: none; white-space: nowrap; }
th[aria-sort=ascending]::after { content: " \\25B2"; font-size: .7em; }
th[aria-sort=descending]::after { content: " \\25BC"; font-size: .7em; }
td:first-child, th:first-child, td.id, th.id, td.book { text-align: left; }
td.metric { white-space: nowrap; } td.id { white-space: nowrap; }
.ci { color: #555; } .n { color: #777; font-size: .85em; } .mean { color: #777; font-size: .85em; }
.tag { font-size: .75em; padding: 0 .35em; border-radius: 3px; white-space: nowrap; }
.tag.random { background: #fde2c8; } .tag.trained { background: #d6ecd2; }
button.book { font: inherit; font-size: .9em; color: #444; background: none; border: 0; cursor: pointer; padding: 0; }
button.book::before { content: "\\25B8 "; } button.book[aria-expanded=true]::before { content: "\\25BE "; }
tr.book > td { text-align: left; background: #fafafa; }
dl.setup { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: .15em 1em; margin: .2em 0; }
dl.setup dt { font-weight: 600; } dl.setup dd { margin: 0; overflow-wrap: anywhere; }
dl.setup ul { margin: 0; padding-left: 1.2em; }
details.more > summary { cursor: pointer; color: #333; margin: .6em 0; }
.filter { font-size: .85em; margin-top: .5em; } .filter input { width: 22em; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .8em; color: #555; max-width: 60em; }
"""

# sorting (click a header; again to reverse; empty cells last) and filtering (every word must appear in the row,
# its collapsed setup included); cells sort by data-v when they have it, else by their text's leading number
SCRIPT = """
(function () {
  function key(td) {
    if (!td) return "";
    var v = td.getAttribute("data-v"), t = v === null ? td.textContent.trim() : v;
    if (t === "") return "";
    var x = v === null ? parseFloat(t) : Number(t);
    return isNaN(x) ? t.toLowerCase() : x;
  }
  function compare(a, b) {
    var na = typeof a === "number", nb = typeof b === "number";
    if (na && nb) return a - b;
    if (na !== nb) return na ? -1 : 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }
  function rows(table) {  // [row, its setup row or null]: a setup row travels with its row
    return Array.prototype.filter.call(table.tBodies[0].rows, function (r) {
      return !r.classList.contains("book");
    }).map(function (r) {
      var next = r.nextElementSibling;
      return [r, next && next.classList.contains("book") ? next : null];
    });
  }
  function opened(pair) {
    var button = pair[0].querySelector("button.book");
    return button !== null && button.getAttribute("aria-expanded") === "true";
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, i) {
      th.addEventListener("click", function () {
        var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
        var body = table.tBodies[0];
        var keyed = rows(table).map(function (pair, j) { return [key(pair[0].cells[i]), j, pair]; });
        keyed.sort(function (a, b) {
          var ea = a[0] === "", eb = b[0] === "";
          if (ea || eb) return (ea - eb) || (a[1] - b[1]);
          return dir * compare(a[0], b[0]) || (a[1] - b[1]);
        });
        keyed.forEach(function (k) { body.appendChild(k[2][0]); if (k[2][1]) body.appendChild(k[2][1]); });
      });
    });
  });
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("button.book");
    if (!button) return;
    var open = button.getAttribute("aria-expanded") !== "true", row = button.closest("tr").nextElementSibling;
    button.setAttribute("aria-expanded", open ? "true" : "false");
    if (row && row.classList.contains("book")) row.hidden = !open;
  });
  document.querySelectorAll("input[data-table]").forEach(function (input) {
    var table = document.getElementById(input.getAttribute("data-table"));
    var shown = input.parentNode.querySelector(".shown");
    input.addEventListener("input", function () {
      var words = input.value.toLowerCase().split(/\\s+/).filter(Boolean), k = 0, pairs = rows(table);
      pairs.forEach(function (pair) {
        var text = (pair[0].textContent + " " + (pair[1] ? pair[1].textContent : "")).toLowerCase();
        var ok = words.every(function (w) { return text.indexOf(w) >= 0; });
        pair[0].hidden = !ok; k += ok ? 1 : 0;
        if (pair[1]) pair[1].hidden = !ok || !opened(pair);
      });
      shown.textContent = k + " of " + pairs.length + " rows";
    });
  });
})();
"""


def _png(path_or_fig) -> str:
    if isinstance(path_or_fig, Path):
        data = path_or_fig.read_bytes()
    else:
        buf = io.BytesIO()
        path_or_fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _svg(fig) -> str:
    """A figure as an inlined SVG image: sharp at any zoom, its text kept as text (searchable, small)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "probe-report"}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    return "data:image/svg+xml;base64," + base64.b64encode(buf.getvalue()).decode()


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


class _Ids:
    """Unique element ids for the page's tables."""

    def __init__(self):
        self.used: dict[str, int] = {}

    def __call__(self, name: str) -> str:
        base = "t-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-")
        self.used[base] = self.used.get(base, 0) + 1
        return base if self.used[base] == 1 else f"{base}-{self.used[base]}"


def headline_name(probe: str) -> str:
    """HEADLINE's pattern as text: 'nback_head.N.nback_mass_nonmatch'."""
    return HEADLINE[probe].replace("\\d+", "N").replace("\\", "")


def _metric_words(probe: str, metric: str) -> str:
    """A headline column in words, as the section's table heads it ('N-back head's mass, N=2')."""
    for pattern, header in LEAD.get(probe, ()):
        m = re.fullmatch(pattern, metric)
        if m:
            return header.format(*m.groups())
    return metric


def _count(row, metric: str) -> str:
    """What a point counts: its items ('n=40'), the items that reach a layer of how many ('12/40'), or its runs."""
    n, reached, of = (row.get(f"{metric}{s}") for s in ("_n", "_reached", "_of"))
    if not is_missing(n):
        return f"n={int(float(n))}"
    if not is_missing(reached) and not is_missing(of):
        return f"{int(float(reached))}/{int(float(of))}"
    return f"{int(row['runs'])} run(s)" if "runs" in row and not is_missing(row["runs"]) else ""


PANEL_TITLES = {"pretrained": "pretrained models", "random": "random weights: no scaling curve",
                "trained": "trained here"}


def metric_plot(df, probe: str, x: str = "params", kinds=None):
    """The probe's headline metric (HEADLINE, a column name or pattern) against model size (`params`, log scale) or
    training step (`step`), one series per task and setup (runs of another limit or options are another series,
    never one line; against step, one per training run), with error bars where the metric has an interval and each
    point's count. Against size, pretrained models are joined per series; models with random weights and models
    trained here (`kinds`: per row, or {model: kind}) are drawn in panels of their own, as unjoined points named by
    model, never on the pretrained curve (trained models are drawn against step instead, when there is one).
    Legends are in words. None if there are fewer than two values of `x`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    pattern = HEADLINE.get(probe)
    metrics = [c for c in df.columns if pattern and re.fullmatch(pattern, c)]
    if not metrics or x not in df or df[x].nunique() < 2:
        return None
    df = df.reset_index(drop=True)
    if kinds is None:
        kind = pd.Series("pretrained", index=df.index)
    elif isinstance(kinds, dict):
        kind = (df["model"].map(lambda m: kinds.get(str(m), "pretrained")) if "model" in df
                else pd.Series("pretrained", index=df.index))
    else:
        kind = pd.Series(list(kinds), index=df.index)
    if x == "params":
        if "step" in df and df["step"].notna().any():
            kind = kind.where(~((kind == "trained") & df["step"].notna()), None)  # on the step plot instead
        panels = [k for k in PANEL_TITLES if (kind == k).any()]
        if not any(df.loc[kind == k, x].nunique() > 1 for k in panels):
            return None  # one size of each kind: nothing to draw against size
    else:
        panels = [None]
    if not panels:
        return None
    words = pd.Series(setup_words(df, ["task"]), index=df.index)
    setup = [c for c in SETUP_COLUMNS if c in df and df[c].map(norm).nunique(dropna=False) > 1]
    series = (["training_run"] if x == "step" and "training_run" in df else []) + ["task", *setup]
    series = [c for c in series if c in df]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 if len(panels) == 1 else 4.6 * len(panels), 3.8),
                             sharey=True, squeeze=False)
    colours = {}
    for ax, panel in zip(axes[0], panels):
        sub = df[kind == panel] if panel else df
        joined = panel in ("pretrained", None)
        for metric in metrics:
            groups = sub.groupby(series, dropna=False, sort=False) if series else [((), sub)]
            for key, d in groups:
                d = d.dropna(subset=[metric]).sort_values(x)
                if d.empty:  # e.g. the N-back head of an N this run was not asked for
                    continue
                key = key if isinstance(key, tuple) else (key,)
                name = " · ".join(dict.fromkeys(
                    [fmt(v) for c, v in zip(series, key) if c in ("training_run", "task") and not is_missing(v)]))
                label = (f"{_metric_words(probe, metric)}: " if len(metrics) > 1 else "") + name + (
                    f" ({words[d.index[0]]})" if words[d.index[0]] else "")
                lo, hi = f"{metric}_lo", f"{metric}_hi"
                yerr = ([(d[metric] - d[lo]).clip(lower=0).fillna(0), (d[hi] - d[metric]).clip(lower=0).fillna(0)]
                        if lo in d and hi in d and d[lo].notna().any() else None)
                colour = colours.setdefault(label, f"C{len(colours) % 10}")
                ax.errorbar(d[x], d[metric], yerr=yerr, marker="o" if joined else "D", capsize=3,
                            linestyle="-" if joined else "none", color=colour, mfc=colour if joined else "none",
                            label=label)
                for j, (_, r) in enumerate(d.iterrows()):  # staggered, so that points close together stay legible
                    text = _count(r, metric)
                    if not joined and "model" in r:
                        text = f"{r['model']} {text}"
                    ax.annotate(text, (r[x], r[metric]), fontsize=6, color=colour, textcoords="offset points",
                                xytext=(3, 3 + 7 * ((j if not joined else len(colours) - 1) % 4)))
        if x == "params":
            ax.set_xscale("log")
        ax.set_xlabel({"params": "parameters", "step": "training step"}[x])
        if panel:
            ax.set_title(PANEL_TITLES[panel], fontsize=9)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    axes[0][0].set_ylabel(_metric_words(probe, metrics[0]) if len(metrics) == 1
                          else _metric_words(probe, metrics[0]).split(",")[0])
    fig.suptitle(f"{probe}: {'by model size' if x == 'params' else 'over training'}", fontsize=10)
    plt.close(fig)
    return fig


def _plots(figures: list[str], what: str, open_up_to: int = OPEN_PLOTS) -> str:
    """Figures side by side: the first `open_up_to` shown, the rest collapsed."""
    block = "<div class='plots'>" + "".join(figures[:open_up_to]) + "</div>"
    rest = figures[open_up_to:]
    if rest:
        block += (f"<details class='more'><summary>{len(rest)} more {what}</summary><div class='plots'>"
                  + "".join(rest) + "</div></details>")
    return block


def _row_kind(row, runs: list[dict], kinds: dict) -> str:
    found = {model_kind(m) for m in runs}
    if len(found) == 1:
        return found.pop()
    if "model" in row.index:
        return kinds.get(str(row["model"]), "pretrained")
    return "pretrained"


def probe_section(probe: str, tables: dict, runs: list[dict], by: list[str], results: Path, kinds: dict,
                  ids: _Ids) -> str:
    from ..methods.catalog import PROBES
    from .figures import probe_figures

    df = tables[probe].reset_index(drop=True)
    mine = [m for m in runs if m["config"]["probe"] == probe]
    row_runs = runs_by_row(df, by, runs, probe)
    curve = tables.get(f"{probe}-curve")
    parts = [f"<section id='{html.escape(probe)}'><h2>{html.escape(probe)}</h2>"]
    if probe in PROBES:
        parts.append(f"<p class='about'>{html.escape(PROBES[probe].about)}.</p>")
    parts.append(findings_table(df, probe, by, row_runs, kinds, results, curve, ids(probe)))

    # the probe's own figure across runs, then its headline against size or step
    setup = setup_words(df, by)
    keys = row_keys(df, by)
    row_kinds = [_row_kind(row, row_runs[i], kinds) for i, row in df.iterrows()]
    entries = [{"label": series_label(row, by, setup[i], {}) + (f" [{KIND_WORDS[row_kinds[i]]}]"
                                                               if row_kinds[i] != "pretrained" else ""),
                "kind": row_kinds[i], "runs": row_runs[i], "row": row, "key": tuple(norm(row[k]) for k in keys)}
               for i, row in df.iterrows()]
    figures = [_figure(_svg(fig), caption) for fig, caption in probe_figures(probe, entries, curve, keys)]
    for x, what in (("params", "by model size"), ("step", "over training")):
        fig = metric_plot(df, probe, x, row_kinds)
        if fig is not None:
            figures.append(_figure(_png(fig), f"{probe}: {headline_name(probe)} {what}"))
    run_plots = []
    for m in sorted(mine, key=lambda m: m["path"]):
        plot = Path(m["path"]) / "plot.png"
        if plot.exists():
            c = m["config"]
            run_plots.append(_figure(_png(plot), f"{c['model']} · {c['task']} · seed {c.get('seed')} "
                                                 f"({Path(m['path']).relative_to(results)})"))
    if probe in ("activation-patching", "attribution-patching"):  # the runs' heat maps are the probe's figure
        figures, run_plots = figures + run_plots, []
    if figures:
        parts.append(_plots(figures, "figures"))

    if f"{probe}-curve" in tables:
        for metric, wide in curve_wide(with_intervals(tables[f"{probe}-curve"]), probe, by, "first").items():
            parts.append(f"<h3>{html.escape(probe)}: {html.escape(metric)} by {CURVES[probe][1]}</h3>")
            values = [c for c in wide.columns if c not in by and c != "params"]
            parts.append(frame_table(wide, ids(f"{probe}-{metric}"), first=[c for c in by if c != "probe"],
                                     metrics=values))
    if f"{probe}-paired" in tables:
        parts.append(f"<h3>{html.escape(probe)}: trained variants item by item</h3><p>Per item, the mean over "
                     "a variant's seeds; the difference against the reference with a bootstrap interval over "
                     "items and a sign-flip permutation test (p).</p>")
        parts.append(frame_table(tables[f"{probe}-paired"], ids(f"{probe}-paired"),
                                 first=["variant", "task", "step"]))
    for name in (f"{probe}-trend", f"{probe}-curve-trend"):
        if name in tables and len(tables[name]):
            parts.append(f"<h3>{html.escape(probe)}: trend{' of its curve' if 'curve' in name else ''}</h3>"
                         "<p>Each metric's slope over the setting, the runs as replicates (t interval, permutation "
                         "p), and its mean at each value.</p>")
            parts.append(frame_table(tables[name], ids(name), first=[c for c in by if c != "probe"] + ["metric"]))
    parts.append(f"<details class='more'><summary>every column of the {html.escape(probe)} table (as "
                 f"<code>aggregate/{html.escape(probe)}.csv</code>)</summary>"
                 + frame_table(df, ids(f"{probe}-all"), first=[c for c in by if c != "probe"]) + "</details>")
    if run_plots:
        parts.append(f"<h3>every run's plot</h3>" + _plots(run_plots, "runs' plots"))
    parts.append("</section>")
    return "\n".join(parts)


def _intro(results: Path, by: list[str], runs: list[dict], kinds: dict, skipped: dict) -> str:
    by_kind: dict[str, list[str]] = {}
    for model, kind in kinds.items():
        by_kind.setdefault(kind, []).append(model)
    words = {"pretrained": "pretrained", "random": "with random weights", "trained": "trained here"}
    models = ", ".join(f"{len(ms)} {words[k]} ({', '.join(sorted(ms)[:6])}{', ...' if len(ms) > 6 else ''})"
                       for k, ms in by_kind.items())
    tasks = sorted({m["config"]["task"] for m in runs})
    text = (f"<p>{len(runs)} complete run(s) under <code>{html.escape(str(results))}</code>"
            + (f": models {html.escape(models)}; tasks {html.escape(', '.join(tasks))}" if runs else "")
            + f"; rows grouped by {html.escape(', '.join(by))}; written "
            f"{_dt.datetime.now().isoformat(timespec='seconds')}.</p>"
            f"<p>Brackets: {level():.0%} intervals (Wilson for rates, pooled over seeds; bootstrap over items for "
            "means); n: items counted; for a row pooling several runs, the mean over the runs (models as replicates) "
            "with its t interval beneath. Models with random weights and models trained here are tagged, drawn "
            "apart from pretrained models on size plots and dashed in figures. Click a header to sort, type in a "
            "box to filter; each row's setup (task digest and version, options, dtype, placement, self-check, "
            "versions) opens under the row with a click on <i>setup</i>.</p>")
    if skipped:
        items = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in skipped.items())
        text += f"<details class='more'><summary>{len(skipped)} folder(s) skipped</summary><ul>{items}</ul></details>"
    return text


def build_report(results: Path, by: list[str], trend: str | None = None) -> str:
    results = Path(results)
    skipped: dict = {}
    tables = aggregate(results, by, skipped, trend=trend)
    runs = complete_runs(results)
    kinds: dict[str, str] = {}
    for m in runs:
        kinds.setdefault(m["config"]["model"], model_kind(m))
    probes = sorted({m["config"]["probe"] for m in runs})
    ids = _Ids()
    contents = []
    if "training-curves" in tables:
        contents.append("<li><a href='#training'>training runs</a></li>")
    for p in probes:
        mine = [m for m in runs if m["config"]["probe"] == p]
        models = len({m["config"]["model"] for m in mine})
        contents.append(f"<li><a href='#{html.escape(p)}'>{html.escape(p)}</a>: {len(tables[p])} row(s), "
                        f"{len(mine)} run(s), {models} model(s)</li>")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>probe report: {html.escape(str(results))}"
             f"</title><style>{STYLE}</style><noscript><style>tr.book[hidden] {{ display: table-row; }} "
             "button.book { display: none; }</style></noscript></head><body>",
             "<h1>probe report</h1>", _intro(results, by, runs, kinds, skipped),
             f"<nav class='contents'><b>Contents</b><ol>{''.join(contents)}</ol></nav>"]
    if "training-curves" in tables:
        parts += training_section(tables, ids)
    for probe in probes:
        parts.append(probe_section(probe, tables, runs, by, results, kinds, ids))
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def training_section(tables: dict, ids: _Ids | None = None) -> list[str]:
    """The training runs: steps to each accuracy level per variant (with the test against the baseline), and the
    curves with their bands over seeds."""
    from .training import plot_curves

    ids = ids or _Ids()
    curve = tables["training-curves"]
    parts = ["<section id='training'><h2>training runs</h2>",
             "<p>Intervals over seeds (Student t; the difference: bootstrap over each variant's seeds); p: permutation "
             "test of the mean steps against the baseline variant; steps interpolated between evaluations.</p>"]
    first = ["training_config", "variant", "metric", "level"]
    if "training-milestones" in tables:
        parts.append(frame_table(tables["training-milestones"], ids("training-milestones"), first=first))
    if "training-final" in tables:
        parts.append("<h3>at the end of training</h3>"
                     + frame_table(tables["training-final"], ids("training-final"), first=first))
    if "training-trend" in tables and len(tables["training-trend"]):
        parts.append("<h3>trend over the runs' setting</h3>" + frame_table(
            tables["training-trend"], ids("training-trend"), first=["training_config", "metric"]))
    figures = [_figure(_png(plot_curves(curve, config)), f"{config}: evaluations against step")
               for config in dict.fromkeys(curve.training_config)]
    return parts + ["<div class='plots'>" + "".join(figures) + "</div></section>"]


def write_report(results: Path, by: list[str], out: Path | None = None, trend: str | None = None) -> Path:
    out = Path(out or Path(results) / "report.html")
    text = build_report(results, by, trend)
    atomic_write(out, lambda f: f.write(text))
    return out
