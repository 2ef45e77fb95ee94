"""Memory planning from a model's config alone: weights, activations, device map and GPUs needed.

The model is built on the meta device (accelerate's empty-weight initialisation), quantized layers are swapped in
the way `from_pretrained` would (transformers' bitsandbytes quantizer), and sizes and placement come from the same
transformers/accelerate functions that `device_map="auto"` uses, so the plan is the map a real load would make.
Configs of every registry model ship in `configs/<name>.json`, so planning needs no hub.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ProbeError
from ..paths import ROOT
from . import custom  # noqa: F401  (registers this project's architectures)
from .devices import (CPU_SHARE, STRATEGIES, check_max_memory, default_device_map, gib, machine_max_memory,
                      machine_memory, size)
from .options import load_options, quantization_config
from .registry import ModelSpec

GiB = 2**30
NF4_BLOCK = 64  # bitsandbytes 4-bit: one fp32 absmax per block of 64 weights, on top of 0.5 byte per weight
CUDA_CONTEXT = 1 * GiB  # what a CUDA context and allocator slack take on each GPU before any tensor
MAX_GPUS = 64


def config_path(spec: ModelSpec) -> Path:
    return ROOT / "configs" / f"{spec.name}.json"


def model_config(spec: ModelSpec):
    """The transformers config of `spec`, from the shipped file, the random entry, a local folder or the hub."""
    from transformers import AutoConfig

    shipped = config_path(spec)
    if spec.source == "random":
        values = dict(spec.random)
        values.pop("seed", None)
        # the tiny tokenizer's vocabulary, whose <|endoftext|> (id 0) is bos, eos and pad (see loading.tiny_tokenizer)
        values = {"vocab_size": 1024, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, **values}
    elif shipped.exists():
        values = json.loads(shipped.read_text())
    elif spec.source == "local":
        return AutoConfig.from_pretrained(spec.path)
    else:
        try:
            return AutoConfig.from_pretrained(spec.repo, revision=spec.revision)
        except OSError as e:
            raise ProbeError(f"no config for {spec.name!r}: {shipped} is not shipped and the hub is unreachable "
                             f"({type(e).__name__}); accepted: a registry model with a file in configs/")
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    return build_config(values, spec.name)


def build_config(values: dict, name: str):
    """The transformers config of `values` (model_type included); a value of the wrong type or out of range (a word
    where a number goes) is a one-line error naming the field, from transformers' own checks of its config class."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (StrictDataclassError, ValueError, TypeError, KeyError) as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise ProbeError(f"model config of {name!r} cannot build a {model_type} config: {text[:300]}; accepted: "
                         f"the fields of transformers' {model_type} config, with their types") from None
    sizes = {k: v for k, v in values.items() if k in SIZES and isinstance(v, int) and v < 1}
    if sizes:
        key = sorted(sizes)[0]
        raise ProbeError(f"model config of {name!r}: {key} {sizes[key]}; accepted: a positive integer")
    return config


# the size fields of a config (layers, width, heads, vocabulary), which must be positive
SIZES = {"n_layer", "num_hidden_layers", "n_embd", "hidden_size", "n_head", "num_attention_heads", "vocab_size",
         "n_inner", "intermediate_size", "ffn_dim", "num_key_value_heads", "head_dim", "n_positions",
         "max_position_embeddings"}


