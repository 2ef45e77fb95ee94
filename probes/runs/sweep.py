"""Sweeps: a YAML grid of models x tasks x probes x seeds, run in-process or as Slurm job arrays.

    name: capitals-scale                 # names the sweep's bookkeeping folder
    models: [gpt2, gpt2-medium]          # registry names (or checkpoint folders / config files)
    tasks: [capitals, capitals-extractive]
    probes: [logit-lens, ffn-ablation]   # every probe on every task; or {probe: [its tasks]} without `tasks`
    seeds: [0, 1]                        # optional: task seeds (shots, N-back letters); one unit each
    limit: 40                            # optional, as `probe run`
    batch_size: 8                        # or auto
    options: {topk: 5}                   # probe options, as `probe run` (underscores for dashes)
    task_options: {shots: 1}             # as --task-option
    load: {dtype: bfloat16, quantize: 8bit, device_map: auto}
    results: results                     # relative to the sweep file's folder; without it, $PROBE_RESULTS or
                                         # results/ in the current folder, as for `probe run` and `probe aggregate`
    slurm: {partition: gpu, time: "04:00:00", gpus: 1, mem: 64G, cpus_per_task: 8, gpu_mem: 80GiB}

Trained models are models too. `train` adds one training unit per config x `set` value x seed (`probe train`
with --set and --seed), run before the probes; `checkpoints: all` runs the probes on every checkpoint a run
writes, giving each metric against training step (`final`, the default: its final weights). A task option
written "{task.n}" takes that field of the model's training config (an N-back task at the N it was trained on):

    train: {configs: [configs/training/nback-paper.yaml], set: {task.n: [1, 2, 3]}, seeds: [0, 1, 2],
            runs: runs, slurm: {time: "01:00:00"}}   # runs: where the run folders go ($PROBE_RUNS or runs/)
    checkpoints: all
    task_options: {n: "{task.n}"}

A model of `models` that is a training run's folder, or a glob ("runs/x/n2-seed0/checkpoint-*"), expands the same
way. On Slurm, the probes on a run's checkpoints wait for its training job (afterok).

`lens: {tokens: 65536, corpus: stdlib-english}` adds a tuned-lens training unit per model, run before its probes,
into the cache that `options: {lens: tuned}` reads (probes/runs/lens_units.py).

Each unit writes its own run folder (a shard: parts, table.csv, meta.json, all written atomically, under a lock)
at <results>/<model>/<task>/<probe>[/seed-<s>]. A unit whose meta.json is complete and whose config matches is
skipped, so running a sweep again resumes it and retries what failed. Slurm resources come from `probe plan`
(GPUs needed, host memory for the weights, a time limit from the model's size, the prompts and the probe's forward
passes; see planning.time_limit) unless the sweep's `slurm` mapping sets them.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeError, choice_error, read_yaml
from ..paths import runs_root
from ..training.config import checkpoint_steps, load_training_config
from .lens_units import LensUnit, lens_folder, lens_spec, lens_state, lock_folder, matches, reads_lens, run_lens
from .rundir import RunBusy, RunComplete, RunLock, finished, safe_name
from .trained_units import (CHECKPOINTS, SLURM_KEYS, TrainUnit, expand_models, field_list, from_training,
                             run_training, train_units)

KEYS = {"name", "models", "tasks", "probes", "seeds", "limit", "batch_size", "options", "task_options", "load",
        "results", "slurm", "train", "checkpoints", "lens"}
LOAD_KEYS = {"dtype", "quantize", "device_map", "max_memory", "compute_dtype"}
SLURM_DEFAULTS = {"cpus_per_task": 4, "gpu_mem": "80GiB"}
GPU_HOST_MEMORY = 60 * 2**30  # host memory asked for a GPU unit, at most (plus 4 GiB)


@dataclass(frozen=True)
class Unit:
    model: str
    task: str
    probe: str
    seed: int | None = None
    label: str | None = None  # the model's name where its path would make a poor folder name (a checkpoint)
    trained_by: TrainUnit | None = None  # the sweep's training unit that writes this checkpoint

    @property
    def id(self) -> str:
        """Its run folder under the sweep's results, from safe forms of the names (a path model's folder is
        never written into)."""
        return (f"{safe_name(self.label or self.model)}/{safe_name(self.task)}/{self.probe}"
                + ("" if self.seed is None else f"/seed-{safe_name(self.seed)}"))


@dataclass
class Sweep:
    path: Path
    name: str
    models: list
    tasks: list
    probes: list
    seeds: list = field(default_factory=lambda: [None])
    limit: int | None = None
    batch_size: int | str = 8
    options: dict = field(default_factory=dict)
    task_options: dict = field(default_factory=dict)
    load: dict = field(default_factory=dict)
    results: Path = Path("results")
    slurm: dict = field(default_factory=dict)
    train_units: list = field(default_factory=list)
    runs: Path = Path("runs")
    train_slurm: dict = field(default_factory=dict)
    checkpoints: str = "final"
    lens: dict | None = None  # the `lens` mapping (lens_units.lens_spec), if given
    _cache: dict = field(default_factory=dict, repr=False)  # specs, tasks, configs and plans, each made once

    def model_list(self) -> list[tuple]:
        """(model, label, training unit) of every model, a trained run's checkpoints each one."""
        models = [(m, None, None) for m in self.models]
        for tu in self.train_units:
            run, cfg = self.run_dir(tu), self.train_config(tu)
            label = f"{cfg['name']}-{run.name}"
            if self.checkpoints == "all":
                models += [(str(run / f"checkpoint-{k}"), f"{label}@{k}", tu) for k in checkpoint_steps(cfg)]
            else:
                models.append((str(run), label, tu))
        return list(dict.fromkeys(models))

    def units(self) -> list[Unit]:
        return [Unit(m, t, p, s, label, tu) for (m, label, tu), (t, p), s
                in itertools.product(self.model_list(), self.pairs(), self.seeds)]

    def lens_units(self) -> list[LensUnit]:
        """One per model with a `lens` mapping."""
        return [] if self.lens is None else [LensUnit(m, label, tu, self.lens["tokens"], self.lens["corpus"])
                                             for m, label, tu in self.model_list()]

    def pairs(self) -> list[tuple[str, str]]:
        """(task, probe) pairs: every task with every probe, or with `probes` a mapping, each probe's own tasks."""
        if isinstance(self.probes, dict):
            return [(t, p) for p, tasks in self.probes.items() for t in tasks]
        return [(t, p) for t in self.tasks for p in self.probes]

    def run_dir(self, tu: TrainUnit) -> Path:
        return self.runs / safe_name(tu.name) / tu.folder

    def train_config(self, tu: TrainUnit) -> dict:
        return self._once(("train", tu), lambda: load_training_config(tu.config, dict(tu.overrides), tu.seed))

    def trained(self, tu: TrainUnit) -> bool:
        """Its run folder holds a finished run of its config."""
        try:
            meta = json.loads((self.run_dir(tu) / "meta.json").read_text())
        except (OSError, ValueError):
            return False
        return meta.get("status") == "complete" and meta.get("config") == self.train_config(tu)

    def waits_for(self, unit) -> TrainUnit | LensUnit | None:
        """The unit of this sweep that must finish first: a probe's model's lens unit, if it reads the cached lens
        and that is not trained yet (a lens unit waits for its model), else the unit training its model."""
        if isinstance(unit, Unit) and self.lens is not None and reads_lens(self, unit):
            lens = next(lu for lu in self.lens_units() if lu.model == unit.model)
            if not (self.ready(lens) and matches(_meta(self, lens), lens)):
                return lens
        tu = getattr(unit, "trained_by", None)  # a training unit waits for none
        return tu if tu is not None and not self.trained(tu) else None

    def ready(self, unit) -> bool:
        """Its model, and the lens it reads, exist: none is still to be trained by the sweep."""
        return self.waits_for(unit) is None

    def training_config_of(self, unit: Unit) -> dict | None:
        if unit.trained_by is not None:
            return self.train_config(unit.trained_by)
        trained = self.spec(unit).training
        return read_yaml(Path(trained["path"]) / "training.yaml", "training config") if trained else None

    def all_units(self) -> list:
        """Training units first, then lens units, then the probe units (some on what they train)."""
        return [*self.train_units, *self.lens_units(), *self.units()]

    def output(self, unit) -> Path:
        if isinstance(unit, LensUnit):
            return lens_folder(self.spec(unit))
        return self.run_dir(unit) if isinstance(unit, TrainUnit) else self.results / unit.id

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def task(self, unit: Unit):
        from ..tasks.files import load_task

        options = {k: from_training(v, k, unit, self) for k, v in self.task_options.items()}
        return self._once(("task", unit.task, unit.seed, json.dumps(options, sort_keys=True, default=str)),
                          lambda: load_task(unit.task, {**options, **({} if unit.seed is None else {"seed": unit.seed})}))

    def spec(self, unit: Unit):
        from ..models.registry import resolve_model

        return self._once(("spec", unit.model), lambda: resolve_model(unit.model))

    def plan(self, unit: Unit):
        """The unit's run plan (runs/plan.py), made once: its probe's options parsed, its task checked."""
        from .plan import plan_run

        return self._once(("plan", unit), lambda: plan_run(
            self.spec(unit), [self.task(unit)], unit.probe, self.options, limit=self.limit, batch_size=self.batch_size,
            load=self.load, check_fit=False, strict=False, resolved=self.load_options(unit)))

    def load_options(self, unit) -> dict:
        """As its plan's (the same for every unit of a model), known before the lens its plan checks."""
        from ..models.options import load_options

        return self._once(("load", unit.model), lambda: load_options(self.spec(unit), **self.load))

    def config(self, unit: Unit) -> dict:
        """The run config its shard must carry to count as done (see plan.run_config)."""
        return self.plan(unit).config(self.task(unit))

    @property
    def bookkeeping(self) -> Path:
        return self.results / ".sweeps" / safe_name(self.name)


