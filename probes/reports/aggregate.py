"""Tables across runs: every complete run folder under a results folder, one row per run, grouped as asked.

Each run's meta.json carries its config and its probe's summary; summaries are flattened into columns
("best.top1", "by_n.3.dprime"), so a new probe needs no code here. Summaries keyed by a dimension (ablation
variants, N-back N) also come out as long "curves" tables. Model size (`params`) and family are columns, so a
sweep over model sizes gives the across-scale tables directly; a trained run's checkpoints carry `training_run`
and `step`, so a sweep over checkpoints gives each metric against training step. Probe runs on trained variants (value residual or
not, over seeds) also give '<probe>-paired' tables: each variant against the reference item by item (reports/paired.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from ..errors import ProbeError, choice_error
from ..runs.rundir import atomic_write, write_csv
from ..stats import student_half, wilson
from .trend import check_field, headline_metrics, trend_table

log = logging.getLogger("probes")
UNIT_COLUMNS = ["model", "params", "family", "task", "kind", "probe", "seed", "training_config", "training_run",
                "step"]
TRAINING_COLUMNS = ("training_config", "training_run", "step")  # a trained checkpoint's; none for pretrained models
# what else makes two runs comparable: runs that differ in any of these are never merged into one row
SETUP_COLUMNS = ["limit", "task_version", "task_digest", "task_options", "options", "dtype", "quantize", "lens"]
TASK_SETUP = ("task_version", "task_digest")  # tell versions of one task apart; a row averaging tasks has several
# probe -> (summary key holding {dimension value: metrics}, dimension name); these go to the curve table only
CURVES = {"ffn-ablation": ("accuracy", "variant"), "nback": ("by_n", "n"), "attention": ("by_n", "n")}
CURVE_METRICS = {"ffn-ablation": ("accuracy",), "nback": ("accuracy", "dprime"),
                 "attention": ("entropy_nosink", "total_entropy")}  # shown one column per dimension value
# ablation's summary holds one mapping {variant: value} per metric; each becomes a column of the curve table
PARALLEL = {"ffn-ablation": ("accuracy_lo", "accuracy_hi", "accuracy_k", "accuracy_n", "relative_drop",
                             "relative_drop_lo", "relative_drop_hi", "p_vs_none")}
CURVE_ONLY = {"ffn-ablation": ("accuracy", *PARALLEL["ffn-ablation"]), "nback": ("by_n",), "attention": ("by_n",)}
# the headline metric of each probe (a column, or a pattern of columns), for the report's plots against model size
# and training step; attention's: the held-out N-back head's mass on the letter N back, per N
HEADLINE = {"accuracy": "accuracy", "logit-lens": "accuracy", "ffn-readout": "answer_top1_layer",
            "ffn-transplant": r"best\.top1", "nback": "accuracy", "attention": r"nback_head\.\d+\.nback_mass_nonmatch"}


def complete_runs(results: Path, skipped: dict | None = None) -> list[dict]:
    """meta.json of every complete run under `results`; the others go to `skipped` ({folder: reason})."""
    runs = []
    for meta_path in sorted(Path(results).rglob("meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:  # cannot happen with atomic writes: a hand-edited or damaged file
            reason = f"meta.json cannot be read ({type(e).__name__})"
        else:
            if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
                reason = "meta.json is not a run's metadata" + (f" (a JSON {type(meta).__name__})"
                                                               if not isinstance(meta, dict) else " (no config)")
            elif meta.get("kind") == "training":
                if meta.get("status") == "complete":
                    continue  # the training tables take it (reports/training.py)
                reason = f"an unfinished training run (status {meta.get('status')})"
            elif meta.get("status") != "complete":
                reason = f"status {meta.get('status')}"
            elif problem := _not_a_run(meta):
                reason = problem
            else:
                meta["path"] = str(meta_path.parent)
                runs.append(meta)
                continue
        if skipped is not None:
            skipped[str(meta_path.parent)] = reason
    return runs


def _not_a_run(meta: dict) -> str | None:
    """What a complete run's meta.json lacks of what run folders write (runs/rundir.py), if anything."""
    from ..methods.catalog import PROBES

    config = meta["config"]
    missing = [k for k in ("model", "task", "probe") if not isinstance(config.get(k), str)]
    if missing:
        return f"meta.json's config has no {', '.join(missing)}"
    if config["probe"] not in PROBES:
        return f"meta.json names an unknown probe {config['probe']!r}"
    if not isinstance(meta.get("summary"), dict):
        return f"meta.json's summary is a {type(meta.get('summary')).__name__}, not a mapping"
    return None


