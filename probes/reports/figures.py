"""Each probe's own figure across runs, for the report: what the probe found, one line (or row) per row of its
table, drawn from the run folders (meta.json's summary, table.csv) and the aggregate tables.

- logit-lens: the answer's rank and probability by layer per model, with the first layer at which it is top-1;
- ffn-readout: the stages (argument first top-1, the FFN switch block, answer first top-1) per model on its depth;
- ffn-ablation: accuracy and relative drop per variant;
- nback: accuracy and d' against N; attention: entropy and the N-back head's mass against N;
- linear-probe: held-out accuracy by layer against the shuffled-label control.

Random-weight and trained-here models are drawn dashed and named as such; every series says its count.
An entry is {"label": words, "kind": pretrained|random|trained, "runs": [meta], "row": the table's row,
"key": the row's keys}.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..runs.rundir import read_table  # noqa: E402
from .findings import fmt, is_missing, norm  # noqa: E402

STYLE = {"pretrained": "-", "random": "--", "trained": "-."}
MAX_SERIES = 12  # per figure; more rows of one task are drawn in several figures


def _colours(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _chunks(entries: list, size: int = MAX_SERIES):
    return [entries[i:i + size] for i in range(0, len(entries), size)] or [[]]


def _by_task(entries: list[dict]) -> dict:
    out: dict = {}
    for e in entries:
        out.setdefault(norm(e["row"].get("task")) or "", []).append(e)
    return out


def _figure(n: int, panels: int = 2, width: float = 10):
    """A figure of `panels` side by side, with room beneath for a legend of `n` series (constrained layout)."""
    rows = -(-n // _ncol(n))
    fig, axes = plt.subplots(1, panels, figsize=(width, 3.6 + 0.16 * rows), layout="constrained", squeeze=False)
    return fig, list(axes[0])


def _ncol(n: int) -> int:
    return 1 if n <= 2 else 2 if n <= 8 else 3


def _legend(fig, axes, n: int) -> None:
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=_ncol(n), fontsize=7, frameon=False)


def _read_table(meta: dict, columns: set[str]) -> pd.DataFrame | None:
    path = Path(meta["path"]) / "table.csv"
    try:
        return read_table(path, columns)
    except (OSError, ValueError):
        return None


def lens_figures(entries: list[dict]) -> list[tuple]:
    """Per task: the answer's rank (median over items, quartile band; log scale, top-1 at the top) and its
    probability (mean, bootstrap band) at the last position by layer, one line per row; a dotted line and mark at
    the first layer where the answer is top-1 (median over the items that get there, with how many do)."""
    from ..stats import level
    from .plots import _means

    figures = []
    for task, group in _by_task(entries).items():
        for chunk in _chunks(group):
            fig, axes = _figure(len(chunk))
            drawn = 0
            # a row's `lens` is its tuned lens' digest (aggregate's setup column), missing for the logit lens
            lenses = {"logit" if is_missing(e["row"].get("lens")) else "tuned" for e in chunk}
            for colour, e in zip(_colours(len(chunk)), chunk):
                tables = []
                for i, m in enumerate(e["runs"]):
                    t = _read_table(m, {"item", "layer", "answer_rank", "answer_prob", "last_position"})
                    if t is not None and {"layer", "answer_rank", "item"} <= set(t):
                        if "last_position" in t:
                            t = t[t.last_position.astype(bool)]
                        tables.append(t.assign(item=[f"{i}:{x}" for x in t["item"]]))
                if not tables:
                    continue
                t = pd.concat(tables)
                items = t["item"].nunique()
                rank = t.groupby("layer").answer_rank.quantile([0.25, 0.5, 0.75]).unstack() + 1
                style = STYLE.get(e["kind"], "-")
                row = e["row"]
                first, reached, of = (row.get(f"answer_top1_layer{s}") for s in ("", "_reached", "_of"))
                top1 = ("never top-1" if is_missing(first) else
                        f"top-1 from layer {fmt(first)} ({fmt(reached)}/{fmt(of)} items)")
                tuned = " (tuned lens)" if not is_missing(row.get("lens")) and len(lenses) > 1 else ""
                label = f"{e['label']}{tuned}: n={items}, {top1}"
                axes[0].plot(rank.index, rank[0.5], style, color=colour, marker="o", ms=3, label=label)
                axes[0].fill_between(rank.index, rank[0.25], rank[0.75], color=colour, alpha=0.12)
                if "answer_prob" in t:
                    p = _means(t.groupby("layer"), "answer_prob")
                    axes[1].plot(p.index, p["mean"], style, color=colour, marker="o", ms=3)
                    axes[1].fill_between(p.index, p["mean_lo"].astype(float), p["mean_hi"].astype(float),
                                         color=colour, alpha=0.12)
                if not is_missing(first):  # a star where the answer first becomes top-1 (the median layer)
                    at = float(first)
                    y = np.interp(at, rank.index.to_numpy(float), rank[0.5].to_numpy(float))
                    axes[0].plot([at], [y], "*", color=colour, ms=11, mec="black", mew=0.5, zorder=5)
                    if len(chunk) <= 4:
                        for ax in axes:
                            ax.axvline(at, color=colour, ls=":", lw=1)
                drawn += 1
            if not drawn:
                plt.close(fig)
                continue
            axes[0].set_yscale("log")
            axes[0].set_ylim(max(10, axes[0].get_ylim()[1] * 1.5), 0.7)  # rank 1 (top-1) at the top
            axes[0].set(xlabel="layer (0 = embeddings)", ylabel="answer's rank (1 = top-1)",
                        title="rank: median over items, band: quartiles")
            axes[1].set(xlabel="layer (0 = embeddings)", ylabel="P(answer)",
                        title=f"probability: mean, band: {level():.0%} bootstrap")
            for ax in axes:
                ax.xaxis.get_major_locator().set_params(integer=True)
            lens = {frozenset({"logit"}): "logit lens", frozenset({"tuned"}): "tuned lens"}.get(
                frozenset(lenses), "logit and tuned lenses")
            fig.suptitle(f"{lens}{' · ' + task if task else ''}: the answer at the last position, by layer "
                         "(star: first top-1 layer)", fontsize=10)
            _legend(fig, axes, len(chunk))
            plt.close(fig)
            where = f" · {task}" if task else ""
            figures.append((fig, f"logit-lens{where}: the answer's rank and probability by layer, and the first "
                                 "layer where it is top-1, per model"))
    return figures


def readout_figure(entries: list[dict]) -> list[tuple]:
    """The FFN read-out's stages per row on its model's depth: the argument's first top-1 layer, the FFN switch
    block (where an FFN makes the answer top-1, held out), the answer's first top-1 layer; each with its count."""
    rows = []
    for e in entries:
        depth = None
        for m in e["runs"]:
            t = _read_table(m, {"block"})
            if t is not None and "block" in t and len(t):
                depth = max(depth or 0, int(t.block.max()) + 1)
        rows.append((e, depth))
    if not rows:
        return []
    figures = []
    for chunk in _chunks(rows, 20):
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(chunk)))
        marks = (("argument_top1_layer", "o", "argument first top-1 (median)"),
                 ("ffn_switch_block.block", "s", "FFN switch block (held out)"),
                 ("answer_top1_layer", "^", "answer first top-1 (median)"))
        seen = set()
        for y, (e, depth) in enumerate(chunk):
            row = e["row"]
            if depth:
                ax.hlines(y, 0, depth, color="0.85", lw=8)
            for (col, marker, label), colour in zip(marks, _colours(3)):
                v = row.get(col)
                if is_missing(v):
                    continue
                count = (f"{fmt(row.get(col + '_reached'))}/{fmt(row.get(col + '_of'))}"
                         if not is_missing(row.get(col + "_of")) else
                         f"{fmt(row.get('ffn_switch_block.share_k'))}/{fmt(row.get('ffn_switch_block.share_n'))}"
                         if col.startswith("ffn_switch") else "")
                ax.plot([float(v)], [y], marker, color=colour, ms=8, label=None if label in seen else label)
                seen.add(label)
                ax.annotate(count, (float(v), y), xytext=(0, 7), textcoords="offset points", fontsize=6,
                            ha="center", color=colour)
            if not any(not is_missing(row.get(c)) for c, _, _ in marks):
                ax.annotate("no stage reached", (0, y), xytext=(3, -3), textcoords="offset points", fontsize=7)
        ax.set_yticks(range(len(chunk)), [e["label"] for e, _ in chunk], fontsize=7)
        ax.set_ylim(len(chunk) - 0.5, -0.7)
        ax.set(xlabel="layer (grey: the model's depth)", title="FFN read-out: the stages per model")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if seen:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(chunk) < 4 else -0.12),
                      ncol=3, frameon=False)
        fig.tight_layout()
        plt.close(fig)
        figures.append((fig, "ffn-readout: where the argument, the FFN switch and the answer come, per model "
                             "(counts: items that get there / items)"))
    return figures


