"""One figure per probe, written next to its table as plot.png (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..runs.rundir import atomic_write  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120), binary=True)
    plt.close(fig)


def _title(meta: dict) -> str:
    return f"{meta.get('model', '')} · {meta.get('task', '')}"


def _yerr(t, col: str):
    """Error bar lengths below and above from `col_lo` / `col_hi` columns."""
    return [(t[col] - t[f"{col}_lo"]).clip(lower=0).to_numpy(), (t[f"{col}_hi"] - t[col]).clip(lower=0).to_numpy()]


def plot_lens(df, meta: dict, path: Path, layer_col: str = "layer") -> None:
    """The paper's "X": mean reciprocal rank of argument and answer across layers, with a bootstrap band over
    items."""
    from ..stats import level, mean

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col, fmt, label in (("argument_rr", "o-", "argument (e.g. Poland)"), ("answer_rr", "s-", "answer (e.g. Warsaw)")):
        rows = [{"layer": layer, **mean(g[col], "m", seed=int(layer))} for layer, g in df.groupby(layer_col)]
        x = [r["layer"] for r in rows]
        ax.plot(x, [r["m"] for r in rows], fmt, label=label)
        ax.fill_between(x, [r["m_lo"] for r in rows], [r["m_hi"] for r in rows], alpha=0.2)
    ax.text(0.01, 0.97, f"{df.item.nunique()} items; bands: {level():.0%} bootstrap over items",
            transform=ax.transAxes, fontsize=7, va="top")
    ax.set(xlabel="residual index (0 = embeddings)", ylabel="mean reciprocal rank", ylim=(0, 1.02),
           title=f"logit lens · {_title(meta)}")
    ax.legend()
    _save(fig, path)


def plot_readout(df, meta: dict, path: Path) -> None:
    per = df.groupby("block").agg(arg=("argument_rank_after_ffn", lambda r: (1 / (r + 1)).mean()),
                                  ans=("answer_rank_after_ffn", lambda r: (1 / (r + 1)).mean()),
                                  ffn=("ffn_answer_rank", lambda r: (1 / (r + 1)).mean()))
    items = df.groupby("item").first()
    switches = items[items.switch_by == "ffn"].switch_block.value_counts().sort_index()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(per.index + 1, per.arg, "o-", label="argument, residual")
    a.plot(per.index + 1, per.ans, "s-", label="answer, residual")
    a.plot(per.index + 1, per.ffn, "^--", label="answer, FFN update alone")
    a.set(xlabel="residual index after block's FFN", ylabel="mean reciprocal rank", ylim=(0, 1.02),
          title=f"FFN read-out · {_title(meta)}")
    a.legend(fontsize=8)
    b.bar(switches.index, switches.values)
    b.set(xlabel="block whose FFN makes the answer top-1", ylabel="prompts", title="function application")
    _save(fig, path)


def plot_transplant(df, meta: dict, path: Path) -> None:
    moved = df[df.vector != "none"]
    base = df[df.vector == "none"].top1.mean()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for (vector, scale), g in moved.groupby(["vector", "scale"], sort=False):
        by = g.groupby("blocks", sort=False).top1.mean()
        x = range(len(by))
        ax.plot(x, by.values, "o-", label=f"{vector} x{scale:g}")
        ax.set_xticks(list(x), list(by.index), rotation=90 if len(by) > 12 else 0, fontsize=7)
    ax.axhline(base, color="gray", ls=":", label="without o")
    ax.set(xlabel="blocks where o is put", ylabel="answer top-1 (fraction)", ylim=(0, 1.02),
           title=f"FFN transplant · {_title(meta)}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_ablation(df, meta: dict, path: Path) -> None:
    acc = df.groupby("n_ablated").correct.mean()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(acc.index, acc.values, "o-", label=meta.get("task", ""))
    ax.set(xlabel="FFN blocks removed (from the top)", ylabel="accuracy", ylim=(0, 1.02),
           title=f"FFN ablation · {_title(meta)}")
    ax.legend()
    _save(fig, path)


def plot_ablation_compare(tables: dict, kinds: dict, path: Path, model: str) -> None:
    """Abstractive and extractive tasks side by side: accuracy against FFN blocks removed."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for task, df in tables.items():
        acc = df.groupby("n_ablated").correct.mean()
        ax.plot(acc.index, acc.values, "o-" if kinds[task] == "abstractive" else "s--", label=f"{task} ({kinds[task]})")
    ax.set(xlabel="FFN blocks removed (from the top)", ylabel="accuracy", ylim=(0, 1.02),
           title=f"FFN ablation · {model}")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_nback(df, meta: dict, path: Path) -> None:
    from ..methods.nback import nback_table

    t = nback_table(df)
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


def plot_attention(df, meta: dict, path: Path) -> None:
    """Entropy against N per layer, and the trial-averaged letter-to-letter attention of the best N-back head."""
    import json

    import numpy as np

    from ..methods.attention import attention_table, nback_heads

    t = attention_table(df)
    ns = sorted(df.n.unique())
    fig, axes = plt.subplots(1, 1 + len(ns), figsize=(4 + 3 * len(ns), 3.5))
    per_layer = t.groupby(["n", "layer"]).entropy_nosink.mean().unstack("layer")
    for layer in per_layer.columns:
        axes[0].plot(per_layer.index, per_layer[layer], "o-", lw=1, label=f"layer {layer}")
    axes[0].set(xlabel="N", ylabel="row entropy, no sink (nats)", title=f"attention · {_title(meta)}")
    if len(per_layer.columns) <= 10:
        axes[0].legend(fontsize=6)
    heads = nback_heads(t)
    for ax, n in zip(axes[1:], ns):
        _, layer, head = heads[n]
        rows = df[(df.n == n) & (df.layer == layer) & (df["head"] == head)].letter_attention
        mean = np.mean([np.array(json.loads(x)) for x in rows], axis=0)
        ax.imshow(mean, cmap="viridis")
        ax.set(title=f"N={n}: layer {layer} head {head}", xlabel="key letter", ylabel="query letter")
    _save(fig, path)