def _probes(data: dict, where: str) -> list | dict:
    """`probes` as a list (run on every task), or a mapping {probe: [tasks]} (then there is no `tasks`)."""
    value = data.get("probes")
    if not isinstance(value, dict):
        return field_list(data, "probes", where)
    if data.get("tasks"):
        raise ProbeError(f"{where}: probes maps each probe to its tasks, so 'tasks' must not be given too")
    if not value:
        raise ProbeError(f"{where}: 'probes' must be a non-empty list or mapping")
    return {str(p): field_list(value, p, f"{where}: probes") for p in value}


# the sweep file's schema: field -> (types accepted, what to say)
FIELDS = {"name": ((str,), "a text"), "models": ((list, str), "a list of models"),
          "train": ((dict,), "a mapping"), "checkpoints": ((str,), "final or all"),
          "tasks": ((list, str), "a list of tasks"),
          "probes": ((list, str, dict), "a list of probes, or a mapping of probes to their tasks"),
          "seeds": ((list, int), "a list of integer seeds"), "limit": ((int,), "a positive integer"),
          "batch_size": ((int, str), "a positive integer or 'auto'"), "options": ((dict,), "a mapping"),
          "task_options": ((dict,), "a mapping"), "load": ((dict,), "a mapping"), "slurm": ((dict,), "a mapping"),
          "results": ((str,), "a folder, relative to the sweep file"),
          "lens": ((dict,), "a mapping of tokens, corpus, slurm")}