def _curve_rows(curve: pd.DataFrame, keys: list[str], key: tuple) -> pd.DataFrame:
    mask = np.ones(len(curve), dtype=bool)
    for k, v in zip(keys, key):
        if k in curve:
            mask &= np.array([norm(x) == v for x in curve[k]], dtype=bool)
    return curve[mask]


def _errorbars(ax, x, d: pd.DataFrame, col: str, style: str, colour, label=None, counts: str | None = None):
    y = pd.to_numeric(d[col], errors="coerce").to_numpy(float)
    lo = pd.to_numeric(d.get(f"{col}_lo", pd.Series(np.nan, index=d.index)), errors="coerce").to_numpy(float)
    hi = pd.to_numeric(d.get(f"{col}_hi", pd.Series(np.nan, index=d.index)), errors="coerce").to_numpy(float)
    err = [np.nan_to_num(np.clip(y - lo, 0, None)), np.nan_to_num(np.clip(hi - y, 0, None))]
    ax.errorbar(x, y, yerr=err, fmt=style, marker="o", ms=4, capsize=3, color=colour, label=label)
    if counts and counts in d:
        for u, v, n in zip(x, y, d[counts]):
            if not is_missing(n) and v == v:
                ax.annotate(f"n={int(float(n))}", (u, v), xytext=(3, 3), textcoords="offset points", fontsize=6,
                            color=colour)


