"""Shared by the benchmarks (bench.py and its modules): medians of timed runs after a warm-up, peak resident memory
sampled while a block runs, and the peak tensor bytes that operations allocate (activations)."""

from __future__ import annotations

import statistics
import threading
import time
import weakref

import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode

PROC = psutil.Process()


class PeakRSS:
    """Peak resident set size while the block runs (a sampling thread), in bytes."""

    def __enter__(self):
        self.peak = PROC.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, PROC.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, PROC.memory_info().rss)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by the operations run under it and still alive (activations, not the
    allocator's cache or the weights): each new storage counts from its creation until its tensor is freed."""

    def __enter__(self):
        self.live = self.peak = 0
        return super().__enter__()

    def _free(self, n):
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                n = t.untyped_storage().nbytes()
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, n)
        return out


def activation_peak(fn) -> int:
    with PeakTensorBytes() as m:
        fn()
    return m.peak


def measure(fn, reps: int) -> tuple[float, int]:
    """(median seconds, most memory taken above what the process held just before) of fn over `reps` runs after a
    warm-up."""
    fn()
    times, extra = [], 0
    for _ in range(reps):
        before = PROC.memory_info().rss
        with PeakRSS() as m:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        extra = max(extra, m.peak - before)
    return statistics.median(times), extra
