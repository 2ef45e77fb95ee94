"""Execution of a run plan (runs/plan.py): load the model unless given one, then run the probe over each task's
items in batches, writing each finished batch at once (resumable)."""

from __future__ import annotations

import json
import logging
import math
import numbers
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tqdm.auto import tqdm

from ..errors import ProbeError
from ..methods.readout import finite_instead
from ..models.devices import smaller_batch
from ..methods.catalog import check_bounds
from ..stats import level
from ..tasks.base import token_ids
from . import selfcheck
from .plan import RunPlan, plan_run
from .rundir import RunDir, environment

log = logging.getLogger("probes")


def check_context(loaded, items) -> None:
    limit = loaded.arch.context_length
    if limit is None:
        return
    for it in items:
        n = len(token_ids(loaded.tokenizer, it.prompt))
        if n > limit:
            raise ProbeError(f"prompt of item {it.index} ({it.input!r}) is {n} tokens, longer than the context of "
                             f"{loaded.spec.name} ({limit} tokens); accepted: prompts of at most {limit} tokens")


AUTO_START = 64  # --batch-size auto: the first batch tried


def counts(task, items, ambiguous: dict, limit: int | None) -> dict:
    """What a run covers: how many of the task's items it scored, how many ambiguous ones it dropped (or flagged)
    and whether --limit drew a sample."""
    total = len(task.items())
    dropped = len(ambiguous) if task.ambiguous == "drop" else 0
    return {"task_items": total, "scored_items": len(items),
            "dropped_ambiguous": dropped, "flagged_ambiguous": len(ambiguous) - dropped, "limit": limit}


def counts_text(summary: dict) -> str:
    """'scored 196 of 247 items; 51 dropped as ambiguous for this tokenizer (see meta.json); ...'."""
    text = f"scored {summary['scored_items']} of {summary['task_items']} items"
    if summary.get("dropped_ambiguous"):
        text += f"; {summary['dropped_ambiguous']} dropped as ambiguous for this tokenizer (see meta.json)"
    if summary.get("flagged_ambiguous"):
        text += f"; {summary['flagged_ambiguous']} ambiguous ones kept and flagged"
    if summary.get("limit"):
        text += f"; --limit {summary['limit']}: drawn from the rest with the task's seed, stratified by group"
    text += f"; intervals at {summary.get('ci', 0.95):.0%}"
    if summary.get("special_top1_items", 0) >= SPECIAL_WARN:
        text += (f"\nnote: the model's top-1 is a special token (most often {summary['special_top1_token']!r}) in "
                 f"{summary['special_top1_rows']} of {summary['special_top1_of']} predictions, on "
                 f"{summary['special_top1_items']} items; --vocab text leaves special tokens out")
    return text


SPECIAL_WARN = 3  # items whose top-1 is a special token before a run's summary says so


def special_top1(table) -> dict:
    """How often the model's own top-1 (the rows with a `special_top1` flag: the final layer's last position, the
    prediction of each variant) is a special or control token, and the commonest such token."""
    if "special_top1" not in table:
        return {}
    rows = table[table.special_top1.notna()]
    hit = rows[rows.special_top1.astype(bool)]
    out = {"special_top1_rows": len(hit), "special_top1_of": len(rows), "special_top1_items": int(hit.item.nunique())}
    column = "predicted" if "predicted" in hit else "top1"
    if len(hit) and column in hit:
        out["special_top1_token"] = str(hit[column].mode().iloc[0])
    return out


def check_width(loaded, task) -> None:
    if task.kind == "icl" and loaded.arch.config.n_embd != task.width():
        raise ProbeError(f"task {task.name!r} draws vectors of width {task.width()}, and {loaded.spec.name} reads "
                         f"{loaded.arch.config.n_embd}; accepted: the model's training task (e.g. in a sweep, "
                         "task_options max_pairs: '{task.max_pairs}', item_dim: '{task.item_dim}')")


@dataclass
class Result:
    """A finished probe run: its table (one row per prompt x layer, block or variant), summary and report."""

    table: pd.DataFrame
    summary: dict
    report: str  # the text `probe run` prints
    output: Path | None  # the run folder, or None when none was kept


