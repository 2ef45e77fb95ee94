"""Sweeps: a YAML grid of models x tasks x probes x seeds, run in-process or as Slurm job arrays.

    name: capitals-scale                 # names the sweep's bookkeeping folder
    models: [gpt2, gpt2-medium]          # registry names (or checkpoint folders / config files)
    tasks: [capitals, capitals-extractive]
    probes: [logit-lens, ffn-ablation]
    seeds: [0, 1]                        # optional: task seeds (shots, N-back letters); one unit each
    limit: 40                            # optional, as `probe run`
    batch_size: 8                        # or auto
    options: {topk: 5}                   # probe options, as `probe run` (underscores for dashes)
    task_options: {shots: 1}             # as --task-option
    load: {dtype: bfloat16, quantize: 8bit, device_map: auto}
    results: results                     # relative to the sweep file's folder; without it, $PROBE_RESULTS or
                                         # results/ in the current folder, as for `probe run` and `probe aggregate`
    slurm: {partition: gpu, time: "04:00:00", gpus: 1, mem: 64G, cpus_per_task: 8, gpu_mem: 80GiB}

Each unit writes its own run folder (a shard: parts, table.csv, meta.json, all written atomically, under a lock)
at <results>/<model>/<task>/<probe>[/seed-<s>]. A unit whose meta.json is complete and whose config matches is
skipped, so running a sweep again resumes it and retries what failed. Slurm resources come from `probe plan`
(GPUs needed, host memory for the weights, a time limit from the model's size, the prompts and the probe's forward
passes; see planning.time_limit) unless the sweep's `slurm` mapping sets them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeError, choice_error, read_yaml
from .rundir import RunBusy, RunLock, safe_name, write_json

KEYS = {"name", "models", "tasks", "probes", "seeds", "limit", "batch_size", "options", "task_options", "load",
        "results", "slurm"}
LOAD_KEYS = {"dtype", "quantize", "device_map", "max_memory", "compute_dtype"}
SLURM_KEYS = {"partition", "time", "gpus", "mem", "cpus_per_task", "gpu_mem", "account", "qos", "extra"}
SLURM_DEFAULTS = {"cpus_per_task": 4, "gpu_mem": "80GiB"}
GPU_HOST_MEMORY = 60 * 2**30  # host memory asked for a GPU unit, at most (plus 4 GiB)


@dataclass(frozen=True)
class Unit:
    model: str
    task: str
    probe: str
    seed: int | None = None

    @property
    def id(self) -> str:
        """Its run folder under the sweep's results, from safe forms of the names (a path model's folder is
        never written into)."""
        return (f"{safe_name(self.model)}/{safe_name(self.task)}/{self.probe}"
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
    _cache: dict = field(default_factory=dict, repr=False)  # specs, tasks, configs and plans, each made once

    def units(self) -> list[Unit]:
        return [Unit(m, t, p, s) for m, t, p, s in itertools.product(self.models, self.tasks, self.probes, self.seeds)]

    def output(self, unit: Unit) -> Path:
        return self.results / unit.id

    def _once(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def task(self, unit: Unit):
        from ..tasks.files import load_task

        return self._once(("task", unit.task, unit.seed), lambda: load_task(
            unit.task, {**self.task_options, **({} if unit.seed is None else {"seed": unit.seed})}))

    def spec(self, unit: Unit):
        from ..models.registry import resolve_model

        return self._once(("spec", unit.model), lambda: resolve_model(unit.model))

    def load_options(self, unit: Unit) -> dict:
        from ..models.options import load_options

        return load_options(self.spec(unit), **self.load)

    def config(self, unit: Unit) -> dict:
        """The run config its shard must carry to count as done (see execution.run_config)."""
        from .execution import run_config

        def make():
            opts = self.load_options(unit)
            return run_config(self.spec(unit), opts["dtype"], opts["quantize"], self.task(unit), unit.probe,
                              self.limit, self.options)

        return self._once(("config", unit), make)

    @property
    def bookkeeping(self) -> Path:
        return self.results / ".sweeps" / safe_name(self.name)


def _list(data: dict, key: str, where: str) -> list:
    value = data.get(key)
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ProbeError(f"{where}: '{key}' must be a non-empty list")
    return value


# the sweep file's schema: field -> (types accepted, what to say)
FIELDS = {"name": ((str,), "a text"), "models": ((list, str), "a list of models"),
          "tasks": ((list, str), "a list of tasks"), "probes": ((list, str), "a list of probes"),
          "seeds": ((list, int), "a list of integer seeds"), "limit": ((int,), "a positive integer"),
          "batch_size": ((int, str), "a positive integer or 'auto'"), "options": ((dict,), "a mapping"),
          "task_options": ((dict,), "a mapping"), "load": ((dict,), "a mapping"), "slurm": ((dict,), "a mapping"),
          "results": ((str,), "a folder, relative to the sweep file")}


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


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file: every model, task, probe and option is checked before anything runs."""
    from ..methods.catalog import PROBES, get_probe
    from .execution import parse_batch_size
    from ..models.registry import load_registry, resolve_model

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
    known_options = {o for p in PROBES.values() for o in p.options}
    if set(options) - known_options:
        raise ProbeError(f"{where}: unknown probe option(s) {', '.join(sorted(set(options) - known_options))}; "
                         f"accepted: {', '.join(sorted(known_options))}")
    base = path.resolve().parent
    results = (base / data["results"]) if data.get("results") else Path(os.environ.get("PROBE_RESULTS", "results"))
    if results.exists() and not results.is_dir():
        raise ProbeError(f"{where}: results {str(results)!r} is a file; accepted: a folder")
    sweep = Sweep(path=path.resolve(), name=str(data.get("name") or path.stem), models=_list(data, "models", where),
                  tasks=_list(data, "tasks", where), probes=_list(data, "probes", where),
                  seeds=([data["seeds"]] if isinstance(data.get("seeds"), int) else data.get("seeds")) or [None],
                  limit=data.get("limit"),
                  batch_size=parse_batch_size(data.get("batch_size", 8)), options=options,
                  task_options=data.get("task_options") or {}, load=data.get("load") or {},
                  results=results.resolve(), slurm=data.get("slurm") or {})
    registry = load_registry()
    for m in sweep.models:
        try:
            resolve_model(str(m), registry)
        except ProbeError as e:
            raise ProbeError(f"{where}: {e}")
    for p in sweep.probes:
        get_probe(p)
    for unit in sweep.units():  # every task with every seed, and every model's load options
        sweep.config(unit)
    return sweep


