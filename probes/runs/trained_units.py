"""The training part of a sweep file: its training units (`train:` configs x `set` grid x seeds), the checkpoints
a model expands to (`checkpoints: all`, globs), and task options taken from a model's training config ("{task.n}").
See probes/runs/sweep.py for the file as a whole."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ProbeError
from ..training.config import load_training_config
from .rundir import RunBusy, RunComplete, RunLock, safe_name

TRAIN_KEYS = {"configs", "set", "seeds", "runs", "slurm"}
# what a slurm mapping may set: the sweep's, its training units' and its lens units' (lens_units.py)
SLURM_KEYS = {"partition", "time", "gpus", "mem", "cpus_per_task", "gpu_mem", "account", "qos", "extra"}
CHECKPOINTS = ("final", "all")
TRAIN_SLURM = {"gpus": 0, "mem": "8G", "time": "02:00:00"}  # a training unit's resources unless `slurm` says


@dataclass(frozen=True)
class TrainUnit:
    """One training run of the sweep: a config with `overrides` ((dotted field, value), ...) and a seed."""
    name: str  # the config's name
    config: str  # its file
    overrides: tuple = ()
    seed: int | None = None

    @property
    def folder(self) -> str:
        """The run folder's name: the set values and the seed, e.g. n3-seed0 (as `probe train` names it)."""
        parts = [f"{k.rsplit('.', 1)[-1]}{v}" for k, v in self.overrides] + ([] if self.seed is None else [f"seed{self.seed}"])
        return safe_name("-".join(parts) or "run")

    @property
    def id(self) -> str:
        return f"train/{safe_name(self.name)}/{self.folder}"



TEMPLATE = re.compile(r"\{(task|model|train)\.(\w+)\}")


def from_training(value, key: str, unit, sweep):
    """A task option's value, with "{section.field}" (alone, or as an item of a list) taken from the unit's model's
    training config."""
    if isinstance(value, list):
        return [from_training(v, key, unit, sweep) for v in value]
    m = TEMPLATE.fullmatch(value) if isinstance(value, str) else None
    if not m:
        return value
    cfg = sweep.training_config_of(unit)
    if cfg is None:
        raise ProbeError(f"task option {key}={value!r} names a training field, but {unit.model!r} is not a trained "
                         "run; accepted: such options with trained models only")
    section, name = m.groups()
    if name not in cfg[section]:
        raise ProbeError(f"task option {key}={value!r}: the training config has no {section}.{name}; accepted: "
                         + ", ".join(f"{{{section}.{k}}}" for k in cfg[section]))
    return cfg[section][name]


def expand_models(models: list, base: Path, checkpoints: str, where: str) -> list[str]:
    """Globs to the folders they match, and training runs to their checkpoint folders with `checkpoints: all` (in
    step order); a relative folder or glob is relative to the sweep file, as `results` and `runs` are."""
    from ..models.registry import trained_checkpoint

    out = []
    for m in map(str, models):
        if any(c in m for c in "*?["):
            found = sorted(base.glob(m) if not Path(m).is_absolute() else Path("/").glob(m.lstrip("/")),
                           key=lambda p: (str(p.parent), _step(p)))
            if not found:
                raise ProbeError(f"{where}: model glob {m!r} matches no folder; accepted: a glob of checkpoint folders")
            out += [os.path.normpath(p) for p in found if p.is_dir()]
            continue
        if not Path(m).is_absolute() and ("/" in m or m.startswith(".")) and (base / m).is_dir():
            m = os.path.normpath(base / m)  # a folder beside the sweep file (a registry name has no "/")
        if checkpoints == "all" and Path(m).is_dir() and (t := trained_checkpoint(Path(m))) and t["final"]:
            out += [str(p) for p in sorted(Path(m).glob("checkpoint-*"), key=_step)]
        else:
            out.append(m)
    return out


def _step(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def train_units(spec, base: Path, where: str) -> list[TrainUnit]:
    """The training units of a sweep's `train` mapping (configs x `set` grid x seeds)."""
    if not isinstance(spec, dict):
        raise ProbeError(f"{where}: train {spec!r} is not a mapping; accepted: configs, set, seeds, runs, slurm")
    bad = set(spec) - TRAIN_KEYS
    if bad:
        raise ProbeError(f"{where}: unknown train field(s) {', '.join(sorted(bad))}; accepted: {', '.join(sorted(TRAIN_KEYS))}")
    configs = field_list(spec, "configs", f"{where}: train")
    grid = spec.get("set") or {}
    if not isinstance(grid, dict):
        raise ProbeError(f"{where}: train.set {grid!r} is not a mapping; accepted: field: [values], e.g. task.n: [1, 2]")
    seeds = spec.get("seeds", [None])
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not isinstance(seeds, list) or not all(s is None or (isinstance(s, int) and not isinstance(s, bool)) for s in seeds):
        raise ProbeError(f"{where}: train.seeds {seeds!r}; accepted: a list of integer seeds")
    keys = list(grid)
    values = [v if isinstance(v, list) else [v] for v in grid.values()]
    units = []
    for c in configs:
        path = (base / str(c)) if not Path(str(c)).is_absolute() else Path(str(c))
        name = load_training_config(path)["name"]
        for combo in itertools.product(*values):
            for seed in seeds:
                units.append(TrainUnit(name, str(path), tuple(zip(keys, combo)), seed))
    return units


def run_training(sweep, tu: TrainUnit, progress: bool = True) -> str:
    """Train one unit into its run folder (resuming a killed run); 'done', 'skipped' or 'failed: ...'."""
    from ..training.trainer import train

    if sweep.trained(tu) or RunLock(sweep.run_dir(tu)).alive():
        return "skipped"
    try:  # as run_unit: checked again under the lock
        train(sweep.train_config(tu), sweep.run_dir(tu), resume=True, progress=progress, skip_complete=True)
    except (RunBusy, RunComplete):
        return "skipped"
    except Exception as e:  # as run_unit: one failure must not stop the others
        return f"failed: {type(e).__name__}: {e}"
    return "done"


def field_list(data: dict, key: str, where: str) -> list:
    """A sweep file's list field (one value given alone is a list of one)."""
    value = data.get(key)
    if isinstance(value, (str, int)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ProbeError(f"{where}: '{key}' must be a non-empty list")
    return value
