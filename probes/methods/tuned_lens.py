"""The tuned lens (Belrose et al. 2023; the `tuned-lens` package, github AlignmentResearch/tuned-lens, 0.2.0): per
residual index i < L an affine translator, h -> h + A_i h + b_i, before the logit lens' final norm and unembedding
(`Arch.logits`). A and b start at zero, so an untrained lens is the logit lens exactly; index L (the last block's
output, whose lens is the model's logits) has none, as in the package. `--lens tuned` decodes through it in every
read-out that decodes a residual vector or an FFN update (logit-lens, ffn-readout, ffn-transplant's source search):
`resolve_lens` loads it once per run, `translated` is what each probe decodes (module docstrings say what where).

Training follows the package's train_loop.py with its defaults: the model frozen, each translator trained to minimise
KL(final distribution || lens distribution) at every position of text chunks (the current position's distribution:
the package's default for its KL loss), each layer's loss backpropagated on its own; SGD with Nesterov momentum 0.9,
learning rate 1.0 x (1 - 0.9), weight decay 1e-3, decayed linearly to zero over the steps without warmup; gradients
clipped to norm 1 before each step; 250 steps; chunks of 2048 tokens (fewer where the model's context is shorter),
one per forward, accumulated over a step; data order seeded (42). Where it differs:
- the budget: `tokens` (default 2^20) against the package's 250 steps x 2^18 tokens (65.5M), so that it runs on a
  CPU: the 250 steps share the budget in whole chunks (fewer steps when it holds fewer than 250 chunks);
- float32 throughout (the package autocasts to bfloat16);
- the data: the corpus' documents in a seeded order (the package shuffles chunks of the whole tokenized corpus),
  joined by the EOS token, each chunk starting as a prompt does here (with the tokenizer's own prefix, e.g. <bos>);
- the figures: meta.json keeps per layer the KL of the first step (identity translators: the logit lens') and of the
  last, both measured before their step's update on tokens not yet trained on (each chunk is read once).

Saved in the package's format, config.json (its TunedLensConfig) and params.pt (the translators' state dict:
"i.weight", "i.bias"), so that `tuned_lens.nn.lenses.TunedLens.from_model_and_pretrained(model, folder)` loads ours
and `load_lens` the package's; our meta.json beside it names the model and the training. Lenses are cached under
$PROBE_CACHE/tuned-lens/, one per model identity (source, revision, digest of what its name leaves out).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import nnsight
import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ProbeError
from ..models.loading import model_digest
from ..paths import cache_root
from ..runs.rundir import safe_name
from ..tasks.corpus import documents
from .readout import LOGITS_CHUNK

TOKENS, STEPS, SEQ_LEN, SEED = 2**20, 250, 2048, 42
MOMENTUM, LR_SCALE, WEIGHT_DECAY, CLIP = 0.9, 1.0, 1e-3, 1.0  # the package's SGD defaults
CORPUS = "stdlib-english"
FILES = ("config.json", "params.pt")  # the package's
FOLDER = "a lens folder in the tuned-lens package's format (config.json and params.pt)"


class TunedLens(torch.nn.Module):
    """One translator per residual index 0..L-1 (`layer_translators`, as the package names them), float32."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        d, bias = config["d_model"], config.get("bias", True)
        self.layer_translators = torch.nn.ModuleList(
            torch.nn.Linear(d, d, bias=bias) for _ in range(config["num_hidden_layers"]))
        for p in self.parameters():
            torch.nn.init.zeros_(p)

    def transform(self, h: torch.Tensor, index: int, linear: bool = False) -> torch.Tensor:
        """Residual vectors (..., d) at residual index `index` -> h + A h + b (index L: h), in float32. `linear`:
        h + A h, the translator without its bias, for a difference of two residuals at that index (an update):
        T(x + u) - T(x) = u + A u."""
        x = h.to(torch.float32)
        if index == len(self.layer_translators):
            return x
        translator = self.layer_translators[index]
        x = x.to(translator.weight.device)
        return x + (torch.nn.functional.linear(x, translator.weight) if linear else translator(x))

    def translate(self, hidden: torch.Tensor, first: int = 0, linear: bool = False) -> torch.Tensor:
        """(batch, n, ..., d) vectors at residual indices first .. first + n - 1 -> each through its translator."""
        return torch.stack([self.transform(hidden[:, i], first + i, linear) for i in range(hidden.shape[1])], dim=1)


