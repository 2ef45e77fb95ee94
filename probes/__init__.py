"""probe: read and change what language models compute (logit lens, FFN updates, attention).

The package, by part:
    models/    the registry, loading (hub, GGUF, folder, random config), architecture access, options, planning
    tasks/     the task-file reader and each kind of task (relational, N-back, tree path-finding, a user's prompts)
    methods/   the probes themselves, one module each, and the catalog that names them
    runs/      local execution, run folders and their locks, sweeps and Slurm
    reports/   aggregate tables, the HTML report, plots
    training/  training configs, the synthetic tasks' data (one generator each) and the trainer (`probe train`)
    api.py     the Python API below; cli.py, the `probe` command, is a thin layer over it (its arguments: parser.py)
    schema.py  the reference of every file a user writes (docs/schema.md)
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it; imported on first use, so that `probe --help` does not wait for torch
_PUBLIC = {"Result": "api", "aggregate": "api", "list_models": "api", "list_probes": "api", "list_tasks": "api",
           "load": "api", "options": "api", "prompts": "api", "run": "api", "task": "api", "train_lens": "api",
           "ProbeError": "errors", "Loaded": "models.loading", "Item": "tasks.base", "Task": "tasks.base"}
__all__ = ["Item", "Loaded", "ProbeError", "Result", "Task", "aggregate", "list_models", "list_probes",
           "list_tasks", "load", "options", "prompts", "run", "task", "train_lens"]

if TYPE_CHECKING:
    from .api import (Result, aggregate, list_models, list_probes, list_tasks, load, options, prompts, run, task,
                      train_lens)
    from .errors import ProbeError
    from .models.loading import Loaded
    from .tasks.base import Item, Task


def _started_as_the_command() -> bool:
    """`probe ...` or `python -m probes ...`: the command imports what each subcommand needs (torch only where it
    is used, so that `probe --help` does not wait for it), and registers the architectures where it loads."""
    first = os.path.basename(sys.argv[0]) if sys.argv else ""
    return first == "probe" or first == "-m"  # -m: runpy is locating `probes` to run it


if not _started_as_the_command():
    # this project's architectures known to transformers' Auto classes, so that a trained run loads with plain
    # `AutoModelForCausalLM.from_pretrained` after `import probes` (models/custom.py registers them)
    importlib.import_module(".models.custom", __name__)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
