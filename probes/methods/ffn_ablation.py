"""ffn-ablation (Merullo, Eickhoff & Pavlick): zero the FFN updates of chosen blocks, or the paper's identity
replacement (the update becomes the FFN's normalised input, as if the MLP were the identity; not the same as
zeroing), or remove FFNs from the top down in sixths of the network.
"""

from __future__ import annotations

import json

from pathlib import Path

import numpy as np
import torch

from ..errors import ProbeError
from ..models.arch import parse_blocks
from ..stats import bootstrap, difference, finite_or_none, level, mcnemar, proportion
from ..tasks.base import Item, answer_token, item_columns
from .readout import excluded_ids, rank_of, require_finite, restrict, special_flags


def ablate(loaded, prompts: list[str], variants: list[tuple[int, ...]], how: str = "zero") -> torch.Tensor:
    """Final logits (len(prompts) * len(variants), vocab): every prompt once per variant (a set of blocks whose
    FFN updates are zeroed, or replaced by the FFN's input for how='identity'), all in one batch."""
    if how not in ("zero", "identity"):
        raise ProbeError(f"unknown ablation {how!r}; accepted: zero, identity")
    arch = loaded.arch
    batch = [p for p in prompts for _ in variants]
    rows = [[r for r in range(len(batch)) if i in variants[r % len(variants)]] for i in range(arch.n_layers)]
    with loaded.trace(batch, logits_to_keep=1):
        for i in range(arch.n_layers):
            if rows[i]:
                x = arch.block_input(i)
                idx = torch.tensor(rows[i])
                if how == "identity":
                    inp = arch.ffn_input(i, like=x)
                out = arch.ffn_output(i, like=x)
                out[idx] = 0.0 if how == "zero" else inp[idx].to(out.dtype)
        logits = loaded.model.output.logits[:, -1].save()
    return logits.float()


def ablation_variants(n_layers: int, layers=None) -> dict[str, tuple[int, ...]]:
    """None: nothing, then the top 1/6 .. 6/6 of the blocks removed; else the given blocks (and nothing)."""
    if layers in (None, "sixths"):
        out = {"none": ()}
        for k in range(1, 7):
            m = round(n_layers * k / 6)
            out[f"top {k}/6"] = tuple(range(n_layers - m, n_layers))
        return out
    blocks = tuple(parse_blocks(layers, n_layers, "--layers"))
    return {"none": (), f"blocks {','.join(map(str, blocks))}": blocks}


def ablation_passes(n_layers: int, options: dict) -> int:
    """Forward passes per prompt: one per variant."""
    return len(ablation_variants(n_layers, options.get("layers")))


def run_ablation(loaded, items: list[Item], layers=None, how: str = "zero", vocab: str | None = None) -> list[dict]:
    tok = loaded.tokenizer
    variants = ablation_variants(loaded.arch.n_layers, layers)
    names, blocks = list(variants), list(variants.values())
    logits = ablate(loaded, [it.prompt for it in items], blocks, how)
    require_finite(logits, loaded, "ffn-ablation (an ablated variant)")
    logits = restrict(logits, excluded_ids(tok, vocab))
    ids = torch.tensor([answer_token(tok, it) for it in items for _ in blocks], device=logits.device)
    rank = rank_of(logits, ids).tolist()
    top = logits.argmax(-1).tolist()
    special = special_flags(tok, top)
    rows = []
    for r, (it, v) in enumerate((it, v) for it in items for v in range(len(blocks))):
        rows.append({**item_columns(tok, it), "ablation": how, "variant": names[v], "n_ablated": len(blocks[v]),
                     "blocks": json.dumps(list(blocks[v])), "correct": rank[r] == 0, "answer_rank": rank[r],
                     "predicted": tok.decode(top[r]), "special_top1": special[r]})
    return rows


def _drop(none, ablated):
    """Relative accuracy drop (vectorized over resamples): (acc(none) - acc(ablated)) / acc(none)."""
    base = none.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (base - ablated.mean(-1)) / base


