"""Run folders: one table (one CSV row per prompt x layer, or per the probe's unit) plus metadata.

    <results>/<model>/<task>/<probe>/
        meta.json       what ran (model, revision, dtype, task + version, seed, probe, versions, git commit, time)
        table.csv       all rows, written when the run completes
        parts/          one CSV per finished batch, written atomically; a rerun skips the items found here

Every file is written to a temporary name and renamed, so a killed run never leaves a torn file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from .errors import ProbeError
from .registry import ROOT

PACKAGES = ("probe", "torch", "transformers", "nnsight", "accelerate", "bitsandbytes", "datasets", "pandas")


def atomic_write(path: Path, write) -> None:
    """`write(file_object)` into a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
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


class RunDir:
    """A run's folder; `config` identifies the computation, so a rerun with the same config resumes."""

    def __init__(self, path: Path, config: dict, overwrite: bool = False):
        self.path = Path(path)
        self.config = config
        meta = self.path / "meta.json"
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        elif meta.exists():
            old = json.loads(meta.read_text()).get("config", {})
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if diff:
                shown = ", ".join(f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in diff)
                raise ProbeError(f"{self.path} holds a different run ({shown}); pass --overwrite or another --output")
        self.parts = self.path / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)

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