def _unit(meta: dict) -> dict:
    c = meta["config"]
    setup = {"limit": c.get("limit"), "task_version": c.get("task_version"), "task_digest": c.get("task_digest"),
             "task_options": json.dumps({k: v for k, v in (c.get("task_options") or {}).items() if k != "seed"},
                                        sort_keys=True, default=str),
             "options": json.dumps(c.get("options") or {}, sort_keys=True, default=str),
             "dtype": c.get("dtype"), "quantize": c.get("quantize"),
             # a tuned lens' digest (the column only where some run used one): two tuned lenses never pool
             **({"lens": c["tuned_lens"].get("params_sha256")} if c.get("tuned_lens") else {})}
    trained = meta.get("training") or {}
    return {"model": c["model"], "params": meta.get("model_params"), "family": meta.get("family"),
            "task": c["task"], "kind": meta.get("task_kind"), "probe": c["probe"], "seed": c.get("seed"),
            "training_config": trained.get("config"), "training_run": trained.get("run"), "step": trained.get("step"),
            **setup}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def summary_table(runs: list[dict], probe: str) -> pd.DataFrame:
    skip = CURVE_ONLY.get(probe, ())
    rows = [{**_unit(m), **_flat({k: v for k, v in (m.get("summary") or {}).items()
                                  if not (k in skip and isinstance(v, dict))})}
            for m in runs if m["config"]["probe"] == probe]
    return pd.DataFrame(rows)


def curve_table(runs: list[dict], probe: str) -> pd.DataFrame:
    key, dim = CURVES[probe]
    rows = []
    for m in runs:
        if m["config"]["probe"] != probe:
            continue
        summary = m.get("summary") or {}
        for value, metrics in (summary.get(key) or {}).items():
            row = {**_unit(m), dim: value}
            if isinstance(metrics, dict):
                row.update(metrics)
            else:  # ablation: {variant: accuracy} plus parallel mappings of its other metrics
                row.update({key: metrics, **{k: (summary.get(k) or {}).get(value) for k in PARALLEL[probe]}})
            rows.append(row)
    return pd.DataFrame(rows)


def group(df: pd.DataFrame, by: list[str], keep: list[str] = ()) -> pd.DataFrame:
    """One row per `by` (+ `keep`, e.g. a curve's dimension) and setup (SETUP_COLUMNS: runs of another limit,
    task content or options are never merged). Runs that differ only by seed are pooled: a rate with its counts
    (`x_k`, `x_n`) becomes the pooled k / n with its Wilson interval and, beside it, the mean over the runs as
    replicates (`x_mean` with its t interval `x_mean_lo`/`_hi` and standard error `x_mean_se`: runs are models,
    and models vary more than trials do) and `x_sd` (the spread across runs); other metrics are averaged, and those
    with an interval get the interval of that mean over the runs (t, the runs as replicates), `x_se` and `x_sd`.
    `runs` counts the runs of each row, `seeds` their distinct seeds."""
    if df.empty:
        return df
    df = df.drop(columns=[c for c in TRAINING_COLUMNS if c in df and df[c].isna().all()])  # pretrained
    named = [*by, *keep]
    keys = [c for c in [*named, *SETUP_COLUMNS] if c in df and (c not in TASK_SETUP or "task" in named)]
    carried = [c for c in ("params", "family", "kind", *TRAINING_COLUMNS) if c not in keys and c in df
               and df.groupby(keys, dropna=False)[c].nunique(dropna=False).max() <= 1]
    df = df.copy()
    numeric = []
    for c in df.columns:  # metrics that are numbers where defined (None where undefined, e.g. a drop from 0)
        if c in keys + carried + UNIT_COLUMNS or df[c].dtype == bool:
            continue
        if pd.api.types.is_numeric_dtype(df[c]) or df[c].map(
                lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool)).all():
            df[c] = pd.to_numeric(df[c])
            numeric.append(c)
    g = df.groupby(keys, dropna=False, sort=False)
    out = g[numeric].mean()
    pooled = [c for c in numeric if f"{c}_k" in numeric and f"{c}_n" in numeric]
    spreads = {}  # the *_sd columns, added at once
    if pooled:
        sums = g[[f"{c}_{x}" for c in pooled for x in "kn"]].sum()
        for c in pooled:
            k, n = sums[f"{c}_k"], sums[f"{c}_n"]
            out[f"{c}_k"], out[f"{c}_n"] = k, n
            out[c] = (k / n).where(n > 0)
            bounds = [wilson(int(a), int(b)) for a, b in zip(k, n)]
            out[f"{c}_lo"], out[f"{c}_hi"] = [b[0] for b in bounds], [b[1] for b in bounds]
            spreads.update(_replicates(g, c, f"{c}_mean"))  # the models as replicates, beside the pooled trials
    # other metrics with an interval (d', entropies, masses, recovery): across several runs, the interval of their
    # mean with the runs as the replicates (Student's t), and the spread; one run keeps its own interval
    spread = [c for c in numeric if c not in pooled and f"{c}_lo" in numeric and f"{c}_hi" in numeric]
    for c in spread:
        many = g[c].count() > 1  # runs with a value (one NaN of two leaves one run: its own interval)
        across = _replicates(g, c, c)
        out[f"{c}_lo"] = across[f"{c}_lo"].where(many, out[f"{c}_lo"])
        out[f"{c}_hi"] = across[f"{c}_hi"].where(many, out[f"{c}_hi"])
        spreads.update({f"{c}_sd": across[f"{c}_sd"], f"{c}_se": across[f"{c}_se"]})
    # the bounds were replaced column by column: one block again (pandas warns of fragmentation otherwise)
    out = pd.concat([out, pd.DataFrame(spreads, index=out.index)], axis=1).copy()
    out.insert(0, "runs", g.size())
    if "seed" in df and "seed" not in keys:
        out.insert(1, "seeds", g["seed"].nunique(dropna=False))
    for c in carried:
        out.insert(0, c, g[c].first())
    out = out.reset_index()
    sort = [c for c in ("params", *TRAINING_COLUMNS, "model", "task", "probe") if c in out]
    return out.sort_values(sort, kind="stable").reset_index(drop=True) if sort else out


