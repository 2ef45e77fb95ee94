"""The Python API: what the `probe` command does, callable from a notebook. The command is a thin layer over it.

    import probes

    model = probes.load("tiny-gpt2")                  # registry name, checkpoint folder or config file
    task = probes.task("capitals", shots=1)           # task name or .yaml file, fields overridden
    result = probes.run(model, task, "logit-lens", limit=8)
    result.table                                      # the rows of table.csv (a pandas DataFrame)
    result.summary                                    # the summary of meta.json

Bad input raises `ProbeError` with the one-line message the command prints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from .methods.catalog import PROBES, taking
from .methods.option_types import OPTIONS, options_text
from .models.loading import Loaded, load_model, load_remote
from .models.options import load_options
from .models.planning import check_fits
from .models.registry import ModelSpec, load_registry, resolve_model
from .methods import tuned_lens
from .runs.execution import Result, execute
from .runs.plan import plan_run
from .tasks.base import Task
from .tasks.files import available_tasks, load_task

log = logging.getLogger("probes")


def load(model: str | ModelSpec, *, dtype: str | None = None, quantize: str | None = None,
         device_map: str | dict | None = None, max_memory: str | dict | None = None, gpus: int | None = None,
         compute_dtype: str | None = None, attn_implementation: str | None = None, remote: bool = False,
         check_fit: bool = True) -> Loaded:
    """Load a model as `probe run --model` does: a registry name, a checkpoint folder or a config file (a random
    model), with the registry entry's options, each overridable. A hub model is first checked against this
    machine's memory (refused before any download if it cannot fit; `check_fit=False` when the caller has done
    so). `remote=True` runs its traces on NDIF.

    The result exposes `.model` (the nnsight model), `.tokenizer` and `.arch` (residual stream at index i,
    attention and FFN updates of block i inside a trace, `decode` anywhere)."""
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if remote:
        return load_remote(spec, **extra)
    opts = load_options(spec, dtype=dtype, device_map=device_map, quantize=quantize, max_memory=max_memory,
                        gpus=gpus, compute_dtype=compute_dtype)
    if spec.source == "hub" and check_fit:
        check_fits(spec, opts, gpus)
    log.info("loading %s (%s) ...", spec.name, spec.where())
    return load_model(spec, **opts, **extra)


def task(name: str | Path, **fields) -> Task:
    """A task by name (see `list_tasks`) or .yaml file, with fields overridden as `--task-option FIELD=VALUE`.
    `.items()` lists its items (prompt, answer, argument, group); `.scored_items(tokenizer)` those a model's
    tokenizer scores, with the reasons the others are dropped."""
    return load_task(str(name), fields)


def prompts(source: str | Path | list[dict], **options) -> Task:
    """A task of your own prompts: a CSV/JSONL file with prompt and answer columns (and optionally argument,
    group), or the rows as dicts, e.g. `probes.prompts([{"prompt": "The capital of France is", "answer": "Paris"}])`.
    `options`: delimiter (put before the answer; default one space), ambiguous (flag, the default, or drop), seed."""
    from .tasks.prompts import prompts_task

    if isinstance(source, (str, Path)):
        return prompts_task(source, overrides=options)
    return prompts_task(rows=source, overrides=options)


def run(model: Loaded | str, task: Task | str, probe: str = "logit-lens", *, limit: int | None = None,
        batch_size: int | str = 8, output: str | Path | None = None, overwrite: bool = False,
        progress: bool = False, self_check: bool = True, **options) -> Result:
    """Run `probe` on (model, task) as `probe run` does, with the probe's options by name (below; `probes.options()`
    lists them). With `output`, the run folder is kept there (table.csv, meta.json, plot) and a rerun resumes it;
    without, it is written to a temporary folder and removed. A model given by name is loaded with what the probe
    needs (eager attention for `attention`). Before the first batch the run checks on its first prompts that the
    probes read what the model computes (runs/selfcheck.py): a failure raises ProbeError naming the check;
    `self_check=False` goes on anyway.

    Options:
"""
    if isinstance(task, str):
        task = load_task(task)
    given = {"loaded": model} if isinstance(model, Loaded) else {"model": model}
    plan = plan_run(tasks=[task], probe=probe, options=options, limit=limit, batch_size=batch_size, output=output,
                    overwrite=overwrite, self_check=self_check, **given)
    return execute(plan, model if isinstance(model, Loaded) else None, progress=progress)[task.name]


run.__doc__ += options_text()


def train_lens(model: Loaded | str, *, tokens: int = tuned_lens.TOKENS, corpus: str = tuned_lens.CORPUS,
               output: str | Path | None = None, progress: bool = False) -> Path:
    """Train a tuned lens for a model (loaded, or by name as `load` takes it) as `probe lens train` does: `tokens`
    tokens of `corpus` (stdlib-english, dataset:NAME or file:PATH), into `output` or the model's cache folder, which
    `run(..., lens="tuned")` reads; returns the folder (config.json and params.pt in the tuned-lens package's format,
    meta.json with the training figures). Method and where it differs from the package: probes/methods/tuned_lens.py."""
    return tuned_lens.train_lens(model if isinstance(model, Loaded) else load(model), tokens, corpus, output, progress)


def aggregate(results: str | Path = "results", by: tuple[str, ...] | list[str] = ("model", "task", "probe"),
              skipped: dict | None = None, trend: str | None = None) -> dict[str, pd.DataFrame]:
    """Every complete run under `results` as tables (one per probe, and curves), as `probe aggregate` writes;
    folders that are not complete runs go to `skipped` ({folder: reason}) and are logged. `trend`: a numeric
    setting (e.g. "n") to test each metric's trend over, the runs as replicates ('<table>-trend' tables)."""
    from .reports.aggregate import aggregate as _aggregate

    return _aggregate(Path(results), list(by), skipped, trend)


def list_models() -> pd.DataFrame:
    """The registry: name, family, parameters, source and whether it loads on this machine."""
    return pd.DataFrame([{"name": s.name, "family": s.family, "params": s.params, "loads_from": s.where(),
                          "available": s.available()} for s in load_registry().values()])


def list_tasks() -> dict[str, Path]:
    """Task name -> its file."""
    return available_tasks()


def list_probes() -> dict[str, str]:
    """Probe name -> what it measures."""
    return {name: p.about for name, p in PROBES.items()}


def options() -> pd.DataFrame:
    """Every probe option: its keyword, command-line flag, the probes that take it (with their defaults) and help."""
    return pd.DataFrame([{"option": o.name, "flag": o.cli, "probes": taking(o.name), "help": o.help}
                         for o in OPTIONS.values()])
