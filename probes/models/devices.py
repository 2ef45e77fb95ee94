"""Devices, in one place: the device values users type, checked; the default placement; where a module computes;
this machine's memory; and what to do when a batch runs out of it.

`--device-map` (and a registry entry's `device_map`) takes `cpu`, `cuda` or `cuda:N` (one device: what
transformers, accelerate and lm-evaluation-harness users type) or one of accelerate's strategies (`auto`,
`balanced`, `balanced_low_0`, `sequential`: spread over the GPUs, CPU beyond). Without one, a model goes to the
first GPU when its weights fit in what is free there less HEADROOM (and within its `--max-memory` entry, if
given), is spread over the GPUs (and the CPU beyond) when they do not, and stays on the CPU on a machine without a
CUDA GPU. A spread map gets `--max-memory`, or else each GPU's free memory less HEADROOM (as `--gpus N` does) and
90% of the CPU memory available. What was chosen, and whether by default, is recorded with the run.
"""

from __future__ import annotations

import re

import torch

from ..errors import ProbeError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
ACCEPTED = ", ".join(STRATEGIES) + ", cpu, cuda, cuda:N"
HEADROOM = 0.2  # of each GPU's total memory kept free of weights: activations, the CUDA context, allocator slack
CPU_SHARE = 0.9  # of the CPU memory available now that weights may take


def parse_device_map(value):
    """A device value, normalised (`cuda` -> `cuda:0`); a mapping (module -> device) is passed through. Grammar only:
    whether this machine has the device is `check_here`'s, at load time (a sweep may name GPUs from a login node)."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if text in STRATEGIES or text == "cpu":
        return text
    m = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not m:
        raise ProbeError(f"unknown device map {value!r}; accepted: {ACCEPTED}")
    return f"cuda:{int(m.group(1) or 0)}"


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_here(device_map) -> None:
    """Refuse, before loading, a device this machine does not have."""
    if not (isinstance(device_map, str) and device_map.startswith("cuda")):
        return  # the CPU, or a strategy (without GPUs accelerate places everything on the CPU)
    n = gpu_count()
    if n == 0:
        raise ProbeError(f"device map {device_map!r}: this machine has no CUDA GPU; accepted: cpu (or leave "
                         "--device-map out)")
    if int(device_map.split(":")[1]) >= n:
        raise ProbeError(f"device map {device_map!r}: this machine has {n} CUDA GPU(s); accepted: cuda:0 to "
                         f"cuda:{n - 1}, or {', '.join(STRATEGIES)}")


def size(value) -> int:
    """A max_memory amount ('75GiB' or bytes) in bytes."""
    from accelerate.utils import convert_file_size_to_int

    return convert_file_size_to_int(value) if isinstance(value, str) else int(value)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def default_device_map(weight_bytes, max_memory: dict | None = None) -> str | None:
    """No GPU: None (the CPU). The weights fit on the first GPU (its free memory less HEADROOM, and no more than its
    `max_memory` entry; none: nothing): `cuda:0`. Else `auto` (every GPU, CPU beyond). `weight_bytes` is called
    only when there is a GPU (it builds the model on the meta device)."""
    if not gpu_count():
        return None
    room = gpu_budgets(1)[0]
    if max_memory is not None:
        room = min(room, size(max_memory.get(0, 0)))
    return "cuda:0" if weight_bytes() <= room else "auto"


def check_max_memory(device_map, max_memory: dict, weights: int) -> None:
    """Refuse weights that `max_memory` cannot hold: on one device, its entry for that device, if it has one
    (from_pretrained reads max_memory only for a spread map); spread, its entries together (accelerate would put
    the rest on disk)."""
    given = ",".join(f"{k}={v}" for k, v in max_memory.items())
    if device_map in STRATEGIES:
        room = sum(size(v) for v in max_memory.values())
        if weights > room:
            raise ProbeError(f"max_memory {given!r} holds {gib(room)} in all, and the weights take {gib(weights)}; "
                             "accepted: entries that hold them together (a larger cpu=SIZE, or disk=SIZE)")
        return
    device = device_map or "cpu"
    key = int(device.split(":")[1]) if device.startswith("cuda") else "cpu"
    if key in max_memory and weights > size(max_memory[key]):
        raise ProbeError(f"max_memory {given!r} gives {device} {gib(size(max_memory[key]))}, and the weights take "
                         f"{gib(weights)} there, all on that one device; accepted: a larger {key}= entry, or "
                         f"--device-map {'/'.join(STRATEGIES)} to spread them under max_memory")


def placement(hf, device_map, default: bool) -> dict:
    """Where the loaded model's weights are, for the run header and meta.json."""
    devices = sorted({str(p.device) for p in hf.parameters()})
    gpus = sorted({torch.cuda.get_device_name(torch.device(d)) for d in devices if d.startswith("cuda")})
    return {"device_map": device_map if device_map is not None else "cpu", "devices": devices, "gpus": gpus,
            "default": default}


def describe(place: dict, dtype: str) -> str:
    """'on cuda:0 (NVIDIA H200), bfloat16, by default' / 'on cpu, float32'."""
    where = ", ".join(place["devices"]) + (f" ({', '.join(place['gpus'])})" if place["gpus"] else "")
    return f"on {where}, {dtype}" + (", by default" if place["default"] else "")


def execution_device(module) -> torch.device:
    """Where `module` computes: accelerate's hook device for offloaded modules (their weights sit on 'meta' between
    calls), else where its weight is."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device("cpu") if dev == "cpu" else torch.device(dev)
    return first_weight(module).device


def first_weight(module) -> torch.Tensor:
    """The module's weight, or its first parameter (a final stage that is several layers: probe_transformer's ReLU
    layers before the readout)."""
    return module.weight if hasattr(module, "weight") else next(module.parameters())


def _first_gpus(gpus: int | None) -> range:
    n = gpu_count()
    if gpus is not None and gpus > n:
        raise ProbeError(f"--gpus {gpus}: this machine has {n} CUDA GPU(s); accepted: 0 to {n}")
    return range(n if gpus is None else gpus)


def machine_memory(gpus: int | None = None) -> tuple[list[int], int]:
    """Total memory of each CUDA GPU used (the first `gpus`, or all) and the CPU memory available now."""
    import psutil

    return ([torch.cuda.get_device_properties(i).total_memory for i in _first_gpus(gpus)],
            psutil.virtual_memory().available)


def gpu_budgets(gpus: int | None = None) -> list[int]:
    """What the weights may take on each CUDA GPU used (the first `gpus`, or all): its free memory now less
    HEADROOM of its total."""
    budgets = []
    for i in _first_gpus(gpus):
        free, total = torch.cuda.mem_get_info(i)
        budgets.append(max(0, int(free - HEADROOM * total)))
    return budgets


def machine_max_memory(gpus: int | None = None) -> dict:
    """accelerate's max_memory for this machine: each GPU's budget (`gpu_budgets`), CPU_SHARE of the CPU's."""
    import psutil

    return {**dict(enumerate(gpu_budgets(gpus))), "cpu": int(CPU_SHARE * psutil.virtual_memory().available)}


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or a CPU allocator failure (a RuntimeError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                            or "not enough memory" in text)


def smaller_batch(error: BaseException, size: int, auto: bool) -> int:
    """After `error` in a batch of `size`: with `--batch-size auto` and out of memory, the half size to retry with
    (cached memory freed first); anything else is raised again."""
    if not (auto and is_out_of_memory(error) and size > 1):
        raise error
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return size // 2