def _replicates(g, column: str, name: str) -> dict:
    """Per group, `column` across its runs as replicates: {name: mean, name_lo, name_hi (Student's t), name_se
    (sd / sqrt(runs)), and the sd as <column>_sd}; the interval is nan for one run."""
    mean, sd, runs = g[column].mean(), g[column].std(), g[column].count()
    half = pd.Series([student_half(s, int(r)) for s, r in zip(sd, runs)], index=sd.index)
    return {name: mean, f"{name}_lo": mean - half, f"{name}_hi": mean + half, f"{name}_se": sd / runs.pow(0.5),
            f"{column}_sd": sd}


def aggregate(results: Path, by: list[str], skipped: dict | None = None, trend: str | None = None) -> dict[str, pd.DataFrame]:
    """{table name: DataFrame}: '<probe>' summaries and '<probe>-curve' tables, grouped by `by`, and the training
    tables of training runs (reports/training.py); with `trend` (a numeric task option, curve dimension or training
    config field, e.g. n), '<table>-trend' tables: each headline metric's slope over it with the runs as replicates
    (reports/trend.py). Folders with a meta.json that are not complete probe runs go to `skipped`
    ({folder: reason})."""
    bad = [b for b in by if b not in UNIT_COLUMNS]
    if bad:
        raise choice_error("--by column", bad[0], UNIT_COLUMNS)
    from .paired import paired_tables
    from .training import training_tables

    skipped = {} if skipped is None else skipped
    runs = complete_runs(results, skipped)
    for folder, reason in skipped.items():  # said wherever tables are made (aggregate, report, the API)
        log.info("skipped %s: %s", folder, reason)
    # training runs: their curves over seeds and steps to given accuracies
    tables = training_tables(results, trend)
    if not runs and not tables:
        first = next(iter(skipped.items()), None)
        why = (f" ({len(skipped)} folder(s) skipped, e.g. {first[0]}: {first[1]})" if first else "")
        raise ProbeError(f"no complete runs under {str(results)!r}{why}; accepted: a results folder written by "
                         "`probe run` or `probe sweep`, or a folder of training runs")
    for probe in sorted({m["config"]["probe"] for m in runs}):
        per_run = {probe: summary_table(runs, probe)}
        tables[probe] = group(per_run[probe], by)
        curve = curve_table(runs, probe) if probe in CURVES else None
        if curve is not None and len(curve):  # (attention on an in-context classifier has no N to draw against)
            tables[f"{probe}-curve"] = group(curve, by, [CURVES[probe][1]])
            per_run[f"{probe}-curve"] = curve
        for name, df in per_run.items() if trend else ():
            t = trend_table(df, trend, by, headline_metrics(df))
            if len(t):
                tables[f"{name}-trend"] = t
    if trend:
        check_field(trend, any(name.endswith("-trend") and len(t) for name, t in tables.items()))
    tables.update(paired_tables(runs))  # trained variants compared item by item
    return tables


def to_markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, floatfmt=".4g")


def write_tables(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """Each table as CSV, Parquet and Markdown under `out`, plus all of them in one tables.md."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, df in tables.items():
        write_csv(out / f"{name}.csv", df)
        atomic_write(out / f"{name}.md", lambda f, df=df: f.write(to_markdown(df) + "\n"))
        tmp = out / f".{name}.parquet.tmp"
        df.to_parquet(tmp, index=False)
        tmp.replace(out / f"{name}.parquet")
        written += [out / f"{name}.{ext}" for ext in ("csv", "parquet", "md")]
    atomic_write(out / "tables.md", lambda f: f.write("\n\n".join(f"## {name}\n\n{to_markdown(df)}"
                                                                    for name, df in tables.items()) + "\n"))
    return written


def curve_wide(curve: pd.DataFrame, probe: str, by: list[str], aggfunc: str = "mean") -> dict[str, pd.DataFrame]:
    """{metric: table with one column per value of the curve's dimension} (ablation variants, N), for reading
    (aggfunc "first" for cells that are already text, e.g. a value with its interval)."""
    dim = CURVES[probe][1]
    index = [c for c in [*by, "params"] if c in curve]
    out = {}
    for m in CURVE_METRICS[probe]:
        if m in curve:
            wide = curve.pivot_table(index=index, columns=dim, values=m, sort=False, aggfunc=aggfunc).reset_index()
            wide.columns.name = None
            out[m] = wide
    return out
