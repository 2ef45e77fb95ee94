"""What Slurm holds of a sweep: its submissions (the bookkeeping folder's submissions.jsonl, written by slurm.py)
against the queue (squeue). Read by `probe status` (sweep.unit_states) and by submission (slurm.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path


def queued_units(sweep) -> dict[str, str]:
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


def last_job(sweep, unit) -> tuple[str, Path] | None:
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
