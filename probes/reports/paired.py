"""Trained variants compared on the same items: a probe run on each seed's model of each variant (value_residual
none / previous ...), its per-item measure averaged over the seeds of a variant, and each variant against the
reference (the variant with a `none`, else the first) item by item: the mean paired difference with a bootstrap
interval over items and a sign-flip permutation test. Pairing is by item (the same prompt), so the test asks
whether the variant moves the measure on the prompts themselves; seeds enter as the average they give per item
(with a handful of seeds, a test over seeds would have no power, and pairing seed i of one variant with seed i of
another pairs nothing the two share beyond the data order).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..runs.rundir import read_table
from ..stats import mean, sign_flip
from .training import label_runs


def _induction(df: pd.DataFrame) -> pd.Series:
    loss = df.dropna(subset=["loss_first"])
    return (loss.loss_first - loss.loss_repeat).set_axis(loss["item"])


# probe -> (measure, per-item values from its table.csv)
PER_ITEM = {
    "logit-difference": ("logit difference (answer - argument)", lambda df: df.set_index("item").logit_diff),
    "icl-score": ("in-context learning score (late - early loss)",
                  lambda df: df[df.reaches_late.astype(bool)].set_index("item").score),
    "induction": ("loss drop on the repeat (first pass - repeat)", _induction),
}


def paired_tables(runs: list[dict]) -> dict[str, pd.DataFrame]:
    """{'<probe>-paired': table} for the probes of PER_ITEM run on trained models of two or more variants."""
    mine = [m for m in runs if m["config"]["probe"] in PER_ITEM and (m.get("training") or {}).get("path")]
    folders = sorted({m["training"]["path"] for m in mine})
    configs = []
    for folder in folders:
        try:
            configs.append({"config": json.loads((Path(folder) / "meta.json").read_text())["config"], "path": folder})
        except (OSError, ValueError, KeyError):
            continue  # a training run moved away: its probe runs are left out of the comparison
    if not configs:
        return {}
    labels = label_runs(configs).set_index("path")
    rows: dict[str, list] = {}
    keyed: dict[tuple, dict] = {}
    for m in mine:
        folder = m["training"]["path"]
        if folder not in labels.index:
            continue
        lab = labels.loc[folder]
        key = (m["config"]["probe"], m["config"]["task"], lab.training_config, m["training"].get("step"))
        values = PER_ITEM[key[0]][1](read_table(Path(m["path"]) / "table.csv"))
        keyed.setdefault(key, {}).setdefault(lab.variant, []).append(values)
    for (probe, task, config, step), variants in sorted(keyed.items(), key=lambda kv: json.dumps(kv[0], default=str)):
        if len(variants) < 2:
            continue
        means = {v: pd.concat(seeds, axis=1).dropna().mean(axis=1) for v, seeds in variants.items()}
        reference = next((v for v in sorted(means) if "=none" in v), sorted(means)[0])
        for variant in sorted(v for v in means if v != reference):
            a, b = means[variant].align(means[reference], join="inner")
            rows.setdefault(f"{probe}-paired", []).append({
                "probe": probe, "task": task, "training_config": config, "step": step,
                "measure": PER_ITEM[probe][0], "variant": variant, "reference": reference,
                "seeds": len(variants[variant]), "reference_seeds": len(variants[reference]),
                **mean(a, "variant_mean"), **mean(b, "reference_mean"), **mean(a - b, "difference"),
                "p_sign_flip": sign_flip(a, b)})
    return {name: pd.DataFrame(r) for name, r in rows.items()}
