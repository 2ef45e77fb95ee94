"""One figure per probe, written next to its table as plot.png (matplotlib, no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runs.rundir import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    counted = {"layer", "block", "blocks", "index", "n", "position", "letter", "step"}
    for ax in fig.axes:  # layers, blocks, N, positions, steps: whole numbers on every axis that counts them
        for axis, label in ((ax.xaxis, ax.get_xlabel()), (ax.yaxis, ax.get_ylabel())):
            if counted & set(re.findall(r"[a-z]+", label.lower())):
                axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _title(meta: dict) -> str:
    return f"{meta.get('model', '')} · {meta.get('task', '')}"


def _lens(meta: dict) -> str:
    """Which lens a run decoded through (its --lens), as a title says it."""
    return "logit lens" if (meta.get("options") or {}).get("lens", "logit") == "logit" else "tuned lens"


def _yerr(t, col: str):
    """Error bar lengths below and above from `col_lo` / `col_hi` columns. An interval that could not be computed
    (None or NaN: too few items) is drawn as no bar, its point alone."""
    value, lo, hi = (t[c].astype(float) for c in (col, f"{col}_lo", f"{col}_hi"))
    return [(value - lo).clip(lower=0).fillna(0).to_numpy(), (hi - value).clip(lower=0).fillna(0).to_numpy()]


def _rates(groups, col: str):
    """Per group: the fraction of true `col` with its Wilson interval, as a frame (rate, rate_lo, rate_hi, rate_n)."""
    import pandas as pd

    from ..stats import proportion

    return pd.DataFrame({key: proportion(int(g[col].sum()), len(g), "rate") for key, g in groups}).T


def _means(groups, col: str):
    """Per group: the mean of `col` with its bootstrap interval over items (mean, mean_lo, mean_hi, mean_n)."""
    import pandas as pd

    from ..stats import mean

    return pd.DataFrame({key: mean(g[col], "mean", seed=i) for i, (key, g) in enumerate(groups)}).T.astype(float)


def _note(ax, text: str) -> None:
    from ..stats import level

    ax.text(0.01, 0.97, text.format(level=f"{level():.0%}"), transform=ax.transAxes, fontsize=7, va="top")


def _band(ax, t, fmt: str, label: str, x=None) -> None:
    """A line with its interval as a shaded band (t: a frame from _rates or _means)."""
    value = t.columns[0]
    x = t.index if x is None else x
    ax.plot(x, t[value].astype(float), fmt, label=label)
    ax.fill_between(x, t[f"{value}_lo"].astype(float), t[f"{value}_hi"].astype(float), alpha=0.2)


def _bars(ax, t, fmt: str, label: str, x=None) -> None:
    """Points with error bars (t: a frame from _rates or _means)."""
    value = t.columns[0]
    t = t.astype(float)
    ax.errorbar(t.index if x is None else x, t[value], yerr=_yerr(t, value), fmt=fmt, capsize=3, label=label)


LENS_MAPS = 4  # heat maps drawn for a lens over positions: the first items'


def plot_lens(df, meta: dict, path: Path, layer_col: str = "layer") -> None:
    """The paper's "X": mean reciprocal rank of argument and answer across layers, with a bootstrap band over
    items; a lens over several positions draws layer x position heat maps instead (`plot_lens_positions`)."""
    if "position" in df and df.groupby("item").position.nunique().max() > 1:
        return plot_lens_positions(df, meta, path)
    if "last_position" in df:
        df = df[df.last_position.astype(bool)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col, fmt, label in (("argument_rr", "o-", "argument (e.g. Poland)"), ("answer_rr", "s-", "answer (e.g. Warsaw)")):
        if col in df:
            _band(ax, _means(df.groupby(layer_col), col), fmt, label)
    _note(ax, f"{df.item.nunique()} items; bands: {{level}} bootstrap over items")
    ax.set(xlabel="residual index (0 = embeddings)", ylabel="mean reciprocal rank", ylim=(0, 1.02),
           title=f"{_lens(meta)} · {_title(meta)}")
    ax.legend()
    _save(fig, path)


def plot_lens_positions(df, meta: dict, path: Path) -> None:
    """Per item (the first LENS_MAPS), the answer's lens probability at every layer x position, the prompt's tokens
    as labels, as the pictures of TransformerLens and tuned-lens; the top-1 token is written in each cell when
    there is room."""
    import numpy as np

    items = list(dict.fromkeys(df.item))[:LENS_MAPS]
    widths = [df[df.item == i].position.nunique() for i in items]
    fig, axes = plt.subplots(len(items), 1, squeeze=False,
                             figsize=(min(10, max(7, 2.5 + 0.3 * max(widths))), 0.5 + sum(1.4 + 0.22 * df.layer.nunique()
                                                                                   for _ in items)))
    for ax, item in zip(axes[:, 0], items):
        sub = df[df.item == item]
        grid = sub.pivot_table(index="layer", columns="position", values="answer_prob", aggfunc="first")
        tokens = sub.drop_duplicates("position").set_index("position").token.reindex(grid.columns)
        im = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis", vmin=0,
                       vmax=max(1e-6, float(np.nanmax(grid.to_numpy()))))
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label="P(answer)")
        every = -(-len(tokens) // 40)  # at most 40 labels: every k-th token on a long prompt
        ax.set_xticks(range(0, len(tokens), every), [repr(t)[1:-1] for t in tokens[::every]], rotation=90,
                      fontsize=7)
        ax.set_ylabel("layer")
        ax.set_title(f"item {item}: P({sub.answer_token.iloc[0]!r}), the answer's first token", fontsize=9)
        if len(tokens) <= 24 and grid.shape[0] <= 24:
            top = sub.pivot_table(index="layer", columns="position", values="top1", aggfunc="first")
            for (y, x), text in np.ndenumerate(top.to_numpy()):
                ax.text(x, y, str(text).strip()[:6], ha="center", va="center", fontsize=5, color="white")
    fig.suptitle(f"{_lens(meta)} by layer and position · {_title(meta)}\n{len(items)} of {df.item.nunique()} items",
                 fontsize=10)
    _save(fig, path)


def plot_readout(df, meta: dict, path: Path) -> None:
    rr = df.assign(arg=1 / (df.argument_rank_after_ffn + 1), ans=1 / (df.answer_rank_after_ffn + 1),
                   ffn=1 / (df.ffn_answer_rank + 1))
    items = df.groupby("item").first()
    switches = items[items.switch_by == "ffn"].switch_block.value_counts().sort_index()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    for col, fmt, label in (("arg", "o-", "argument, residual"), ("ans", "s-", "answer, residual"),
                            ("ffn", "^--", "answer, FFN update alone")):
        t = _means(rr.groupby("block"), col)
        _band(a, t, fmt, label, x=t.index + 1)
    _note(a, f"{len(items)} items; bands: {{level}} bootstrap over items")
    a.set(xlabel="residual index after block's FFN", ylabel="mean reciprocal rank", ylim=(0, 1.02),
          title=f"FFN read-out, {_lens(meta)} · {_title(meta)}")
    a.legend(fontsize=8)
    b.bar(switches.index, switches.values)
    b.set(xlabel="block whose FFN makes the answer top-1", ylabel="prompts",
          title=f"function application ({int(switches.sum())} of {len(items)} prompts)")
    _save(fig, path)


def plot_transplant(df, meta: dict, path: Path) -> None:
    moved = df[df.vector != "none"]
    base = _rates([("none", df[df.vector == "none"])], "top1").astype(float).iloc[0]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (vector, scale), g in moved.groupby(["vector", "scale"], sort=False):
        t = _rates(g.groupby("blocks", sort=False), "top1")
        _bars(ax, t, "o-", f"{vector} x{scale:g}", x=range(len(t)))
        ax.set_xticks(list(range(len(t))), list(t.index), rotation=90 if len(t) > 12 else 0, fontsize=7)
    ax.axhline(base.rate, color="gray", ls=":", label="without o")
    ax.axhspan(base.rate_lo, base.rate_hi, color="gray", alpha=0.15)
    _note(ax, f"{df.item.nunique()} targets; bars: {{level}} Wilson, each point on its own (not selection-adjusted)")
    ax.set(xlabel="blocks where o is put", ylabel="answer top-1 (fraction)", ylim=(0, 1.02),
           title=f"FFN transplant · {_title(meta)}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_ablation(df, meta: dict, path: Path) -> None:
    plot_ablation_compare({meta.get("task", ""): df}, {meta.get("task", ""): ""}, path, meta.get("model", ""))


def plot_ablation_compare(tables: dict, kinds: dict, path: Path, model: str) -> None:
    """Accuracy against FFN blocks removed, one line per task (abstractive solid, extractive dashed), with Wilson
    error bars."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for task, df in tables.items():
        t = _rates(df.groupby("n_ablated"), "correct")
        kind = kinds[task]
        _bars(ax, t, "s--" if kind == "extractive" else "o-", f"{task} ({kind})" if kind else task)
    _note(ax, "; ".join(f"{task}: {df.item.nunique()} items" for task, df in tables.items())
          + "; bars: {level} Wilson")
    ax.set(xlabel="FFN blocks removed (from the top)", ylabel="accuracy", ylim=(0, 1.02),
           title=f"FFN ablation · {model}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_nback(df, meta: dict, path: Path) -> None:
    from ..methods.nback import nback_table

    t = nback_table(df).astype(float)  # rates of an empty class (no match trials) are None: NaN, no point
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for col, fmt, label in (("accuracy", "o-", "accuracy"), ("hit_rate", "s--", "hit rate"),
                            ("false_alarm_rate", "^--", "false-alarm rate")):
        a.errorbar(t.index, t[col], yerr=_yerr(t, col), fmt=fmt, capsize=3, label=label)
    a.set(xlabel="N", ylabel="rate", ylim=(0, 1.02), title=f"N-back · {_title(meta)}")
    a.legend(fontsize=8)
    b.errorbar(t.index, t.dprime, yerr=_yerr(t, "dprime"), fmt="o-", capsize=3)
    b.axhline(0, color="gray", ls=":")
    b.set(xlabel="N", ylabel="d' (signed)", title="sensitivity")
    _save(fig, path)


def _nothing_to_draw(meta: dict, path: Path, why: str) -> None:
    """A figure that says why there is no plot (too few items, or a table that says it all), so every run of a
    probe that plots has its plot.png."""
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, f"{_title(meta)}\nnothing to draw: {why}", ha="center", va="center", wrap=True)
    _save(fig, path)


