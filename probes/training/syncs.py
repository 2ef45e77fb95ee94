"""Host synchronisations, counted: every read of a tensor's value by the host (`.item()`, `float(t)`, `bool(t)`,
`if t:`; aten._local_scalar_dense) and every copy from an accelerator to the host. On a GPU each one stalls the
host until the device has caught up, so a training step with none can queue kernels ahead; on the CPU the same
count is measured (a CPU tensor's `.item()` is the same call), which is how the suite checks a step for them."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SCALAR_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default}
COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostSyncs(TorchDispatchMode):
    """`with HostSyncs() as s: ...` then `s.count` (and `s.where`: op -> count)."""

    def __init__(self):
        super().__init__()
        self.where: Counter = Counter()

    @property
    def count(self) -> int:
        return sum(self.where.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in SCALAR_READS:
            self.where[str(func)] += 1
        elif func in COPIES and _to_host(func, args, kwargs, out):
            self.where["device-to-host copy"] += 1
        return out


def _to_host(func, args, kwargs, out) -> bool:
    src = args[1] if func is torch.ops.aten.copy_.default else args[0]
    dst = args[0] if func is torch.ops.aten.copy_.default else out
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type != "cpu"
            and dst.device.type == "cpu")