def empty_model(config, dtype: torch.dtype, quantize: str | None, compute_dtype: str):
    """The model on the meta device, with bitsandbytes layers where `from_pretrained` would put them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer


    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    quantizer = None
    if quantize:
        quantizer = AutoHfQuantizer.from_config(quantization_config(quantize, compute_dtype), pre_quantized=False)
        quantizer.preprocess_model(model, device_map="auto")
    return model, quantizer


def check_quantizable(spec: ModelSpec, opts: dict) -> None:
    """Refuse, before loading, a quantized model that bitsandbytes would not quantize or could not run here.

    transformers swaps in bitsandbytes layers for `torch.nn.Linear` modules only; a family whose projections are
    other modules would load unquantized, silently. And bitsandbytes >= 0.50, on CPUs with AVX512-BF16, repacks
    each 4-bit weight at its first forward in blocks of 32 output features and asserts that they divide evenly; a
    model with another shape would die in that assertion, after loading. GPUs have no such rule, so the shapes
    are checked only where the model computes on the CPU."""
    if not opts["quantize"]:
        return
    if spec.family == "gpt2_value_residual" or (spec.random or {}).get("model_type") == "gpt2_value_residual":
        raise ProbeError(f"{spec.name} carries its value residual in each attention's c_attn, which bitsandbytes "
                         f"would replace by a plain quantized layer, dropping the path; accepted: no --quantize "
                         "for gpt2_value_residual")
    model, _ = empty_model(model_config(spec), getattr(torch, opts["compute_dtype"]), opts["quantize"],
                           opts["compute_dtype"])
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    if not layers:
        raise ProbeError(f"{spec.name} ({spec.family}) has no layer that bitsandbytes would quantize (transformers "
                         f"replaces torch.nn.Linear modules only), so --quantize {opts['quantize']} would load it "
                         "unquantized; accepted: no --quantize for this family")
    if opts["quantize"] != "4bit" or (torch.cuda.is_available() and opts["device_map"] not in (None, "cpu")):
        return
    from importlib.metadata import version

    import bitsandbytes.functional as bnbf

    if not hasattr(bnbf, "_convert_weight_packed_for_cpu") or not bnbf.has_avx512bf16():
        return
    block = inspect.signature(bnbf._convert_weight_packed_for_cpu).parameters["block_n"].default
    for name, module in layers:
        if module.out_features % block or module.in_features % 2:
            raise ProbeError(
                f"{spec.name} cannot run in 4-bit on this CPU: {name} maps {module.in_features} -> "
                f"{module.out_features} features, and bitsandbytes {version('bitsandbytes')} packs CPU 4-bit "
                f"weights in blocks of {block} output features (and an even number of inputs); accepted: "
                "--quantize 8bit, no --quantize, or a GPU")


def config_sizes(config) -> dict:
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ffn = (getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None)
           or getattr(config, "n_inner", None) or 4 * d)
    return dict(d=d, layers=config.num_hidden_layers, heads=heads, kv_dim=(getattr(config, "num_key_value_heads", None)
                or heads) * head_dim, ffn=ffn, vocab=config.vocab_size)


def activation_bytes(config, batch: int, seq: int, dtype_bytes: float) -> dict:
    """A rough upper estimate of what a probe's forward pass holds besides the weights.

    kept: every residual position of every layer (what the lens and readout may save), the KV cache of a transplant
    sweep, next-token logits in float32. transient: one block's working set (a few residual-sized tensors, the FFN
    hidden layer, eager attention scores and probabilities in float32)."""
    s = config_sizes(config)
    tokens = batch * seq
    kept = ((s["layers"] + 1) * tokens * s["d"] * dtype_bytes + 2 * s["layers"] * tokens * s["kv_dim"] * dtype_bytes
            + batch * s["vocab"] * 4)
    transient = (4 * tokens * s["d"] + 2 * tokens * s["ffn"]) * dtype_bytes + 2 * batch * s["heads"] * seq * seq * 4
    return {"kept": int(kept), "transient": int(transient), "total": int(kept + transient)}


@dataclass
class Plan:
    model: str
    dtype: str
    quantize: str | None
    params: int
    weight_bytes: int
    activation: dict
    gpu_bytes: int
    gpus_needed: int | None  # None: does not fit on MAX_GPUS GPUs of this size
    n_layers: int = 0
    device_map: dict = field(default_factory=dict)
    per_device: dict = field(default_factory=dict)  # device -> bytes of weights placed there

    @property
    def label(self) -> str:
        return self.quantize or self.dtype


def _quiet_accelerate():
    # accelerate warns once per requested GPU that is absent: planning for GPUs this machine lacks is the point
    for name in ("accelerate.utils.modeling", "accelerate", "transformers.integrations.accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _module_sizes(model, quantizer, quantize: str | None) -> dict:
    """Bytes per module (and "" for the whole model) as transformers counts them, plus NF4's absmax."""
    from transformers.integrations.accelerate import compute_module_sizes

    sizes = dict(compute_module_sizes(model, hf_quantizer=quantizer)[0])
    if quantize == "4bit":
        for name, p in model.named_parameters():
            if quantizer.param_needs_quantization(model, name):
                parts = name.split(".")
                for i in range(len(parts)):
                    sizes[".".join(parts[:i])] += p.numel() // NF4_BLOCK * 4
    return sizes