# --- state of each unit -----------------------------------------------------------------------------------------

def _meta(sweep: Sweep, unit: Unit) -> dict | None:
    try:
        return json.loads((sweep.output(unit) / "meta.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _queued(sweep: Sweep) -> dict[str, str]:
    """Unit id -> Slurm state ('PENDING', 'RUNNING', ...) for units of this sweep's jobs still in the queue."""
    log = sweep.bookkeeping / "submissions.jsonl"
    if not log.exists() or shutil.which("squeue") is None:
        return {}
    subs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], capture_output=True, text=True, check=False).stdout
    states = dict(line.split("|", 1) for line in out.split() if "|" in line)
    found = {}
    for s in subs:
        for i, uid in enumerate(s["units"]):
            state = states.get(f"{s['job']}_{i}")
            if state:
                found[uid] = f"{state.lower()} (job {s['job']}_{i})"
    return found


def unit_states(sweep: Sweep) -> list[tuple[Unit, str, str]]:
    """(unit, state, detail) with state one of done, running, queued, failed, pending."""
    queued = _queued(sweep)
    rows = []
    for unit in sweep.units():
        meta = _meta(sweep, unit)
        lock = RunLock(sweep.output(unit))
        if _done(sweep, unit, meta):
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
            parts = len(list((sweep.output(unit) / "parts").glob("*.csv")))
            rows.append((unit, "failed", f"killed ({parts} batch file(s) kept; a rerun resumes)"))
        elif meta and meta.get("status") == "complete":
            rows.append((unit, "pending", "stale: ran with another config; a rerun replaces it"))
        elif last := _last_job(sweep, unit):
            job, log = last
            rows.append((unit, "pending", f"no shard; last submitted as job {job}, which has ended (log: {log})"))
        else:
            rows.append((unit, "pending", ""))
    return rows


def _last_job(sweep: Sweep, unit: Unit) -> tuple[str, Path] | None:
    """(array task id, its log file) of the last submission of `unit`, if any."""
    log = sweep.bookkeeping / "submissions.jsonl"
    if not log.exists():
        return None
    found = None
    for line in log.read_text().splitlines():
        if line.strip() and unit.id in (s := json.loads(line))["units"]:
            task = f"{s['job']}_{s['units'].index(unit.id)}"
            found = (task, sweep.bookkeeping / s["folder"] / f"{task}.out")
    return found


