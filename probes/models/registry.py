"""The model registry (`models.yaml`) and how a `--model` value becomes a `ModelSpec`.

A `--model` value is a registry name, a local folder holding a Hugging Face checkpoint, or a JSON/YAML file with
a model config (a tiny random model). Entries are validated when the registry is read, so a malformed file fails
before anything is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeError, choice_error, read_yaml
from ..paths import ROOT, runs_root

DTYPES = ("float32", "float16", "bfloat16")
QUANTIZE = ("8bit", "4bit")
SOURCES = ("hub", "gguf", "local", "random")
PICKLES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}  # torch.save'd weights: unpickling them can run code
_ENTRY_KEYS = {"repo", "revision", "family", "params", "dtype", "gguf", "path", "random", "load", "notes"}
_LOAD_KEYS = {"device_map", "max_memory", "quantize", "bnb_4bit_compute_dtype", "trust_remote_code",
              "use_safetensors"}


def registry_path() -> Path:
    return Path(os.environ.get("PROBE_REGISTRY", ROOT / "models.yaml"))


@dataclass
class ModelSpec:
    name: str
    source: str  # one of SOURCES
    family: str
    params: int | None = None
    repo: str | None = None
    revision: str = "main"
    dtype: str = "float32"
    gguf: dict | None = None  # {package, file} or {package, assemble: true}
    path: str | None = None  # local folder
    random: dict | None = None  # config kwargs, `model_type` required
    load: dict = field(default_factory=dict)
    notes: str = ""
    training: dict | None = None  # a trained run's weights: {run, path, step, final}; see trained_checkpoint

    @property
    def reads_vectors(self) -> bool:
        """A trained in-context classifier: it takes `inputs_embeds`, not text."""
        return (self.training or {}).get("inputs") == "vectors"

    @property
    def pinned(self) -> bool:
        return bool(re.fullmatch(r"[0-9a-f]{40}", self.revision or ""))

    def where(self) -> str:
        if self.source == "hub":
            return f"hub:{self.repo}@{self.revision[:10]}"
        if self.source == "gguf":
            return f"gguf:{self.gguf['package']}"
        if self.source == "local":
            return f"local:{self.path}"
        return f"random:{self.random['model_type']}"

    def available(self) -> bool:
        """Loadable on this machine without a network (hub entries: only if already in the HF cache)."""
        if self.source == "gguf":
            return importlib.util.find_spec(self.gguf["package"]) is not None
        if self.source == "local":
            return Path(self.path).is_dir()
        if self.source == "random":
            return True
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(self.repo, "config.json", revision=self.revision)
        return isinstance(hit, str)


def _parse_params(value, where: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"([0-9.]+)\s*([KMBT]?)", str(value).strip(), re.I)
    if not m:
        raise ProbeError(f"{where}: bad params {value!r}; accepted: an integer or a number with K, M, B or T")
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def parse_entry(name: str, entry, where: str) -> ModelSpec:
    """Validate one registry entry (a mapping) and build its spec; errors name the entry and the field."""
    if not isinstance(entry, dict):
        raise ProbeError(f"{where}: entry {name!r} must be a mapping, got {type(entry).__name__}")
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise ProbeError(f"{where}: entry {name!r} has unknown field(s) {', '.join(sorted(unknown))}; "
                         f"accepted: {', '.join(sorted(_ENTRY_KEYS))}")
    kinds = [k for k in ("gguf", "path", "random") if k in entry]
    if len(kinds) > 1:
        raise ProbeError(f"{where}: entry {name!r} names several sources ({', '.join(kinds)}); give one")
    source = {"gguf": "gguf", "path": "local", "random": "random"}[kinds[0]] if kinds else "hub"
    if source == "hub" and not entry.get("repo"):
        raise ProbeError(f"{where}: entry {name!r} needs 'repo' (a Hugging Face repo id) or one of gguf, path, random")
    if source == "random" and not (isinstance(entry["random"], dict) and "model_type" in entry["random"]):
        raise ProbeError(f"{where}: entry {name!r}: 'random' must be a mapping of config values with a model_type")
    if source == "gguf" and not (isinstance(entry["gguf"], dict) and "package" in entry["gguf"]):
        raise ProbeError(f"{where}: entry {name!r}: 'gguf' must be a mapping with 'package' and 'file' or 'assemble'")
    dtype = entry.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ProbeError(f"{where}: entry {name!r} has dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    load = entry.get("load") or {}
    if not isinstance(load, dict) or set(load) - _LOAD_KEYS:
        bad = sorted(set(load) - _LOAD_KEYS) if isinstance(load, dict) else load
        raise ProbeError(f"{where}: entry {name!r} has bad load option(s) {bad}; accepted: {', '.join(sorted(_LOAD_KEYS))}")
    if load.get("quantize") not in (None,) + QUANTIZE:
        raise ProbeError(f"{where}: entry {name!r} has quantize {load['quantize']!r}; accepted: {', '.join(QUANTIZE)}")
    family = entry.get("family") or (entry["random"]["model_type"] if source == "random" else None)
    if not family:
        raise ProbeError(f"{where}: entry {name!r} needs 'family'")
    return ModelSpec(name=name, source=source, family=family, params=_parse_params(entry.get("params"), where),
                     repo=entry.get("repo"), revision=str(entry.get("revision", "main")), dtype=dtype,
                     gguf=entry.get("gguf"), path=entry.get("path"), random=entry.get("random"), load=load,
                     notes=entry.get("notes", ""))


def load_registry(path: Path | None = None) -> dict[str, ModelSpec]:
    path = Path(path or registry_path())
    data = read_yaml(path, "model registry", "; set PROBE_REGISTRY or run from the repository")
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ProbeError(f"malformed model registry {str(path)!r}: expected a top-level 'models:' mapping")
    return {name: parse_entry(name, entry, str(path)) for name, entry in data["models"].items()}


def trained_checkpoint(folder: Path) -> dict | None:
    """If `folder` is a run of `probe train` (its final weights) or one of its `checkpoint-<step>` folders:
    {run: '<config name>-<run folder>', config: its name, path: the run folder, step, final: whether these are the final weights},
    else None. Its model name is the run's, with '@<step>' for a checkpoint."""
    folder = Path(folder).resolve()
    run = folder.parent if re.fullmatch(r"checkpoint-\d+", folder.name) else folder
    try:
        meta = json.loads((run / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("kind") != "training":
        return None
    if run == folder:
        if meta.get("status") != "complete":
            raise ProbeError(f"model folder {str(folder)!r} is a training run that has not finished; accepted: a "
                             "finished run, or one of its checkpoint-<step> folders")
        step = int(meta["steps"])
    else:
        step = int(folder.name.split("-")[1])
    vectors = meta["config"].get("task", {}).get("generator") == "icl"  # reads vectors, not text
    return {"run": f"{meta['config']['name']}-{run.name}", "config": meta["config"]["name"], "path": str(run),
            "step": step, "final": run == folder, **({"inputs": "vectors"} if vectors else {})}


def trained_runs(root: Path | None = None) -> list[dict]:
    """Finished training runs under `root` (default `runs_root()`): {path, name, architecture, params, steps}."""
    found = []
    for meta_path in sorted(Path(root or runs_root()).rglob("meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and meta.get("kind") == "training" and meta.get("status") == "complete":
            found.append({"path": str(meta_path.parent), "name": meta["config"]["name"],
                          "architecture": meta["config"]["model"]["architecture"], "params": meta.get("params"),
                          "steps": meta.get("steps")})
    return found


HUB_ID = re.compile(r"hf:([A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@([\w][\w./-]{0,127}))?")


def hub_model(value: str) -> ModelSpec:
    """`hf:ORG/NAME[@REVISION]`: any hub model of a supported family, without a registry entry (as lm-eval's
    `pretrained=ORG/NAME,revision=...`). Its config is read (downloaded if need be: a few kB, never weights) for the
    family and dtype; planning then checks the weights against this machine before anything else is fetched."""
    from .arch import ARCHITECTURES

    m = HUB_ID.fullmatch(value)
    if not m or ".." in value:
        raise ProbeError(f"bad hub model {value!r}; accepted: hf:ORG/NAME or hf:ORG/NAME@REVISION (a branch, tag or "
                         "commit), e.g. hf:openai-community/gpt2@main")
    repo, revision = m.group(1), m.group(2) or "main"
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:  # the cached config first: no network round trip (and no retries) for a model fetched before
        path = try_to_load_from_cache(repo, "config.json", revision=revision)
        path = path if isinstance(path, str) else hf_hub_download(repo, "config.json", revision=revision)
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # the hub's errors (not found, offline, gated) are OSErrors
        raise ProbeError(f"hub model {repo!r} at {revision!r}: no config.json in the local Hugging Face cache and "
                         f"the hub cannot give one ({type(e).__name__}); accepted: a public repo id and revision, "
                         f"fetched first where there is a network (huggingface-cli download {repo} --revision "
                         f"{revision})") from None
    family = config.get("model_type") if isinstance(config, dict) else None
    if family not in ARCHITECTURES:
        raise ProbeError(f"hub model {repo!r} is a {family!r} model, not a supported family; accepted: "
                         + ", ".join(sorted(ARCHITECTURES)))
    dtype = config.get("dtype") or config.get("torch_dtype")
    return ModelSpec(name=repo + (f"@{revision}" if m.group(2) else ""), source="hub", family=family, repo=repo,
                     revision=revision, dtype=dtype if dtype in DTYPES else "float32")


def resolve_model(value: str, registry: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """A registry name, `hf:ORG/NAME[@REVISION]`, a local checkpoint folder, or a config file (JSON/YAML) for a
    random model."""
    registry = load_registry() if registry is None else registry
    if value in registry:
        return registry[value]
    if value.startswith("hf:"):
        return hub_model(value)
    p = Path(value)
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.exists():
            raise ProbeError(f"model folder {value!r} has no config.json; accepted: a Hugging Face checkpoint folder")
        try:
            family = json.loads(cfg.read_text()).get("model_type", "unknown")
        except (ValueError, AttributeError) as e:
            raise ProbeError(f"model folder {value!r}: config.json is not a transformers config ({type(e).__name__}); "
                             "accepted: a checkpoint folder saved with save_pretrained") from None
        pickled = sorted(f.name for f in p.iterdir() if f.suffix in PICKLES)
        if pickled and not any(p.glob("*.safetensors")):
            raise ProbeError(f"model folder {value!r} holds its weights as a pickle ({pickled[0]}), which can run code "
                             "when loaded, so it is not loaded; accepted: a folder with safetensors weights (convert it "
                             "where you trust it: model.save_pretrained(folder, safe_serialization=True))")
        trained = trained_checkpoint(p)
        name = (trained["run"] + ("" if trained["final"] else f"@{trained['step']}")) if trained else p.resolve().name
        return ModelSpec(name=name, source="local", family=family, path=str(p.resolve()), training=trained)
    if p.is_file() and p.suffix in (".json", ".yaml", ".yml"):
        cfg = read_yaml(p, "model config")  # YAML is a superset of JSON
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise ProbeError(f"model config {value!r} must be a mapping with a model_type")
        return parse_entry(p.stem, {"random": cfg}, value)
    raise choice_error("model", value, list(registry) + ["<checkpoint folder>", "<config .json/.yaml>",
                                                        "hf:<ORG/NAME>[@REVISION]"])