def curve_figure(probe: str, entries: list[dict], curve: pd.DataFrame, keys: list[str]) -> list[tuple]:
    """ffn-ablation: accuracy and relative drop per variant; nback: accuracy and d' against N; attention: entropy
    (no sink) against N, beside the N-back head's mass (from the summary) against N."""
    from .aggregate import CURVES

    dim = CURVES[probe][1]
    panels = {"ffn-ablation": (("accuracy", "accuracy", "accuracy_n"), ("relative_drop", "relative drop", None)),
              "nback": (("accuracy", "accuracy", "accuracy_n"), ("dprime", "d' (signed)", "trials")),
              "attention": (("entropy_nosink", "row entropy, no sink (nats)", "entropy_nosink_n"),
                            ("mass", "N-back head's mass (non-match)", "mass_n"))}[probe]
    figures = []
    for chunk in _chunks(entries):
        fig, axes = _figure(len(chunk))
        drawn = 0
        for colour, e in zip(_colours(len(chunk)), chunk):
            d = _curve_rows(curve, keys, e["key"]).drop_duplicates(dim)
            if d.empty:
                continue
            if probe == "attention":  # the head's mass per N lives in the summary: nback_head.<N>.nback_mass_nonmatch
                row = e["row"]
                get = lambda n, s="": row.get(f"nback_head.{n}.nback_mass_nonmatch{s}")  # noqa: E731
                d = d.assign(mass=[get(n) for n in d[dim]], mass_lo=[get(n, "_lo") for n in d[dim]],
                             mass_hi=[get(n, "_hi") for n in d[dim]], mass_n=[get(n, "_n") for n in d[dim]])
            numeric = pd.to_numeric(d[dim], errors="coerce")
            x = numeric.to_numpy(float) if numeric.notna().all() else np.arange(len(d))
            style = STYLE.get(e["kind"], "-")
            for ax, (col, _, counts) in zip(axes, panels):
                if col in d and pd.to_numeric(d[col], errors="coerce").notna().any():
                    _errorbars(ax, x, d, col, style, colour, e["label"] if ax is axes[0] else None, counts)
            if numeric.isna().any():
                for ax in axes:
                    ax.set_xticks(range(len(d)), [str(v) for v in d[dim]], fontsize=7,
                                  rotation=90 if len(d) > 8 else 0)
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        for ax, (_, ylabel, _) in zip(axes, panels):
            ax.set(xlabel={"n": "N", "variant": "FFN blocks removed"}.get(dim, dim), ylabel=ylabel)
        if probe == "ffn-ablation":
            axes[1].axhline(0, color="gray", ls=":")
        fig.suptitle({"ffn-ablation": "FFN ablation: accuracy and its relative drop per variant",
                      "nback": "N-back: accuracy and d' against N",
                      "attention": "attention: entropy and the N-back head's mass against N"}[probe], fontsize=10)
        _legend(fig, axes, len(chunk))
        plt.close(fig)
        figures.append((fig, {"ffn-ablation": "ffn-ablation: accuracy and relative drop per variant, per model",
                              "nback": "nback: accuracy and d' against N, per model",
                              "attention": "attention: entropy and the N-back head's mass (held out) against N, "
                                           "per model"}[probe]))
    return figures


