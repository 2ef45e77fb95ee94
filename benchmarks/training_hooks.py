"""Step hooks for the training benchmarks: called at every training step's start with the steps done, in `probe
train` (its Trainer, through `StepHooks`) and in the bare loop alike. `SyncCounter` counts host synchronisations
between logging steps; `Clock` times the steady steps."""

from __future__ import annotations

import statistics
import time
from collections import Counter

import torch
from transformers import TrainerCallback

from probes.training.syncs import HostSyncs


class StepHooks(TrainerCallback):
    """For `train(..., callbacks=[StepHooks(...)])` (what `probe train` runs): each hook called at every step's
    start as hook(steps done, entries in the Trainer's log so far), and once at the end as hook(None, entries)."""

    def __init__(self, *hooks):
        self.hooks = hooks

    def on_step_begin(self, args, state, control, **kw):
        for hook in self.hooks:
            hook(state.global_step, len(state.log_history))

    def on_train_end(self, args, state, control, **kw):
        for hook in self.hooks:
            hook(None, len(state.log_history))


class SyncCounter:
    """A step hook counting host synchronisations (training/syncs.py) from one step's start to the next's, as
    tests/test_training_syncs.py does. An interval is a logging one when the trainer logged in it, or it ends at a
    multiple of `every` (logging, evaluation), or at an epoch's last or first step (`per_epoch` steps each: the
    generator's metrics of an epoch's first batch); the others are the steps between logging steps, whose mean is
    the figure (target 0)."""

    def __init__(self, every: int, per_epoch: int | None):
        self.every, self.per_epoch = every, per_epoch
        self.mode, self.logs, self.quiet, self.logging, self.where = None, 0, [], [], Counter()

    def __call__(self, step: int | None, logs: int) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            if step is not None:
                logged = (logs > self.logs or step % self.every == 0
                          or bool(self.per_epoch and step % self.per_epoch in (0, 1 % self.per_epoch)))
                (self.logging if logged else self.quiet).append(self.mode.count)
                if not logged:
                    self.where.update(self.mode.where)
            self.mode = None
        if step is not None:
            self.logs, self.mode = logs, HostSyncs()
            self.mode.__enter__()

    def summary(self) -> dict:
        return {"syncs_per_step": statistics.mean(self.quiet) if self.quiet else None, "quiet_steps": len(self.quiet),
                "syncs_at_logging_steps": statistics.mean(self.logging) if self.logging else None,
                "syncs_where": dict(self.where)}


class Clock:
    """A step hook timing steps `first` + 1 to `last` (from the start of the one to the start of the step after the
    other), the device synchronised at those two points only: a steady rate, without the compile of the first steps
    or the logging, evaluation and saving of the last. One rate per run it is hooked into; their median."""

    def __init__(self, first: int, last: int, cuda: bool):
        self.first, self.last, self.cuda, self.start, self.rates = first, last, cuda, None, []

    def __call__(self, step: int | None, logs: int) -> None:
        if step in (self.first, self.last):
            if self.cuda:
                torch.cuda.synchronize()
            if step == self.first:
                self.start = time.perf_counter()
            else:
                self.rates.append((self.last - self.first) / (time.perf_counter() - self.start))

    @property
    def steps_per_second(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None