# --- local execution --------------------------------------------------------------------------------------------

def run_unit(sweep: Sweep, unit: Unit, loaded, progress: bool = True) -> str:
    """Run one unit into its shard; 'done', 'skipped' (finished, or another process holds it) or 'failed: ...'."""
    from .execution import run_probe

    meta = _meta(sweep, unit)
    if _done(sweep, unit, meta) or RunLock(sweep.output(unit)).alive():
        return "skipped"
    stale = bool(meta) and meta.get("config") != sweep.config(unit)
    try:
        run_probe(loaded, sweep.task(unit), unit.probe, sweep.output(unit), limit=sweep.limit,
                  batch_size=sweep.batch_size, options=sweep.options, overwrite=stale, progress=progress,
                  extra_meta={"sweep": sweep.name, "unit": unit.id})
    except RunBusy:  # another process took it between our check and the lock
        return "skipped"
    except ProbeError as e:
        return f"failed: {e}"
    except Exception as e:  # one unit's failure must not stop the others; its meta.json records it
        return f"failed: {type(e).__name__}: {e}"
    return "done"


def run_local(sweep: Sweep, only: list[str] | None = None, progress: bool = True) -> dict[str, str]:
    """Run the units (or those named in `only`) that are not done, loading each model once."""
    from ..methods.catalog import get_probe
    from ..models.loading import load_model

    wanted = [u for u in sweep.units() if only is None or u.id in only]
    if only is not None and len(wanted) != len(only):
        raise choice_error("sweep unit", sorted(set(only) - {u.id for u in wanted})[0], [u.id for u in sweep.units()])
    outcome = {}
    for model in dict.fromkeys(u.model for u in wanted):
        units = [u for u in wanted if u.model == model]
        todo = [u for u in units if not _done(sweep, u, _meta(sweep, u))]
        outcome.update({u.id: "skipped" for u in units if u not in todo})
        if not todo:
            continue
        needs = {k: v for u in todo for k, v in get_probe(u.probe).load.items()}
        try:
            loaded = load_model(sweep.spec(todo[0]), **sweep.load_options(todo[0]), **needs)
        except Exception as e:
            outcome.update({u.id: f"failed: loading {model}: {type(e).__name__}: {e}" for u in todo})
            continue
        for unit in todo:
            outcome[unit.id] = run_unit(sweep, unit, loaded, progress)
            print(f"{unit.id}: {outcome[unit.id]}", file=sys.stderr, flush=True)
    return outcome


def _done(sweep: Sweep, unit: Unit, meta: dict | None) -> bool:
    """Its shard is complete and was computed with the config the sweep asks for now."""
    return bool(meta) and meta.get("status") == "complete" and meta.get("config") == sweep.config(unit)


# --- Slurm --------------------------------------------------------------------------------------------------------

def resources(sweep: Sweep, unit: Unit) -> dict:
    """Slurm resources of a unit: GPUs, host memory and time limit from `probe plan`, the rest from defaults; the
    sweep's `slurm` mapping overrides any of them."""
    from ..methods.catalog import get_probe, probe_options
    from .execution import AUTO_START
    from ..models.planning import GiB, plan, time_limit

    res = {**SLURM_DEFAULTS, **{k: v for k, v in sweep.slurm.items() if k != "extra"}}
    if not {"gpus", "mem", "time"} <= set(res):
        opts = sweep.load_options(unit)  # the sweep's, the same for every unit of a model: one plan per model
        p = sweep._once(("plan", unit.model), lambda: plan(
            sweep.spec(unit), dtype=opts["dtype"], quantize=opts["quantize"], compute_dtype=opts["compute_dtype"],
            gpu_mem=str(res["gpu_mem"])))
        res.setdefault("gpus", p.gpus_needed or 0)
        # on GPUs, from_pretrained streams checkpoint shards to the devices: host memory holds a shard or two;
        # on CPU the weights live in host memory. Plus 4 GiB for Python, torch and the tokenizer.
        host = min(p.weight_bytes, GPU_HOST_MEMORY) if int(res["gpus"]) else 1.2 * p.weight_bytes
        res.setdefault("mem", f"{math.ceil(host / GiB) + 4}G")
        if "time" not in res:
            prompts = sweep._once(("prompts", unit.task, unit.seed),
                                  lambda: [it.prompt for it in sweep.task(unit).items(limit=sweep.limit)])
            tokens = math.ceil(max(map(len, prompts)) / 3)  # characters per token: 3 or more in these tasks
            passes = get_probe(unit.probe).passes(p.n_layers, probe_options(unit.probe, sweep.options))
            batch = AUTO_START if sweep.batch_size == "auto" else sweep.batch_size
            res["time"] = time_limit(p, passes, len(prompts), batch, tokens, gpu=bool(int(res["gpus"])))
    res.pop("gpu_mem")
    return res


