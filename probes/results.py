"""Run folders: one table (one CSV row per prompt x layer, or per the probe's unit) plus metadata.

    <results>/<model>/<task>/<probe>/
        meta.json       what ran (model, revision, dtype, task + version, seed, probe, versions, git commit, time)
                        and its status: running, complete or failed (with the error)
        table.csv       all rows, written when the run completes
        parts/          one CSV per finished batch, written atomically; a rerun skips the items found here
        .lock           held while a process writes the folder (host, pid, Slurm job); see `RunLock`

Every file is written to a temporary name and renamed, so a killed run never leaves a torn file, and a folder has
one writer at a time, so two jobs pointed at the same results never interleave their parts.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from .errors import ProbeError
from .registry import ROOT

PACKAGES = ("probe", "torch", "transformers", "nnsight", "accelerate", "bitsandbytes", "datasets", "pandas")


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, write, binary: bool = False) -> None:
    """`write(file_object)` into a temporary file next to `path`, then rename it into place.
    A process killed mid-write leaves only `<name>.<random>.tmp`, which the folder's next lock holder removes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for the whole group to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2, default=str))


def write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write(path, lambda f: df.to_csv(f, index=False))


def versions() -> dict:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_job() -> str | None:
    """This process's Slurm job as squeue names it: <array job>_<task> for an array task (whose own SLURM_JOB_ID
    may be the array's id, which squeue reads as the whole array), else SLURM_JOB_ID."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def slurm_job_alive(job: str) -> bool:
    """Whether Slurm still has `job` pending, running or completing; True where squeue cannot say (no squeue, no
    answer from the controller), False when it lists nothing or no longer knows the id."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True
    if out.returncode != 0:
        return "invalid job id" not in out.stderr.lower()
    return bool(out.stdout.strip())


class RunBusy(ProbeError):
    """The run folder is held by another live process."""


class RunLock:
    """An exclusive claim on a folder: `.lock`, created with O_EXCL, names the holder (host, pid, Slurm job).

    A lock is stale, and taken over, when its holder is a dead process on this host (a run killed with SIGKILL),
    or a Slurm job that the queue no longer holds (a job killed at its time limit on another node). A lock from
    another host outside Slurm, or when squeue cannot answer, is trusted, since it cannot be checked from here."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def alive(self) -> bool:
        info = self.holder()
        if info is None:
            return False
        if info.get("host") != socket.gethostname():
            return slurm_job_alive(str(info["slurm_job"])) if info.get("slurm_job") else True
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> bool:
        """Take the lock; False if a live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(),
              "slurm_job": slurm_job()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self.alive():
                    return False
                stale = self.path.with_name(f".lock.stale.{os.getpid()}")
                try:  # rename, not unlink: of two processes reclaiming it, one wins and the other retries
                    os.rename(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return True
        return False

    def release(self) -> None:
        info = self.holder()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


class RunDir:
    """A run's folder; `config` identifies the computation, so a rerun with the same config resumes.
    Use as a context manager: it holds the folder's lock, and marks the run failed if the body raises."""

    def __init__(self, path: Path, config: dict, overwrite: bool = False):
        self.path = Path(path)
        self.config = config
        self.lock = RunLock(self.path)
        if not self.lock.acquire():
            h = self.lock.holder() or {}
            raise RunBusy(f"{self.path} is being written by pid {h.get('pid')} on {h.get('host')} (since "
                          f"{h.get('since')}); accepted: wait for it, or another --output")
        try:
            self._check(overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _check(self, overwrite: bool) -> None:
        meta = self.path / "meta.json"
        if overwrite:
            for child in self.path.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            for orphan in [*self.path.glob("*.tmp"), *self.path.glob("parts/*.tmp")]:  # a killed writer's
                orphan.unlink()
            if meta.exists():
                old = json.loads(meta.read_text()).get("config", {})
                diff = sorted(k for k in set(old) | set(self.config) if old.get(k) != self.config.get(k))
                if diff:
                    shown = ", ".join(f"{k}: {old.get(k)!r} -> {self.config.get(k)!r}" for k in diff)
                    raise ProbeError(f"{self.path} holds a different run ({shown}); pass --overwrite or another "
                                     "--output")
        self.parts = self.path / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            meta = self.path / "meta.json"
            if exc is not None and meta.exists():
                write_json(meta, {**json.loads(meta.read_text()), "status": "failed", "finished": _now(),
                                  "error": f"{type(exc).__name__}: {exc}"[:2000]})
        finally:
            self.lock.release()

    def start(self, meta: dict) -> None:
        write_json(self.path / "meta.json", {"config": self.config, **meta, "status": "running",
                                             "started": _now()})

    def done_items(self) -> set[int]:
        return {int(i) for f in sorted(self.parts.glob("*.csv")) for i in pd.read_csv(f, usecols=["item"]).item}

    def write_part(self, rows: list[dict]) -> None:
        items = sorted({r["item"] for r in rows})
        write_csv(self.parts / f"items-{items[0]:06d}-{items[-1]:06d}.csv", pd.DataFrame(rows))

    def table(self) -> pd.DataFrame:
        parts = [pd.read_csv(f, keep_default_na=False, na_values=[""]) for f in sorted(self.parts.glob("*.csv"))]
        if not parts:
            raise ProbeError(f"{self.path} has no results")
        return pd.concat(parts, ignore_index=True).sort_values(["item"], kind="stable").reset_index(drop=True)

    def finish(self, df: pd.DataFrame, summary: dict, extra: dict | None = None) -> None:
        write_csv(self.path / "table.csv", df)
        meta = json.loads((self.path / "meta.json").read_text())
        write_json(self.path / "meta.json", {**meta, **(extra or {}), "status": "complete", "finished": _now(),
                                             "summary": summary})


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "python": platform.python_version(),
            "host": platform.node()}
