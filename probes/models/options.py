"""Loading options: a registry entry's dtype, quantization and placement with command-line overrides, validated,
and this machine's memory. Both loading (what to pass to from_pretrained) and planning (what a load would need)
read them from here.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ProbeError
from .arch import arch_spec
from .devices import machine_max_memory, parse_device_map
from .registry import DTYPES, QUANTIZE, ModelSpec


def _check_choice(what: str, value, accepted):
    if value is not None and value not in accepted:
        raise ProbeError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")


def parse_max_memory(value) -> dict | None:
    """'0=75GiB,1=75GiB,cpu=200GiB' (or a mapping) -> accelerate's max_memory dict."""
    from accelerate.utils import convert_file_size_to_int

    if value is None or isinstance(value, dict):
        return value
    out = {}
    for part in str(value).split(","):
        key, sep, amount = part.partition("=")
        if not sep or not amount.strip():
            raise ProbeError(f"bad max_memory {value!r}; accepted: DEVICE=SIZE pairs like '0=75GiB,cpu=200GiB'")
        key, amount = key.strip(), amount.strip()
        try:
            convert_file_size_to_int(amount)
        except ValueError:
            raise ProbeError(f"bad max_memory {value!r}: {amount!r} is not a size; accepted: DEVICE=SIZE pairs like "
                             "'0=75GiB,cpu=200GiB'") from None
        if not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise ProbeError(f"bad max_memory {value!r}: {key!r} is not a device; accepted: GPU numbers, cpu, disk")
        out[int(key) if key.isdigit() else key] = amount
    return out


class _NoHubKernelHint(logging.Filter):
    """bitsandbytes >= 0.50 tries, at import on CPUs with AVX512-BF16, to fetch a 4-bit CPU kernel from the hub's
    kernels-community (the `kernels` package) and logs a warning when it cannot. Its own CPU kernel is used instead,
    the fetch would need the hub at run time (which this project never relies on), and the warning would turn every
    one-line error into two lines: drop just that record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


def quiet_bitsandbytes() -> None:
    """Install `_NoHubKernelHint` before bitsandbytes is first imported (idempotent)."""
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NoHubKernelHint) for f in log.filters):
        log.addFilter(_NoHubKernelHint())


def quantization_config(quantize: str | None, compute_dtype: str, cpu_offload: bool = False):
    """bitsandbytes' config; `cpu_offload` (8-bit): the modules a device map puts on the CPU or disk stay
    unquantized (llm_int8_enable_fp32_cpu_offload), which is what lets a quantized model spill past the GPUs."""
    if quantize is None:
        return None
    quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=cpu_offload)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def load_options(spec: ModelSpec, dtype: str | None = None, device_map=None, quantize: str | None = None,
                 max_memory=None, compute_dtype: str | None = None, gpus: int | None = None) -> dict:
    """The registry entry's loading options with command-line overrides, validated. `gpus` spreads the model
    over the first `gpus` CUDA devices (device map auto; each GPU's free memory less devices.HEADROOM, CPU beyond)."""
    load = spec.load
    if gpus is not None:
        device_map = device_map or "auto"
        max_memory = max_memory or machine_max_memory(gpus)
    dtype = dtype or spec.dtype
    quantize = quantize or load.get("quantize")
    device_map = device_map or load.get("device_map")
    compute_dtype = compute_dtype or load.get("bnb_4bit_compute_dtype") or (
        "bfloat16" if dtype == "float32" else dtype)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("quantization", quantize, QUANTIZE)
    _check_choice("compute dtype", compute_dtype, DTYPES)
    device_map = parse_device_map(device_map)
    arch_spec(spec.family)  # an unknown architecture fails here, before anything is downloaded
    return dict(dtype=dtype, quantize=quantize, device_map=device_map,
                max_memory=parse_max_memory(max_memory or load.get("max_memory")), compute_dtype=compute_dtype)