def _placement(model, quantizer, n_gpus: int, usable: int) -> dict:
    """The map `device_map="auto"` gives on `n_gpus` GPUs of `usable` bytes (no CPU): leftovers go to 'disk'."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    memory = {i: usable for i in range(n_gpus)}
    split = model._no_split_modules
    balanced = get_balanced_memory(model, max_memory=memory, no_split_module_classes=split, hf_quantizer=quantizer)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=split, hf_quantizer=quantizer)


def plan(spec: ModelSpec, dtype: str | None = None, quantize: str | None = None, compute_dtype: str | None = None,
         gpu_mem: str = "80GiB", batch: int = 8, seq: int = 64) -> Plan:
    from accelerate.utils import convert_file_size_to_int
    from transformers.integrations.accelerate import compute_module_sizes


    _quiet_accelerate()
    opts = load_options(spec, dtype=dtype, quantize=quantize, compute_dtype=compute_dtype)
    compute = opts["compute_dtype"] if opts["quantize"] else opts["dtype"]
    config = model_config(spec)
    model, quantizer = empty_model(config, getattr(torch, compute), opts["quantize"], opts["compute_dtype"])
    params = sum(p.numel() for p in model.parameters())
    sizes = _module_sizes(model, quantizer, opts["quantize"])
    weights = sizes[""]
    act = activation_bytes(config, batch, seq, torch.finfo(getattr(torch, compute)).bits / 8)
    try:
        gpu_bytes = convert_file_size_to_int(gpu_mem)
    except ValueError:
        raise ProbeError(f"bad --gpu-mem {gpu_mem!r}; accepted: a size like 80GiB or 24GB")
    usable = gpu_bytes - CUDA_CONTEXT - act["total"]
    # transformers places by its own sizes, which leave out NF4's absmax: shrink the room by the same ratio
    placed_usable = int(usable * compute_module_sizes(model, hf_quantizer=quantizer)[0][""] / weights)
    result = Plan(spec.name, opts["dtype"], opts["quantize"], params, int(weights), act, gpu_bytes, None,
                  config_sizes(config)["layers"])
    if usable <= 0:
        return result
    n = max(1, math.ceil(weights / usable))
    while n <= MAX_GPUS:
        device_map = _placement(model, quantizer, n, placed_usable)
        if all(isinstance(v, int) for v in device_map.values()):
            per_device: dict = {}
            for module, dev in device_map.items():
                per_device[dev] = per_device.get(dev, 0) + sizes.get(module, 0)  # tied: counted once
            result.gpus_needed, result.device_map, result.per_device = n, device_map, per_device
            break
        n += 1
    return result


def spread_map(model, quantizer, strategy: str, max_memory: dict) -> dict:
    """The map from_pretrained makes for `strategy` under `max_memory` (transformers' `_get_device_map`, without the
    quantizer's check that refuses CPU and disk entries)."""
    from transformers.integrations.accelerate import get_balanced_memory, get_max_memory, infer_auto_device_map

    split = model._no_split_modules
    if strategy == "sequential":
        memory = get_max_memory(dict(max_memory))
    else:
        memory = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=split,
                                     hf_quantizer=quantizer, low_zero=strategy == "balanced_low_0")
    if quantizer is not None:
        memory = quantizer.adjust_max_memory(memory)
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=split, hf_quantizer=quantizer)


def place(spec: ModelSpec, opts: dict) -> tuple[object, dict]:
    """Where a load of `spec` with `opts` (`load_options`') puts its weights, decided from its config before any
    weight loads: (the device map to record, from_pretrained's device_map, max_memory and quantization_config).

    The default and the max_memory rules are devices.py's. A quantized model that a spread map puts partly on the
    CPU or disk gets that map with bitsandbytes' CPU offload in 8-bit (those modules stay unquantized, in the
    compute dtype), and is refused in 4-bit."""
    quantize, max_memory, compute_dtype = opts["quantize"], opts["max_memory"], opts["compute_dtype"]

    @functools.cache
    def meta():  # the model on the meta device and its weight bytes, built only when a rule needs them
        model, quantizer = empty_model(model_config(spec), getattr(torch, compute_dtype if quantize else opts["dtype"]),
                                       quantize, compute_dtype)
        return model, quantizer, int(_module_sizes(model, quantizer, quantize)[""])

    device_map = opts["device_map"]
    if device_map is None:
        device_map = default_device_map(lambda: meta()[2], max_memory)
    if max_memory and not isinstance(device_map, dict):
        check_max_memory(device_map, max_memory, meta()[2])
    kwargs = {} if device_map is None else {"device_map": device_map}
    offload = False
    if isinstance(device_map, str) and device_map in STRATEGIES:
        kwargs["max_memory"] = max_memory or machine_max_memory()
        if quantize:
            model, quantizer, weights = meta()
            spread = spread_map(model, quantizer, device_map, kwargs["max_memory"])
            where = set(spread.values())
            if where != {"cpu"} and where & {"cpu", "disk"}:
                if quantize == "4bit":
                    room = sum(size(v) for k, v in kwargs["max_memory"].items() if isinstance(k, int))
                    raise ProbeError(
                        f"{spec.name} in 4bit does not fit on the GPUs ({gib(room)} for weights; it takes "
                        f"{gib(weights)}): device map {device_map} would put part of it on the CPU or disk, and this "
                        "project offloads quantized models in 8-bit only (bitsandbytes' llm_int8_enable_fp32_cpu_"
                        "offload, which keeps the offloaded modules unquantized); accepted: --quantize 8bit, more GPU "
                        "memory (--gpus N, --max-memory), or --device-map cpu")
                kwargs["device_map"], offload = spread, True
    if quantize:
        kwargs["quantization_config"] = quantization_config(quantize, compute_dtype, cpu_offload=offload)
    return device_map, kwargs


