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
import fcntl
import json
import os
import platform
import re
import socket
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from ..errors import ProbeError
from ..paths import ROOT

PACKAGES = ("probe", "torch", "transformers", "nnsight", "accelerate", "bitsandbytes", "datasets", "pandas")


_UMASK = os.umask(0)
os.umask(_UMASK)


def safe_name(name) -> str:
    """A name as one folder name under a results folder: path separators, whitespace, control characters and
    shell characters become '_', runs of dots one dot, and leading dots go: no name reaches outside its folder."""
    text = re.sub(r"\.{2,}", ".", re.sub(r"[^\w.+=@-]+", "_", str(name)))
    return text.strip("._") or "_"


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


RUN_FILES = {"meta.json", "table.csv", "plot.png", "parts"}  # what a run folder holds besides its lock


class RunBusy(ProbeError):
    """The run folder is held by another live process."""


class RunComplete(Exception):
    """The run folder, once its lock was held, was found to hold a finished run of the same config (another
    process finished it between the caller's first look and its lock): there is nothing to compute."""


class RunLock:
    """An exclusive claim on a folder: `.lock` names the holder (host, pid, Slurm job).

    The lock appears fully written or not at all: its content is written to a private file first, then hard-linked
    to `.lock`, which fails if one exists. Checking a lock that exists and taking over a stale one happen under an
    flock of the folder, so of processes that find the same stale lock, one takes it and the others see the
    winner's. A lock is stale when its holder is a dead process on this host (a run killed with SIGKILL), or a
    Slurm job that the queue no longer holds (a job killed at its time limit on another node). A lock from another
    host outside Slurm, or when squeue cannot answer, is trusted, since it cannot be checked from here."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / ".lock"

    def holder(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return info if isinstance(info, dict) else None

    def alive(self) -> bool:
        info = self.holder()
        if info is None:
            return False
        if info.get("host") != socket.gethostname():
            return slurm_job_alive(str(info["slurm_job"])) if info.get("slurm_job") else True
        try:
            os.kill(int(info["pid"]), 0)
        except (ProcessLookupError, ValueError, TypeError, KeyError):
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> bool:
        """Take the lock; False if a live process holds it."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "slurm_job": slurm_job()}
        fd, claim = tempfile.mkstemp(prefix=".lock.", suffix=".claim", dir=folder)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            guard = os.open(folder, os.O_RDONLY)
            try:
                fcntl.flock(guard, fcntl.LOCK_EX)
                for _ in range(2):
                    try:
                        os.link(claim, self.path)
                        return True
                    except FileExistsError:
                        if self.alive():
                            return False
                        self.path.unlink(missing_ok=True)  # stale, and no one else may judge it while we hold the guard
                return False
            finally:
                os.close(guard)  # releases the flock
        finally:
            os.unlink(claim)

    def release(self) -> None:
        info = self.holder()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