def translated(lens: TunedLens | None, hidden: torch.Tensor, first: int = 0, update: bool = False) -> torch.Tensor:
    """What a read-out decodes through final norm and unembedding (readout.lens_tensors) for vectors (batch, n, ...,
    d) at residual indices first .. first + n - 1: under the logit lens (None) the vectors themselves; under a tuned
    lens residuals through their translators, and updates (`update`: differences of residuals at those indices)
    through the translators' linear parts, so that translated residuals and updates add up as the vectors do."""
    return hidden if lens is None else lens.translate(hidden, first, linear=update)


def unembed_hash(arch) -> str:
    """The package's `Unembed.unembedding_hash`: sha256 of numpy's one-decimal summary of the unembedding matrix."""
    weight = arch.hf.get_output_embeddings().weight.detach().cpu().float().numpy()
    return hashlib.sha256(np.array_str(weight, precision=1).encode()).hexdigest()


def model_identity(spec) -> dict:
    """What a lens is cached and checked by: the model's source, revision and digest (models/loading.py), and a key."""
    identity = {"source": spec.where(), "revision": spec.revision, "digest": model_digest(spec)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return {"name": spec.name, **identity, "key": key}


def cache_folder(spec) -> Path:
    return cache_root() / "tuned-lens" / f"{safe_name(spec.name)}-{model_identity(spec)['key']}"


def lens_folder(value: str, spec) -> Path:
    """The folder `--lens tuned` (the model's cached lens) or `tuned:PATH` names, refused in one line when it does not
    hold a lens: checked before the model loads."""
    folder = cache_folder(spec) if value == "tuned" else Path(value.removeprefix("tuned:")).expanduser()
    if not all((folder / f).is_file() for f in FILES):
        if value == "tuned":
            raise ProbeError(f"no tuned lens for {spec.name} in the cache ({folder}); accepted: one trained first "
                             f"(probe lens train --model {spec.name}), --lens tuned:PATH or --lens logit")
        raise ProbeError(f"--lens {value}: {str(folder)!r} holds no config.json and params.pt; accepted: {FOLDER}")
    return folder


def file_digest(path: Path) -> str:
    """The first 16 hex digits of a file's sha256: which lens a run used, if its folder is trained again."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def lens_identity(value: str | None, spec) -> dict | None:
    """What a run's identity keeps of `--lens` beside the option's text (runs/plan.py): for a tuned lens, the digest
    of its translators (the cached lens' folder is the model identity's already), checked before the model loads;
    None for the logit lens."""
    if value in (None, "logit"):
        return None
    return {"params_sha256": file_digest(lens_folder(value, spec) / "params.pt")}


def resolve_lens(loaded, value: str | None) -> tuple[TunedLens | None, dict]:
    """`--lens` for a run, once, before its first batch: None for the logit lens, or the tuned lens loaded and checked
    against the model (`load_lens`); and what meta.json keeps of it (its folder, digest and training)."""
    if value in (None, "logit"):
        return None, {}
    folder = lens_folder(value, loaded.spec)
    lens = load_lens(folder, loaded)
    trained = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return lens, {"tuned_lens": {"folder": str(folder), "params_sha256": file_digest(folder / "params.pt"),
                                 **{k: trained[k] for k in ("corpus", "tokens", "steps") if k in trained}}}


def dimensions(arch) -> dict:
    return {"d_model": int(arch.config.hidden_size), "num_hidden_layers": arch.n_layers}


def package_config(loaded) -> dict:
    """The package's TunedLensConfig of a lens for `loaded`."""
    spec, arch = loaded.spec, loaded.arch
    return {"base_model_name_or_path": spec.repo or spec.name, **dimensions(arch), "bias": True,
            "base_model_revision": spec.revision if spec.source == "hub" else None,
            "unembed_hash": unembed_hash(arch), "lens_type": "linear_tuned_lens"}


def load_lens(folder: Path, loaded) -> TunedLens:
    """A lens saved by `train_lens` or by the tuned-lens package, on the unembedding's device; refused in one line on
    a model it was not trained on: ours by the model identity in its meta.json, the package's by its layers, width
    and unembedding hash."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else None
    except ValueError as e:
        raise ProbeError(f"tuned lens {folder}: unreadable JSON ({e}); accepted: {FOLDER}") from None
    if config.get("lens_type", "linear_tuned_lens") != "linear_tuned_lens":
        raise ProbeError(f"tuned lens {folder} is a {config['lens_type']}; accepted: a linear_tuned_lens")
    spec, arch = loaded.spec, loaded.arch
    same = all(config.get(k) == v for k, v in dimensions(arch).items())
    if meta is not None:
        same = same and meta.get("model", {}).get("key") == model_identity(spec)["key"]
    elif config.get("unembed_hash"):
        same = same and config["unembed_hash"] == unembed_hash(arch)
    if not same:
        trained = meta["model"]["name"] if meta else config.get("base_model_name_or_path")
        raise ProbeError(f"the tuned lens in {folder} was trained on {trained}, not {spec.name}; accepted: a lens "
                         f"trained on {spec.name} (probe lens train --model {spec.name}) or --lens logit")
    lens = TunedLens(config)
    try:
        lens.layer_translators.load_state_dict(torch.load(folder / "params.pt", map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, KeyError) as e:  # missing or misshapen tensors; a file that is not a state dict
        raise ProbeError(f"tuned lens {folder}: params.pt does not hold its {config['num_hidden_layers']} "
                         f"translators ({str(e).splitlines()[0][:200]}); accepted: {FOLDER}") from None
    return lens.requires_grad_(False).to(arch.unembed_device)


def check_output(folder: Path) -> Path:
    """`folder` as a lens folder to write: a new one, or a lens folder (which it replaces); anything else refused."""
    folder = Path(folder)
    if folder.exists() and not (folder.is_dir() and set(os.listdir(folder)) <= {*FILES, "meta.json"}):
        raise ProbeError(f"{str(folder)!r} exists and is not a tuned lens folder; accepted: a new folder, or a lens "
                         "folder to replace")
    return folder


def save_lens(lens: TunedLens, folder: Path, meta: dict) -> None:
    """config.json and params.pt as the package writes them, and meta.json, into `folder` (`check_output`), written
    beside it first and renamed into place."""
    folder = check_output(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        torch.save({k: v.cpu() for k, v in lens.layer_translators.state_dict().items()}, tmp / "params.pt")
        (tmp / "config.json").write_text(json.dumps(lens.config))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def chunks(tokenizer, corpus: str, count: int, seq_len: int) -> torch.Tensor:
    """(count, seq_len) token ids: the corpus' documents in a seeded order, joined by EOS, cut into chunks that each
    start with the tokenizer's own prefix; refused in one line when the corpus is too short."""
    docs = documents(corpus)
    prefix = tokenizer("").input_ids
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    body, out, buffer = seq_len - len(prefix), [], []
    for j in random.Random(SEED).sample(range(len(docs)), len(docs)):
        buffer += sep + tokenizer(docs[j], add_special_tokens=False, verbose=False).input_ids
        while len(buffer) >= body and len(out) < count:
            out.append(prefix + buffer[:body])
            buffer = buffer[body:]
        if len(out) == count:
            return torch.tensor(out)
    raise ProbeError(f"corpus {corpus} gives {len(out)} chunks of {seq_len} tokens, fewer than the {count} --tokens "
                     f"asks for; accepted: --tokens {len(out) * seq_len} or less, or a larger --corpus")


def chunk_kl(loaded, lens: TunedLens, ids: torch.Tensor, scale: float) -> torch.Tensor:
    """One chunk (1, T): each translator's gradient gains the KL of its lens from the model's distribution, summed
    over positions and divided by `scale`; returns the summed KL per layer (L,)."""
    arch = loaded.arch
    with torch.no_grad(), loaded.trace(ids):
        resid = nnsight.save([arch.resid(i)[0].to(arch.unembed_device) for i in range(arch.n_layers)])
        logits = loaded.model.output.logits[0].save()
    target = logits.float().log_softmax(-1)
    rows = max(1, LOGITS_CHUNK // (4 * arch.vocab_size))
    total = torch.zeros(arch.n_layers, dtype=torch.float64)
    for i, h in enumerate(resid):
        for start in range(0, len(h), rows):
            p = target[start:start + rows]
            q = arch.logits(lens.transform(h[start:start + rows], i)).log_softmax(-1)
            kl = (p.exp() * (p - q)).sum()
            (kl / scale).backward()
            total[i] += kl.item()
    return total


def train_lens(loaded, tokens: int = TOKENS, corpus: str = CORPUS, output: str | Path | None = None,
               progress: bool = False, seq_len: int | None = None) -> Path:
    """Train a tuned lens for `loaded` (module docstring) on `tokens` tokens of `corpus` (tasks/corpus.py's names),
    save it into `output` (default: the model's cache folder, which `--lens tuned` reads) and return the folder."""
    if loaded.remote:
        raise ProbeError(f"a tuned lens trains on a local model, and {loaded.spec.name} is remote; accepted: the "
                         "model loaded here")
    arch = loaded.arch
    folder = check_output(output if output is not None else cache_folder(loaded.spec))
    seq_len = seq_len or min(SEQ_LEN, arch.context_length or SEQ_LEN)
    if tokens < seq_len:
        raise ProbeError(f"--tokens {tokens} is less than one chunk of {seq_len} tokens; accepted: {seq_len} or more")
    steps = min(STEPS, tokens // seq_len)
    per_step = tokens // seq_len // steps
    data = chunks(loaded.tokenizer, corpus, steps * per_step, seq_len)
    lens = TunedLens(package_config(loaded)).to(arch.unembed_device)
    params = list(lens.parameters())
    opt = torch.optim.SGD(params, lr=LR_SCALE * (1 - MOMENTUM), momentum=MOMENTUM, nesterov=True,
                          weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, (steps - step) / steps))
    start, first = time.perf_counter(), None
    with tqdm(range(steps), desc=f"tuned lens {loaded.spec.name}", unit="step", disable=not progress) as bar:
        for step in bar:
            kl = sum(chunk_kl(loaded, lens, ids[None], per_step * seq_len)
                     for ids in data[step * per_step:(step + 1) * per_step]) / (per_step * seq_len)
            torch.nn.utils.clip_grad_norm_(params, CLIP)
            opt.step()
            opt.zero_grad()
            schedule.step()
            first = kl if first is None else first
            bar.set_postfix(kl=f"{kl.mean():.3f}")
    meta = {"model": model_identity(loaded.spec), "dtype": loaded.dtype, "quantize": loaded.quantize,
            "corpus": corpus, "tokens": steps * per_step * seq_len, "tokens_asked": tokens, "seq_len": seq_len,
            "steps": steps, "chunks_per_step": per_step, "seed": SEED,
            "optimizer": {"name": "SGD", "nesterov": True, "lr": LR_SCALE * (1 - MOMENTUM), "momentum": MOMENTUM,
                          "weight_decay": WEIGHT_DECAY, "schedule": "linear to 0, no warmup", "clip_grad_norm": CLIP},
            "kl_first_step": [round(float(x), 6) for x in first], "kl_final": [round(float(x), 6) for x in kl],
            "seconds": round(time.perf_counter() - start, 2)}
    save_lens(lens, folder, meta)
    return folder