# Throughputs assumed for Slurm time limits: the low end of what a node delivers, so that limits err long (a unit
# killed at its limit loses only its unfinished batch, and a rerun resumes). A forward pass of a small batch reads
# every weight once, so it is bound by memory bandwidth until the batch's FLOPs take longer.
CHECKPOINT_READ = 200e6  # bytes/s of a 16-bit checkpoint read from a shared filesystem (and quantized, if asked)
THROUGHPUT = {"gpu": (1e12, 50e12), "cpu": (10e9, 100e9)}  # (bytes/s of weights read, FLOP/s)
TIME_LIMITS_H = (0.5, 1, 2, 4, 8, 16, 24, 48, 96)  # a few sizes, so that units group into few job arrays


def time_limit(p: Plan, passes: float, prompts: int, batch: int, tokens: int, gpu: bool) -> str:
    """A Slurm time limit for `prompts` prompts of about `tokens` tokens, in batches of `batch`, with `passes`
    forward passes per prompt: 10 minutes plus twice the estimated load and compute time, rounded up to one of
    TIME_LIMITS_H."""
    bandwidth, flops = THROUGHPUT["gpu" if gpu else "cpu"]
    load = 2 * p.params / CHECKPOINT_READ
    forward = max(p.weight_bytes / bandwidth, 2 * p.params * batch * tokens / flops)
    need = 600 + 2 * (load + passes * math.ceil(prompts / batch) * forward)
    hours = next((h for h in TIME_LIMITS_H if h * 3600 >= need), TIME_LIMITS_H[-1])
    return f"{int(hours) // 24}-{int(hours) % 24:02d}:{int(hours * 60) % 60:02d}:00"


def describe_map(device_map: dict, layers_path: str) -> dict:
    """{device: 'embeddings, blocks 0-13, ...'} with block ranges collapsed, for printing."""
    out: dict = {}
    prefix = layers_path + "."
    for module, dev in device_map.items():
        if module == "":
            out.setdefault(dev, []).append("the whole model")
        elif module.startswith(prefix) and module[len(prefix):].split(".")[0].isdigit():
            out.setdefault(dev, []).append(int(module[len(prefix):].split(".")[0]))
        else:
            out.setdefault(dev, []).append(module)
    text = {}
    for dev, parts in out.items():
        blocks = sorted({p for p in parts if isinstance(p, int)})
        names = [p for p in parts if not isinstance(p, int)]
        if blocks:
            names.append(f"blocks {blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else f"block {blocks[0]}")
        text[dev] = ", ".join(names)
    return text


def check_fits(spec: ModelSpec, opts: dict, gpus: int | None = None) -> Plan:
    """Refuse, before anything is downloaded, a model whose weights exceed this machine's GPUs and CPU memory
    together, saying what it needs (GPUs of this machine's size, or of 80 GiB, at each precision)."""
    gpu_sizes, cpu = machine_memory(gpus)
    gpu_mem = f"{min(gpu_sizes) // GiB}GiB" if gpu_sizes else "80GiB"
    kw = dict(dtype=opts["dtype"], compute_dtype=opts["compute_dtype"], gpu_mem=gpu_mem)
    chosen = plan(spec, quantize=opts["quantize"], **kw)
    if chosen.weight_bytes <= sum(gpu_sizes) + CPU_SHARE * cpu:
        return chosen
    options = [chosen] + [plan(spec, quantize=q, **kw) for q in (None, "8bit", "4bit") if q != opts["quantize"]]
    needs = ", ".join(f"{p.gpus_needed or f'more than {MAX_GPUS}'} in {p.label} ({gib(p.weight_bytes)})"
                      for p in options)
    raise ProbeError(f"{spec.name} does not fit here: in {chosen.label} its weights take {gib(chosen.weight_bytes)}, "
                     f"and this machine has {len(gpu_sizes)} GPU(s) ({gib(sum(gpu_sizes))}) and {gib(cpu)} of free "
                     f"CPU memory; it needs GPUs of {gpu_mem}: {needs}; nothing was downloaded; "
                     f"accepted: a machine with that much, or see `probe plan --model {spec.name}`")