def _directive(key: str, value) -> str:
    """One `#SBATCH --key=value` line. sbatch reads these itself (bash sees comments), but a newline would end the
    comment and start a command, and whitespace would split the option: both are refused (as for `extra`)."""
    text = str(value)
    if not text or any(c.isspace() for c in text):
        raise ProbeError(f"bad slurm {key} {text!r}; accepted: a value without spaces or newlines")
    return f"#SBATCH --{key}={text}"


def job_script(sweep: Sweep, res: dict, units_file: Path) -> str:
    """The array job's script. Every path in it is shell-quoted, and what names the job or its log goes to sbatch
    as arguments (see `submit_slurm`), so no path or name in a sweep ever becomes shell text."""
    lines = ["#!/bin/bash", _directive("time", res["time"]), _directive("mem", res["mem"]),
             _directive("cpus-per-task", res["cpus_per_task"])]
    if int(res.get("gpus") or 0):
        lines.append(_directive("gres", f"gpu:{int(res['gpus'])}"))
    for key in ("partition", "account", "qos"):
        if res.get(key):
            lines.append(_directive(key, res[key]))
    for x in sweep.slurm.get("extra", []):  # e.g. "--constraint=a100": one option each
        text = str(x)
        if not text.startswith("-") or any(c.isspace() for c in text):
            raise ProbeError(f"bad slurm extra {text!r}; accepted: one sbatch option each, e.g. --constraint=a100")
        lines.append(f"#SBATCH {text}")
    q = shlex.quote
    lines += ["set -euo pipefail", f"cd {q(str(Path.cwd()))}",
              f'UNIT=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {q(str(units_file))})',
              f'exec {q(sys.executable)} -m probes sweep {q(str(sweep.path))} --executor local --unit "$UNIT" --quiet']
    return "\n".join(lines) + "\n"


def submit_slurm(sweep: Sweep, dry_run: bool = False) -> list[dict]:
    """Submit every unit that is not done, running or queued: one job array per set of equal resources."""
    if not dry_run and shutil.which("sbatch") is None:
        raise ProbeError("--executor slurm needs Slurm's sbatch on PATH; accepted: --executor local")
    todo = [u for u, state, _ in unit_states(sweep) if state in ("pending", "failed")]
    groups: dict[str, list] = {}
    for unit in todo:
        res = resources(sweep, unit)
        groups.setdefault(json.dumps(res, sort_keys=True), []).append(unit)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submitted = []
    for n, (key, units) in enumerate(groups.items()):
        res = json.loads(key)
        folder = sweep.bookkeeping / f"{stamp}-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        units_file = folder / "units.txt"
        units_file.write_text("".join(u.id + "\n" for u in units))
        script = folder / "job.sh"
        script.write_text(job_script(sweep, res, units_file))
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", sweep.name)[:64]
        cmd = ["sbatch", "--parsable", f"--array=0-{len(units) - 1}", f"--job-name=probe-{name}",
               f"--output={folder}/%A_%a.out", str(script)]
        record = {"units": [u.id for u in units], "resources": res, "script": str(script), "command": cmd}
        if not dry_run:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise ProbeError(f"sbatch refused {script}: {out.stderr.strip()}")
            record["job"] = out.stdout.strip().split(";")[0]
            with open(sweep.bookkeeping / "submissions.jsonl", "a") as f:
                f.write(json.dumps({"job": record["job"], "units": record["units"], "folder": folder.name}) + "\n")
        write_json(folder / "submission.json", record)
        submitted.append(record)
    return submitted


def wait(sweep: Sweep, poll: float = 2.0, timeout: float | None = None) -> None:
    """Block until none of the sweep's units is queued or running."""
    start = time.monotonic()
    while any(state in ("queued", "running") for _, state, _ in unit_states(sweep)):
        if timeout is not None and time.monotonic() - start > timeout:
            raise ProbeError(f"sweep {sweep.name!r} still has units queued or running after {timeout:.0f}s")
        time.sleep(poll)
