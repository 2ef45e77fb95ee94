"""Where the project's files live: the repository (registry, task files, shipped configs) and the model cache."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Dequantized GGUFs, random models and offload folders ($PROBE_CACHE, default ~/.cache/probe)."""
    return Path(os.environ.get("PROBE_CACHE", Path.home() / ".cache" / "probe"))


def tasks_dir() -> Path:
    """The task files ($PROBE_TASKS, default tasks/ of the repository)."""
    return Path(os.environ.get("PROBE_TASKS", ROOT / "tasks"))


def runs_root() -> Path:
    """Where trained runs go by default ($PROBE_RUNS, default runs/ in the current folder)."""
    return Path(os.environ.get("PROBE_RUNS", "runs"))