def paired_outcomes(df, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """(right without ablation, right with `variant`) per item, in item order."""
    by = df.pivot_table(index="item", columns="variant", values="correct", aggfunc="first")
    return by["none"].to_numpy(dtype=float), by[variant].to_numpy(dtype=float)


def summarize_ablation(df, seed: int = 0) -> dict:
    """Per variant: accuracy with its Wilson interval, the drop relative to no ablation with a paired bootstrap
    interval over items, and an exact McNemar test against no ablation on the same items."""
    by = {v: g.sort_values("item") for v, g in df.groupby("variant", sort=False)}
    rates = {v: proportion(int(g.correct.sum()), len(g), "accuracy") for v, g in by.items()}
    none = by.get("none")
    drops = {v: bootstrap(_drop, *paired_outcomes(df, v), seed=seed, vectorized=True) if none is not None else
             (None, None, None) for v in by}
    return {"items": int(df.item.nunique()),
            **{key: {v: r[key] for v, r in rates.items()}
               for key in ("accuracy", "accuracy_lo", "accuracy_hi", "accuracy_k", "accuracy_n")},
            **{key: {v: finite_or_none(d[i]) for v, d in drops.items()}
               for i, key in enumerate(("relative_drop", "relative_drop_lo", "relative_drop_hi"))},
            "p_vs_none": {v: mcnemar(g.correct.to_numpy(), none.correct.to_numpy()) if none is not None else None
                          for v, g in by.items()}}


def drop_difference(first, second, variant: str, seed: int = 0) -> dict:
    """The relative drop of `variant` on one task minus that on another (different items, each resampled on its
    own): the paper's abstractive-minus-extractive contrast, with its bootstrap interval."""
    d, lo, hi = difference(_drop, paired_outcomes(first, variant), paired_outcomes(second, variant), seed=seed)
    return {"drop_difference": finite_or_none(d), "drop_difference_lo": finite_or_none(lo),
            "drop_difference_hi": finite_or_none(hi)}


def report_ablation(df, summary) -> str:
    table = df.groupby(["variant", "n_ablated"], sort=False).correct.mean().rename("accuracy").reset_index()
    for key in ("accuracy_lo", "accuracy_hi", "relative_drop", "relative_drop_lo", "relative_drop_hi", "p_vs_none"):
        table[key] = [summary[key][v] for v in table.variant]
    return (table.round(3).to_string(index=False) + f"\n\nitems {summary['items']} ({df.ablation.iloc[0]} ablation; "
            f"{level():.0%} Wilson intervals; p_vs_none: exact McNemar against no ablation, same items)")


def compare_tasks(tables: dict, kinds: dict, folder) -> str:
    """Several tasks' runs side by side (`probe run --task a,b`): accuracy by variant, and per variant the
    difference of the relative drops of the first abstractive and the first extractive task with its bootstrap
    interval; the plot is written into `folder` (the model's results folder)."""
    import pandas as pd

    from ..reports.plots import plot_ablation_compare
    from ..stats import interval_text

    acc = pd.DataFrame({f"{t} ({kinds[t]}, {df.item.nunique()} items)": df.groupby("variant", sort=False).correct.mean()
                        for t, df in tables.items()})
    lines = ["\n== accuracy by FFN blocks removed\n" + acc.round(3).to_string()]
    first = {k: next((t for t in tables if kinds[t] == k), None) for k in ("abstractive", "extractive")}
    if all(first.values()):
        a, e = first["abstractive"], first["extractive"]
        lines.append(f"\nrelative drop of {a} minus that of {e} ({level():.0%} bootstrap over each task's items):")
        lines += [f"  {v}: {interval_text(drop_difference(tables[a], tables[e], v), 'drop_difference')}"
                  for v in tables[a].variant.unique() if v != "none" and v in set(tables[e].variant)]
    path = Path(folder) / ("ablation-" + "+".join(tables) + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_ablation_compare(tables, kinds, path, Path(folder).name)
    return "\n".join(lines + [f"plot: {path}"])