def plot_attention(df, meta: dict, path: Path) -> None:
    """Entropy against N per layer, and the trial-averaged letter-to-letter attention of the best N-back head
    (chosen on one half of the sequences, averaged over the other, as the summary does). In-context classification:
    the query's attention on the matching items and labels by layer (the summary's table says it all)."""
    if "item_mass" in df:
        return _nothing_to_draw(meta, path, "the query's attention by layer is the summary's table (see meta.json)")
    if "chain_mass" in df:
        return plot_path_attention(df, meta, path)
    import json

    import numpy as np

    from ..methods.attention import attention_table, nback_heads
    from ..stats import halves

    select, report = halves(df.item, meta.get("seed", 0), strata=df.n)
    ns = sorted(df.n.unique())
    # the entropy panel, then the heat maps three to a row: a page-wide figure whose text stays readable
    cols = min(3, len(ns)) or 1
    rows = 1 + -(-len(ns) // cols)
    fig = plt.figure(figsize=(3.4 * cols + 0.6, 3.6 * rows))
    grid = fig.add_gridspec(rows, cols)
    axes = [fig.add_subplot(grid[0, :])] + [fig.add_subplot(grid[1 + i // cols, i % cols]) for i in range(len(ns))]
    layers = sorted(df.layer.unique())
    for layer in layers:
        per_seq = df[df.layer == layer].groupby(["n", "item"]).entropy_nosink.mean().reset_index()
        _bars(axes[0], _means(per_seq.groupby("n"), "entropy_nosink"), "o-", f"layer {layer}")
    _note(axes[0], f"{df.item.nunique()} sequences; bars: {{level}} bootstrap over sequences")
    axes[0].set(xlabel="N", ylabel="row entropy, no sink (nats)", title="entropy by N")
    fig.suptitle(f"attention · {_title(meta)}", fontsize=10)
    axes[0].legend(fontsize=7, ncol=max(1, len(layers) // 6), title="layer" if len(layers) > 10 else None,
                   loc="center left", bbox_to_anchor=(1.01, 0.5))
    heads = nback_heads(attention_table(df[df.item.isin(select)]))
    for ax, n in zip(axes[1:], ns):
        _, layer, head = heads[n]
        rows = df[(df.n == n) & (df.layer == layer) & (df["head"] == head) & df.item.isin(report)].letter_attention
        mean = np.mean([np.array(json.loads(x)) for x in rows], axis=0)
        im = ax.imshow(mean, cmap="viridis")
        fig.colorbar(im, ax=ax, fraction=0.046, label="attention")
        ax.set_title(f"N={n}: layer {layer} head {head}\n(shown on {len(rows)} held-out sequences)", fontsize=9)
        ax.set(xlabel="key letter", ylabel="query letter")
    _save(fig, path)


def plot_path_attention(df, meta: dict, path: Path) -> None:
    """Trees: the mean attention of the root (step 0; every step where no item is at step 0) on each role, per
    layer and head: backward chaining is the diagonal goal, edge_up0, edge_up1, ... (edges further up than the
    layers, and the path edges' sources, summed)."""
    import numpy as np

    from ..methods.tree_attention import role_means

    rows = df[df.step == 0] if (df.step == 0).any() else df
    depth = int(df.layer.max())  # backward chaining reaches edge_up<depth - 1> by the last layer
    near = [f"edge_up{k}" for k in range(depth)]

    def fold(m: dict) -> dict:
        out = {r: v for r, v in m.items() if "_up" not in r or r in near}
        out[f"edge_up{depth}+"] = sum(v for r, v in m.items() if r.startswith("edge_up") and r not in near)
        out["source_up*"] = sum(v for r, v in m.items() if r.startswith("source_up"))
        return out

    means = {f"L{layer}H{head}": fold(role_means(g)) for (layer, head), g in rows.groupby(["layer", "head"])}
    roles = ["goal", *near, f"edge_up{depth}+", "source_up*", "edge", "source", "comma", "bar", "colon", "root",
             "path"]
    grid = np.array([[m.get(r, 0.0) for r in roles] for m in means.values()])
    fig, ax = plt.subplots(figsize=(0.45 * len(roles) + 2.5, 0.4 * len(means) + 2))
    im = ax.imshow(grid, cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax, fraction=0.03, label="mean attention")
    ax.set_xticks(range(len(roles)), roles, rotation=70, fontsize=7)
    ax.set_yticks(range(len(means)), list(means), fontsize=7)
    ax.set_title(f"attention of the {'root' if (df.step == 0).any() else 'last position'} by role "
                 f"({rows.item.nunique()} items)\n{_title(meta)}", fontsize=9)
    _save(fig, path)


def plot_patching(df, meta: dict, path: Path) -> None:
    """Mean recovery per block x position from the end, one heat map per site (the pairs with a gap to recover)."""
    import numpy as np

    from ..methods.patching import pairs_used

    used = pairs_used(df)
    cells = df[df.item.isin(used) & (df.position != "whole")]
    sites = list(dict.fromkeys(cells.site)) or ["resid"]
    fig, axes = plt.subplots(1, len(sites), figsize=(4.5 * len(sites), 3.8), squeeze=False)
    for ax, site in zip(axes[0], sites):
        across = "head" if site == "head" else "from_end"  # heads: block x head, over the positions patched
        heat = cells[cells.site == site].pivot_table(index="block", columns=across, values="recovery",
                                                     aggfunc="mean")
        if heat.empty:
            continue
        im = ax.imshow(heat.to_numpy(dtype=float), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1,
                       extent=(heat.columns.min() - 0.5, heat.columns.max() + 0.5, heat.index.max() + 0.5,
                               heat.index.min() - 0.5))
        ax.set(xlabel="head" if site == "head" else "position (from the end)", ylabel="block",
               title=f"{site} · {_title(meta)}")
        ax.set_xticks(np.asarray(heat.columns, dtype=int))
        fig.colorbar(im, ax=ax, label="recovery")
    _note(axes[0][0], f"{len(used)} pairs; mean over pairs")
    _save(fig, path)


def plot_linear_probe(df, meta: dict, path: Path) -> None:
    """Held-out accuracy per layer with Wilson bars, beside the shuffled-label and random-weights controls."""
    from ..methods.linear_probe import summarize_linear_probe

    summary = meta.get("summary") or summarize_linear_probe(df, meta.get("seed", 0))  # the fits are not redone
    if "labels" in summary or "positions" in summary:
        return plot_probe_matrix(summary, meta, path)
    if not summary["layers"]:
        return _nothing_to_draw(meta, path, summary.get("note", "no layer was fitted"))
    import pandas as pd

    t = pd.DataFrame(summary["layers"]).T.astype(float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, fmt, label in (("accuracy", "o-", "probe"), ("shuffled_accuracy", "s--", "shuffled labels"),
                             ("random_accuracy", "^--", "random weights")):
        _bars(ax, t[[name, f"{name}_lo", f"{name}_hi"]], fmt, label)
    _note(ax, f"fitted on {summary['train']} items, scored on {summary['test']}; bars: {{level}} Wilson")
    ax.set(xlabel="layer (resid: 0 = embeddings)", ylabel="held-out accuracy", ylim=(0, 1.02),
           title=f"linear probe · {_title(meta)}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_probe_matrix(summary: dict, meta: dict, path: Path) -> None:
    """Several labels or positions: held-out accuracy per label (rows; `position · label` with several positions)
    and layer (columns), each cell written out."""
    import numpy as np

    rows = {}
    for where, per in (summary["positions"].items() if "positions" in summary else [("", summary)]):
        for label, s in (per["labels"].items() if "labels" in per else [("", per)]):
            if s["layers"]:
                rows[" · ".join(x for x in (where, label) if x)] = s
    if not rows:
        return _nothing_to_draw(meta, path, "fewer than two classes with two items each, for every label: nothing "
                                "to hold out")
    names = list(rows)
    layers = sorted({layer for n in names for layer in rows[n]["layers"]})
    acc = np.array([[rows[n]["layers"].get(layer, {}).get("accuracy", np.nan) for layer in layers] for n in names])
    fig, ax = plt.subplots(figsize=(max(5, 1 + 0.7 * len(layers)), 1.2 + 0.45 * len(names)))
    im = ax.imshow(acc, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.04, label="held-out accuracy")
    for (y, x), v in np.ndenumerate(acc):
        ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(len(layers)), layers)
    test = {rows[n]["test"] for n in names}
    ax.set(xlabel="layer (resid: 0 = embeddings)", ylabel="position · label" if "positions" in summary else "label",
           title=f"linear probes · {_title(meta)}\n(scored on {min(test)}-{max(test)} held-out items per row)")
    _save(fig, path)