def linear_probe_figure(entries: list[dict]) -> list[tuple]:
    """Held-out accuracy by layer (Wilson bars) per row, the shuffled-label control dotted."""
    import re

    figures = []
    for chunk in _chunks(entries):
        fig, (ax,) = _figure(len(chunk), 1, 7)
        drawn = 0
        for colour, e in zip(_colours(len(chunk)), chunk):
            row = e["row"]
            layers = sorted(int(m.group(1)) for c in row.index if (m := re.fullmatch(r"layers\.(\d+)\.accuracy", c))
                            and not is_missing(row[c]))
            if not layers:
                continue
            d = pd.DataFrame({s: [row.get(f"layers.{k}.{s}") for k in layers]
                              for s in ("accuracy", "accuracy_lo", "accuracy_hi", "accuracy_n", "shuffled_accuracy")})
            _errorbars(ax, layers, d, "accuracy", STYLE.get(e["kind"], "-"), colour, e["label"], "accuracy_n")
            ax.plot(layers, pd.to_numeric(d.shuffled_accuracy, errors="coerce"), ":", color=colour, lw=1)
            drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set(xlabel="layer (0 = embeddings)", ylabel="held-out accuracy", ylim=(0, 1.02),
               title="linear probe: held-out accuracy by layer (dotted: shuffled labels)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        _legend(fig, [ax], len(chunk))
        plt.close(fig)
        figures.append((fig, "linear-probe: held-out accuracy by layer per model, against shuffled labels"))
    return figures


def probe_figures(probe: str, entries: list[dict], curve: pd.DataFrame | None, keys: list[str]) -> list[tuple]:
    """[(figure, caption)]: the probe's own figures across its rows (none for probes without one)."""
    if not entries:
        return []
    if probe == "logit-lens":
        return lens_figures(entries)
    if probe == "ffn-readout":
        return readout_figure(entries)
    if probe in ("ffn-ablation", "nback", "attention") and curve is not None and len(curve):
        return curve_figure(probe, entries, curve, keys)
    if probe == "linear-probe":
        return linear_probe_figure(entries)
    return []