def load_for(plan: RunPlan):
    """The plan's model, loaded with its resolved options and what the probe needs (eager attention)."""
    from ..models.loading import load_model, load_remote

    if plan.remote:
        return load_remote(plan.model, **plan.spec.load)
    log.info("loading %s (%s) ...", plan.model.name, plan.model.where())
    return load_model(plan.model, resolved=plan.load, **plan.spec.load)


def execute(plan: RunPlan, loaded=None, progress: bool = False, extra_meta: dict | None = None,
            skip_complete: bool = False) -> dict[str, Result]:
    """Run the plan on each of its tasks (loading the model unless `loaded` is given): {task name: Result}. A task
    without a run folder runs in a temporary one, removed after."""
    needed = plan.spec.load.get("attn_implementation")
    if loaded is None:
        loaded = load_for(plan)
    elif needed not in (None, loaded.arch.config._attn_implementation):
        raise ProbeError(f"probe {plan.probe!r} needs the model loaded with attn_implementation={needed!r}; "
                         f"accepted: probes.load(..., attn_implementation={needed!r})")
    results = {}
    for task in plan.tasks:
        kept = plan.outputs.get(task.name)
        folder = Path(kept) if kept is not None else Path(tempfile.mkdtemp(prefix="probe-run-"))
        try:
            table, summary = run_task(plan, loaded, task, folder, progress, extra_meta, skip_complete)
        finally:
            if kept is None:
                shutil.rmtree(folder, ignore_errors=True)
        results[task.name] = Result(table, summary, plan.spec.report(table, summary), kept)
    return results


def check_finite(rows: list[dict], loaded, probe: str) -> None:
    """Every number a probe writes is finite, or the run stops before writing the batch (the self-check stops a
    model that computes NaN before anything is written; this catches what its first prompts did not show)."""
    for row in rows:
        for key, value in row.items():
            bad = next((v for v in _numbers(value) if not math.isfinite(v)), None)
            if bad is not None:
                dtype = str(loaded.arch.hf.dtype).removeprefix("torch.")
                raise ProbeError(f"{probe} computed a non-finite {key} ({bad}) for item {row.get('item')} on "
                                 f"{loaded.spec.name} in {dtype}{' ' + loaded.quantize if loaded.quantize else ''}"
                                 f"; the batches before it are kept (a rerun resumes); accepted: "
                                 f"{finite_instead(dtype)}")