class RunDir:
    """A run's folder; `config` identifies the computation, so a rerun with the same config resumes.
    Use as a context manager: it holds the folder's lock, and marks the run failed if the body raises."""

    def __init__(self, path: Path, config: dict, overwrite: bool = False, skip_complete: bool = False):
        """skip_complete: raise RunComplete if, under the lock, the folder holds this config's finished run (what
        a sweep wants: each unit computed once, whoever gets to it first)."""
        self.path = Path(path)
        self.config = config
        self.lock = RunLock(self.path)
        if not self.lock.acquire():
            h = self.lock.holder() or {}
            raise RunBusy(f"{self.path} is being written by pid {h.get('pid')} on {h.get('host')} (since "
                          f"{h.get('since')}); accepted: wait for it, or another --output")
        try:
            if skip_complete and is_complete(self.path, config):
                raise RunComplete(str(self.path))
            self._check(overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _check(self, overwrite: bool) -> None:
        check_folder(self.path, self.config, overwrite)
        if overwrite:
            for child in self.path.iterdir():
                if child.name != ".lock" and not child.name.endswith(".claim"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            for orphan in [*self.path.glob("*.tmp"), *self.path.glob("parts/*.tmp")]:  # a killed writer's
                orphan.unlink()
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
        return {int(i) for f in sorted(self.parts.glob("*.csv")) for i in _read_part(f, usecols=["item"]).item}

    def write_part(self, rows: list[dict]) -> None:
        items = sorted({r["item"] for r in rows})
        write_csv(self.parts / f"items-{items[0]:06d}-{items[-1]:06d}.csv", pd.DataFrame(rows))

    def table(self) -> pd.DataFrame:
        parts = [_read_part(f, **TEXT) for f in sorted(self.parts.glob("*.csv"))]
        if not parts:
            raise ProbeError(f"{self.path} has no results")
        rows = pd.concat(parts, ignore_index=True)
        return typed(rows).sort_values(["item"], kind="stable").reset_index(drop=True)

    def finish(self, df: pd.DataFrame, summary: dict, extra: dict | None = None) -> None:
        write_csv(self.path / "table.csv", df)
        meta = json.loads((self.path / "meta.json").read_text())
        write_json(self.path / "meta.json", {**meta, **(extra or {}), "status": "complete", "finished": _now(),
                                             "summary": summary})


TEXT = {"dtype": str, "keep_default_na": False, "na_values": [""]}  # every cell as written; empty: missing


def typed(rows: pd.DataFrame) -> pd.DataFrame:
    """Columns read as text, typed once over all rows: numbers where every value is written as one, True/False
    as booleans, text elsewhere. pandas' own inference runs per file (a column of node labels came back integers
    from one batch and text from another, which holds a "-") and reads a token " 1" as the number 1."""
    out = rows.copy()
    for c in out.columns:
        values = out[c].dropna()
        if values.empty:
            out[c] = pd.to_numeric(out[c])
        elif values.isin(["True", "False"]).all():
            out[c] = out[c].map({"True": True, "False": False})
        elif (values == values.str.strip()).all():
            numbers = pd.to_numeric(values, errors="coerce")
            if numbers.notna().all():
                out[c] = pd.to_numeric(out[c])
    return out


def read_table(path: Path, columns: set[str] | None = None) -> pd.DataFrame:
    """A run's table.csv, typed as the run's own table was (`typed`)."""
    return typed(pd.read_csv(path, usecols=(lambda c: c in columns) if columns else None, **TEXT))


def _read_part(path: Path, **kwargs) -> pd.DataFrame:
    """One finished batch; a damaged one (not written by this project's atomic writes) is named, with the fix."""
    try:
        return pd.read_csv(path, **kwargs)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise ProbeError(f"batch file {path} is damaged ({type(e).__name__}); accepted: delete it and rerun, which "
                         "recomputes that batch") from None


def _read_meta(path: Path) -> dict | None:
    """A run folder's meta.json, None if there is none; unreadable is an error naming the file."""
    meta = Path(path) / "meta.json"
    try:
        data = json.loads(meta.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ProbeError(f"{meta} cannot be read ({type(e).__name__}); accepted: --overwrite to start that run "
                         "again, or another --output")
    if not isinstance(data, dict):
        raise ProbeError(f"{meta} is not a run's metadata (a JSON {type(data).__name__}); accepted: --overwrite "
                         "or another --output")
    return data


def finished(meta: dict | None, config: dict) -> bool:
    """Whether a run folder's metadata is that of a finished run of `config`."""
    return isinstance(meta, dict) and meta.get("status") == "complete" and meta.get("config") == config


def is_complete(path: Path, config: dict) -> bool:
    try:
        return finished(_read_meta(path), config)
    except ProbeError:  # unreadable: not a finished run (the writer's own checks name it)
        return False


def check_folder(path: Path, config: dict, overwrite: bool = False) -> None:
    """Whether a run with `config` may write `path`, judged without touching it (so before a model loads): a
    folder that holds a different run is refused with the differences named, unless `overwrite`, which only
    ever empties a run folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ProbeError(f"output {str(path)!r} is a file; accepted: a folder (new, or a run folder)")
    if not path.exists():
        return
    if overwrite:
        ours = [c for c in path.iterdir() if c.name != ".lock" and not c.name.endswith(".claim")]
        if not ours:
            return
        try:
            is_run = "config" in (_read_meta(path) or {})
        except ProbeError:
            is_run = True  # a torn meta.json among only run files: a run of ours, killed mid-write
        foreign = [c.name for c in ours if c.name not in RUN_FILES and not c.name.endswith(".tmp")]
        if not is_run or foreign:
            what = f"{foreign[0]!r} is not a file probe writes" if foreign else "it has no run's meta.json"
            raise ProbeError(f"--overwrite refused: {path} is not a run folder ({what}), and --overwrite only "
                             "removes run folders; accepted: a run folder, or another --output")
        return
    old = (_read_meta(path) or {}).get("config")
    if old is None:
        return
    diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    if diff:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise ProbeError(f"{path} holds a different run ({shown}); pass --overwrite or another --output")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    return {"versions": versions(), "git_commit": git_commit(), "python": platform.python_version(),
            "host": platform.node()}