def _check_fields(data: dict, where: str) -> None:
    """Every field of a sweep file by type and range, before anything else reads it."""
    for key, (types, what) in FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProbeError(f"{where}: {key} {value!r} is not {what}; accepted: {what}")
    seeds = data.get("seeds")
    for seed in ([seeds] if isinstance(seeds, int) else seeds or []):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ProbeError(f"{where}: seed {seed!r} is not an integer; accepted: a list of integer seeds")
    if data.get("limit") is not None and data["limit"] < 1:
        raise ProbeError(f"{where}: limit {data['limit']!r}; accepted: a positive integer (leave it out for every item)")


def _check_slurm(slurm: dict, where: str) -> None:
    """The values of a `slurm` section: counts are whole numbers (the rest is text sbatch reads: see slurm._directive)."""
    for key, least in (("gpus", 0), ("cpus_per_task", 1)):
        value = slurm.get(key)
        if value is not None and (isinstance(value, bool) or not str(value).isdigit() or int(value) < least):
            raise ProbeError(f"{where}: bad slurm {key} {value!r}; accepted: an integer of at least {least}")


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file: every model, task, probe and option is checked before anything runs."""
    from ..methods.catalog import check_task, get_probe, probe_options
    from ..methods.option_types import OPTIONS
    from ..models.registry import load_registry, resolve_model
    from .plan import parse_batch_size

    path = Path(path)
    where = str(path)
    data = read_yaml(path, "sweep file")
    if not isinstance(data, dict):
        raise ProbeError(f"sweep file {where!r} must be a mapping with models, tasks and probes")
    unknown = set(data) - KEYS
    if unknown:
        raise ProbeError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(KEYS))}")
    _check_fields(data, where)
    for key, accepted in (("load", LOAD_KEYS), ("slurm", SLURM_KEYS)):
        bad = set(data.get(key) or {}) - accepted
        if bad:
            raise ProbeError(f"{where}: unknown {key} option(s) {', '.join(sorted(bad))}; "
                             f"accepted: {', '.join(sorted(accepted))}")
    options = data.get("options") or {}
    if set(options) - set(OPTIONS):
        raise ProbeError(f"{where}: unknown probe option(s) {', '.join(sorted(set(options) - set(OPTIONS)))}; "
                         f"accepted: {', '.join(sorted(OPTIONS))}")
    base = path.resolve().parent
    results = (base / data["results"]) if data.get("results") else Path(os.environ.get("PROBE_RESULTS", "results"))
    if results.exists() and not results.is_dir():
        raise ProbeError(f"{where}: results {str(results)!r} is a file; accepted: a folder")
    checkpoints = data.get("checkpoints", "final")
    if checkpoints not in CHECKPOINTS:
        raise choice_error("checkpoints", checkpoints, CHECKPOINTS)
    trained = train_units(data["train"], base, where) if data.get("train") is not None else []
    runs = data.get("train", {}).get("runs") if isinstance(data.get("train"), dict) else None
    if not data.get("models") and not trained:
        raise ProbeError(f"{where}: 'models' must be a non-empty list (or give 'train')")
    models = expand_models(data.get("models") or [], base, checkpoints, where)
    sweep = Sweep(path=path.resolve(), name=str(data.get("name") or path.stem), models=models,
                  tasks=[] if isinstance(data.get("probes"), dict) or (trained and not data.get("probes"))
                  else field_list(data, "tasks", where),
                  probes=_probes(data, where) if data.get("probes") or not trained else [],  # train only
                  seeds=([data["seeds"]] if isinstance(data.get("seeds"), int) else data.get("seeds")) or [None],
                  limit=data.get("limit"),
                  batch_size=parse_batch_size(data.get("batch_size", 8)), options=options,
                  task_options=data.get("task_options") or {}, load=data.get("load") or {},
                  results=results.resolve(), slurm=data.get("slurm") or {}, train_units=trained,
                  runs=((base / runs) if runs else runs_root()).resolve(), checkpoints=checkpoints,
                  train_slurm=(data.get("train") or {}).get("slurm") or {},
                  lens=lens_spec(data["lens"], base, where) if data.get("lens") is not None else None)
    for tu in trained:
        sweep.train_config(tu)
    registry = load_registry()
    for m in sweep.models:
        try:
            resolve_model(str(m), registry)
        except ProbeError as e:
            raise ProbeError(f"{where}: {e}")
    for p in sweep.probes:
        get_probe(p)
    _check_slurm(sweep.slurm, where)
    _check_slurm(sweep.train_slurm, f"{where}: train")
    _check_slurm((sweep.lens or {}).get("slurm", {}), f"{where}: lens")
    for unit in sweep.units():  # every unit's plan: its options, task (every seed) and load options, checked
        try:  # a checkpoint the sweep has still to train: its task and options (its plan is made once it exists)
            sweep.plan(unit) if sweep.ready(unit) else check_task(unit.probe, sweep.task(unit),
                                                                  probe_options(unit.probe, sweep.options))
        except ProbeError as e:
            raise ProbeError(f"{where}: {unit.id}: {e}") from None
    return sweep


# --- state of each unit -----------------------------------------------------------------------------------------

def _meta(sweep: Sweep, unit: Unit) -> dict | None:
    try:
        return json.loads((sweep.output(unit) / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def unit_states(sweep: Sweep) -> list[tuple[Unit, str, str]]:
    """(unit, state, detail) with state one of done, running, queued, failed, pending."""
    from .queue import last_job, queued_units

    queued = queued_units(sweep)
    rows = []
    for unit in sweep.all_units():
        if waits := sweep.waits_for(unit):
            state = ("queued" if waits.id in queued else "running" if sweep.ready(waits) and _lock(sweep, waits).alive()
                     else "")
            rows.append((unit, "pending", f"waits for {waits.id}" + (f" ({state})" if state else "")))
            continue
        meta = _meta(sweep, unit)
        lock = _lock(sweep, unit)
        if isinstance(unit, LensUnit):
            rows.append((unit, *lens_state(sweep, unit, meta, queued)))
        elif _done(sweep, unit, meta):
            rows.append((unit, "done", f"{meta.get('finished', '')}"))
        elif lock.alive():
            h = lock.holder() or {}
            rows.append((unit, "running", f"pid {h.get('pid')} on {h.get('host')}"
                         + (f", job {h['slurm_job']}" if h.get("slurm_job") else "")))
        elif unit.id in queued:
            state = queued[unit.id]
            rows.append((unit, "running" if state.startswith("running") else "queued", state))
        elif meta and meta.get("status") == "failed":
            rows.append((unit, "failed", meta.get("error", "")))
        elif meta and meta.get("status") == "running":
            kept = (f"{len(list(sweep.output(unit).glob('checkpoint-*')))} checkpoint(s)" if isinstance(unit, TrainUnit)
                    else f"{len(list((sweep.output(unit) / 'parts').glob('*.csv')))} batch file(s)")
            rows.append((unit, "failed", f"killed ({kept} kept; a rerun resumes)"))
        elif meta and meta.get("status") == "complete":
            rows.append((unit, "pending", "stale: ran with another config; a rerun replaces it"))
        elif last := last_job(sweep, unit):
            job, log = last
            rows.append((unit, "pending", f"no shard; last submitted as job {job}, which has ended (log: {log})"))
        else:
            rows.append((unit, "pending", ""))
    return rows


def _lock(sweep: Sweep, unit) -> RunLock:
    """The lock of a unit's output (a lens unit's beside its lens)."""
    return RunLock(lock_folder(sweep.output(unit)) if isinstance(unit, LensUnit) else sweep.output(unit))


# --- local execution --------------------------------------------------------------------------------------------

def run_unit(sweep: Sweep, unit: Unit, loaded, progress: bool = True) -> str:
    """Run one unit into its shard; 'done', 'skipped' (finished, or another process holds it) or 'failed: ...'."""
    import dataclasses

    from .execution import run_task

    meta = _meta(sweep, unit)
    if _done(sweep, unit, meta) or RunLock(sweep.output(unit)).alive():
        return "skipped"
    stale = bool(meta) and meta.get("config") != sweep.config(unit)
    try:  # checked again under the lock: another process may take it, or finish it, after the look above
        run_task(dataclasses.replace(sweep.plan(unit), overwrite=stale), loaded, sweep.task(unit), sweep.output(unit),
                 progress, extra_meta={"sweep": sweep.name, "unit": unit.id}, skip_complete=True)
    except (RunBusy, RunComplete):
        return "skipped"
    except ProbeError as e:
        return f"failed: {e}"
    except Exception as e:  # one unit's failure must not stop the others; its meta.json records it
        return f"failed: {type(e).__name__}: {e}"
    return "done"


def run_local(sweep: Sweep, only: list[str] | None = None, progress: bool = True) -> dict[str, str]:
    """Run the units (or those named in `only`) that are not done: training units first, then per model its lens
    unit and its probes, loading each model once. A unit whose training (or lens) failed fails with it."""
    from ..methods.catalog import get_probe
    from ..models.loading import load_model

    every = sweep.all_units()
    wanted = [u for u in every if only is None or u.id in only]
    if only is not None and len(wanted) != len(only):
        raise choice_error("sweep unit", sorted(set(only) - {u.id for u in wanted})[0], [u.id for u in every])
    outcome = {}
    for tu in (u for u in wanted if isinstance(u, TrainUnit)):
        outcome[tu.id] = run_training(sweep, tu, progress)
        print(f"{tu.id}: {outcome[tu.id]}", file=sys.stderr, flush=True)
    wanted = [u for u in wanted if not isinstance(u, TrainUnit)]  # lens units first (all_units' order)
    for u in [u for u in wanted if u.trained_by is not None and not sweep.trained(u.trained_by)]:
        outcome[u.id] = f"failed: its model is not trained ({u.trained_by.id} is not done)"
        wanted.remove(u)
    for model in dict.fromkeys(u.model for u in wanted):
        units = [u for u in wanted if u.model == model]
        todo = [u for u in units if not _done(sweep, u, _meta(sweep, u))]
        outcome.update({u.id: "skipped" for u in units if u not in todo})
        if not todo:
            continue
        needs = {k: v for u in todo if isinstance(u, Unit) for k, v in get_probe(u.probe).load.items()}
        try:
            loaded = load_model(sweep.spec(todo[0]), resolved=sweep.load_options(todo[0]), **needs)
        except Exception as e:
            outcome.update({u.id: f"failed: loading {model}: {type(e).__name__}: {e}" for u in todo})
            continue
        for unit in todo:  # a probe whose lens failed to train fails with it
            waits = sweep.waits_for(unit)
            outcome[unit.id] = (f"failed: {waits.id} is not done" if waits else run_lens(sweep, unit, loaded, progress)
                                if isinstance(unit, LensUnit) else run_unit(sweep, unit, loaded, progress))
            print(f"{unit.id}: {outcome[unit.id]}", file=sys.stderr, flush=True)
    return outcome


def _done(sweep: Sweep, unit, meta: dict | None) -> bool:
    """Its shard (a training unit: its run; a lens unit: its lens) is complete and was computed with the config the
    sweep asks for now."""
    if isinstance(unit, TrainUnit):
        return sweep.trained(unit)
    if isinstance(unit, LensUnit):
        return matches(meta, unit)
    return sweep.ready(unit) and finished(meta, sweep.config(unit))