def _numbers(value):
    """The real numbers a row's cell holds: itself, or those in its JSON text (attention matrices, vectors)."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
        yield float(value)
    elif isinstance(value, str) and value[:1] in "[{":
        try:
            parsed = json.loads(value)
        except ValueError:
            return
        stack = [parsed]
        while stack:
            x = stack.pop()
            if isinstance(x, (list, dict)):
                stack.extend(x.values() if isinstance(x, dict) else x)
            elif isinstance(x, float):
                yield x


def run_probe(loaded, task, probe: str, output: Path, limit: int | None = None, batch_size: int | str = 8,
              options: dict | None = None, overwrite: bool = False, progress: bool = True,
              extra_meta: dict | None = None, skip_complete: bool = False, self_check: bool = True):
    """Plan and run `probe` on `task` with a loaded model, into `output` (options the probe does not take are left
    out, as a sweep's shared options are); returns (table, summary). See `run_task`."""
    plan = plan_run(loaded=loaded, tasks=[task], probe=probe, options=options, limit=limit, batch_size=batch_size,
                    output=output, overwrite=overwrite, self_check=self_check, strict=False)
    return run_task(plan, loaded, task, Path(output), progress, extra_meta, skip_complete)


def run_task(plan: RunPlan, loaded, task, output: Path, progress: bool = True, extra_meta: dict | None = None,
             skip_complete: bool = False):
    """Run the plan's probe on one of its tasks, resuming from finished batches under `output`; returns (table,
    summary). What needs the weights is checked here: option bounds, the model's width and FFN, the tokenized items.
    skip_complete: a finished run of this config found under the folder's lock raises RunComplete (see RunDir).
    The plan's self_check: stop (before anything is written) when the check on the first prompts that the probes
    read what the model computes fails (runs/selfcheck.py); False goes on, with the failure in meta.json.

    batch_size='auto' starts at AUTO_START prompts and halves on out-of-memory, retrying the same prompts; batches
    already written are kept, and the size that worked is recorded in meta.json."""
    spec, options, limit, batch_size = plan.spec, plan.options, plan.limit, plan.batch_size
    check_width(loaded, task)
    auto = batch_size == "auto"
    check_bounds(options, loaded)
    if spec.needs_ffn and not loaded.arch.has_ffn:
        raise ProbeError(f"{loaded.spec.name} has no FFN blocks, so probe {plan.probe!r} has nothing to read; "
                         "accepted: logit-lens, accuracy, nback, attention")
    items, ambiguous = task.scored_items(loaded.tokenizer, limit)
    if not items:
        raise ProbeError(f"all {len(ambiguous)} items of task {task.name!r} are ambiguous for {loaded.spec.name}'s "
                         "tokenizer and dropped; use --task-option ambiguous=flag or a larger --limit")
    config = plan.config(task)
    kwargs = {k: v for k, v in options.items() if k in spec.run_options}
    prepared = {}
    if spec.prepare is not None:  # before the run folder: input it refuses leaves nothing behind
        items, state, prepared = spec.prepare(loaded, task, items, options)
        if state is not None:  # what the probe's batches need from preparing (the lens only checks)
            kwargs["state"] = state
    if not spec.truncates:
        check_context(loaded, items)
    checked = ({"skipped": "a remote model"} if loaded.remote
               else selfcheck.self_check(loaded, items, spec.truncates, strict=plan.self_check, batch_size=batch_size))
    log.info(selfcheck.describe(checked))
    with RunDir(output, config, overwrite=plan.overwrite, skip_complete=skip_complete) as run:
        size = AUTO_START if auto else batch_size
        run.start({"batch_size": batch_size, "prepared": prepared, "load_seconds": round(loaded.load_seconds, 2),
                   "ambiguous_items": len(ambiguous), "ambiguous_rule": task.ambiguous,
                   "ambiguous": {str(k): v for k, v in ambiguous.items()},
                   "self_check": checked, "placement": loaded.placement, "model_cache_hit": loaded.cache_hit,
                   "device_map": loaded.device_map, "remote": loaded.remote,
                   "model_params": loaded.spec.params or loaded.arch.n_params, "family": loaded.spec.family,
                   "task_kind": task.kind, "training": loaded.spec.training, **(extra_meta or {}),
                   "task_source": task.source, "task_license": task.license, **task.provenance(),
                   **environment()})
        done = run.done_items()
        todo = [it for it in items if it.index not in done]
        with tqdm(total=len(items), initial=len(items) - len(todo), desc=f"{loaded.spec.name} {task.name} {plan.probe}",
                  unit="prompt", disable=not progress) as bar:
            start = 0
            while start < len(todo):
                batch = todo[start:start + size]
                try:
                    rows = spec.run(loaded, batch, **kwargs)
                except Exception as e:
                    size = smaller_batch(e, size, auto)
                    bar.set_postfix(batch_size=size)
                    continue
                start += len(batch)
                check_finite(rows, loaded, plan.probe)
                if task.ambiguous == "flag":
                    for row in rows:
                        row["ambiguous"] = row["item"] in ambiguous
                run.write_part(rows)
                bar.update(len(batch))
        table = run.table()
        summary = {**spec.summarize(table, seed=task.seed), **counts(task, items, ambiguous, limit),
                   **special_top1(table), "ci": level()}
        if spec.plot is not None:
            spec.plot(table, {"model": loaded.spec.name, "task": task.name, "seed": task.seed, "summary": summary,
                              "options": options},
                      run.path / "plot.png")
        run.finish(table, summary, {"batch_size_used": size} if auto else {})
    return table, summary
