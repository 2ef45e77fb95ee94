"""Slurm execution of a sweep: one job array per set of equal resources, each array task running one unit through
`probe sweep FILE --executor local --unit ID`; what was submitted is kept in the sweep's bookkeeping folder."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..errors import ProbeError
from .queue import queued_units
from .rundir import write_json
from .lens_units import LensUnit, lens_time
from .sweep import GPU_HOST_MEMORY, SLURM_DEFAULTS, Sweep, Unit, unit_states
from .trained_units import TRAIN_SLURM, TrainUnit


def resources(sweep: Sweep, unit) -> dict:
    """Slurm resources of a unit: GPUs, host memory and time limit from `probe plan` (a lens unit's time from its
    tokens: lens_units.lens_time), the rest from defaults; the sweep's `slurm` mapping overrides any of them, and
    `train.slurm` or `lens.slurm` those of its training or lens units."""
    from ..methods.catalog import get_probe, probe_options
    from ..models.planning import GiB, plan, time_limit
    from .execution import AUTO_START

    own = (sweep.train_slurm if isinstance(unit, TrainUnit) else sweep.lens["slurm"] if isinstance(unit, LensUnit)
           else {})
    res = {**SLURM_DEFAULTS, **{k: v for k, v in sweep.slurm.items() if k != "extra"}}
    if isinstance(unit, TrainUnit) or unit.trained_by is not None:
        # training a small model, or probing one the sweep trains (not there yet to plan): the training defaults,
        # or what the sweep's slurm (for probes) and train.slurm or lens.slurm (for their units) say
        res = {**res, **{k: v for k, v in TRAIN_SLURM.items() if k not in sweep.slurm}, **own}
        res.pop("gpu_mem")
        return res
    res.update(own)
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
        if "time" not in res and isinstance(unit, LensUnit):
            res["time"] = lens_time(p, unit, gpu=bool(int(res["gpus"])))
        elif "time" not in res:
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
    """Submit every unit that is not done, running or queued: one job array per set of equal resources, training
    units first, then lens units; a unit waits (afterok) for the job of the unit it waits for (Sweep.waits_for): a
    probe for its model's lens (if it reads it), else for its model's training, and a lens for its model's training."""
    if not dry_run and shutil.which("sbatch") is None:
        raise ProbeError("--executor slurm needs Slurm's sbatch on PATH; accepted: --executor local")
    states = unit_states(sweep)
    todo = [u for u, state, _ in states if state in ("pending", "failed")]
    queued = queued_units(sweep)
    # the array task of each training or lens unit already in the queue ("pending (job 123_4)" -> "123_4")
    jobs = {u: queued[u.id].split("job ")[-1].rstrip(")") for u in [*sweep.train_units, *sweep.lens_units()]
            if u.id in queued}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    submitted = []
    for stage in (TrainUnit, LensUnit, Unit):
        groups: dict[str, list] = {}
        for unit in (u for u in todo if isinstance(u, stage)):
            after = None
            if (waits := sweep.waits_for(unit)) is not None:
                after = jobs.get(waits)
                if after is None:  # what it waits for failed to be queued: nothing to wait for yet
                    continue
            res = resources(sweep, unit)
            groups.setdefault(json.dumps([res, after], sort_keys=True), []).append(unit)
        for key, units in groups.items():
            res, after = json.loads(key)
            record = _submit(sweep, units, res, after, sweep.bookkeeping / f"{stamp}-{len(submitted)}", dry_run)
            submitted.append(record)
            for i, u in enumerate(units):  # each unit waits for its own training or lens only
                if not isinstance(u, Unit):
                    jobs[u] = f"{record.get('job', '<job>')}_{i}"
    return submitted


def _submit(sweep: Sweep, units: list, res: dict, after: str | None, folder: Path, dry_run: bool) -> dict:
    """One job array of `units`, after job `after` has succeeded if given."""
    folder.mkdir(parents=True, exist_ok=True)
    units_file = folder / "units.txt"
    units_file.write_text("".join(u.id + "\n" for u in units))
    script = folder / "job.sh"
    script.write_text(job_script(sweep, res, units_file))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", sweep.name)[:64]
    cmd = ["sbatch", "--parsable", f"--array=0-{len(units) - 1}", f"--job-name=probe-{name}",
           f"--output={folder}/%A_%a.out", *([f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []),
           str(script)]
    record = {"units": [u.id for u in units], "resources": res, "script": str(script), "command": cmd,
              **({"after": after} if after else {})}
    if not dry_run:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise ProbeError(f"sbatch refused {script}: {out.stderr.strip()}")
        record["job"] = out.stdout.strip().split(";")[0]
        with open(sweep.bookkeeping / "submissions.jsonl", "a") as f:
            f.write(json.dumps({"job": record["job"], "units": record["units"], "folder": folder.name}) + "\n")
    write_json(folder / "submission.json", record)
    return record


def wait(sweep: Sweep, poll: float = 2.0, timeout: float | None = None) -> None:
    """Block until none of the sweep's units is queued or running."""
    start = time.monotonic()
    while any(state in ("queued", "running") for _, state, _ in unit_states(sweep)):
        if timeout is not None and time.monotonic() - start > timeout:
            raise ProbeError(f"sweep {sweep.name!r} still has units queued or running after {timeout:.0f}s")
        time.sleep(poll)
