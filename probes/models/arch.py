"""Uniform access to the residual stream, attention and FFN updates, final norm and unembedding.

A small declarative table per architecture (in the spirit of TransformerLens' `component_mapping`) over the
Hugging Face module tree. Every entry is proven by two identities, tested for every family on tiny random models:

    block_output(i) == block_input(i) + attn_update(i) + ffn_update(i)
    decode(block_output(L - 1)) == the model's own logits

Where a family's `mlp` module is not the FFN update (BLOOM adds the residual inside it, Gemma 2/3 normalise after
it, OPT has none, Falcon edits it in place), the table points at the module that is; see
shared/notes/architectures.md.

Layer numbering used by every probe: residual index 0 is the embedding output (the input of block 0) and index
i >= 1 is the output of block i - 1, so a model with L blocks has L + 1 residual positions and index L is the last.
FFN and attention updates are indexed by block, 0..L-1; the FFN of block i moves residual i to residual i + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ProbeError
from .devices import execution_device, first_weight


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # path of the ModuleList of blocks, from the model root
    final_norm: str | None  # final norm applied before the unembedding (None: post-norm model without one)
    unembed: str
    attn: str  # module under a block whose output (first element if a tuple) is the attention update
    ffn: str  # module under a block whose output is the FFN update
    ffn_in: str = "mlp"  # module under a block whose first input is the FFN's (normalised) input
    attn_weights: str = ""  # module under a block whose output[1] is the attention probabilities (eager)
    pre_unembed: str | None = None  # projection between final norm and unembedding (OPT-350m's project_out)
    ffn_flat: bool = False  # the FFN module works on (batch*seq, d) (OPT)
    ffn_inplace: bool = False  # the FFN output is edited in place later in the block (Falcon): clone on read
    attn_out: str = ""  # module under a block whose input is every head's output side by side (the output projection)

    @property
    def attn_probs_module(self) -> str:
        return self.attn_weights or self.attn


_DECODER = dict(layers="model.layers", final_norm="model.norm", unembed="lm_head", attn="self_attn", ffn="mlp",
                attn_out="self_attn.o_proj")
_GEMMA_POSTNORM = dict(_DECODER, attn="post_attention_layernorm", ffn="post_feedforward_layernorm",
                       attn_weights="self_attn")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", attn="attn", ffn="mlp", attn_out="attn.c_proj"),
    # GPT-2 with a residual path between heads' values (models/custom.py): GPT-2's modules
    "gpt2_value_residual": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", attn="attn", ffn="mlp",
                                    attn_out="attn.c_proj"),
    "gptj": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", attn="attn", ffn="mlp", attn_out="attn.out_proj"),
    "bloom": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", attn="self_attention.dense",
                      ffn="mlp.dense_4h_to_h", attn_weights="self_attention", attn_out="self_attention.dense"),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", "lm_head", attn="attention", ffn="mlp",
                         attn_out="attention.dense"),
    "opt": ArchSpec("model.decoder.layers", "model.decoder.final_layer_norm", "lm_head", attn="self_attn",
                    ffn="fc2", ffn_in="fc1", pre_unembed="model.decoder.project_out", ffn_flat=True,
                    attn_out="self_attn.out_proj"),
    "llama": ArchSpec(**_DECODER),
    "mistral": ArchSpec(**_DECODER),
    "qwen2": ArchSpec(**_DECODER),
    "qwen3": ArchSpec(**_DECODER),
    "gemma": ArchSpec(**_DECODER),
    "gemma2": ArchSpec(**_GEMMA_POSTNORM),
    "gemma3_text": ArchSpec(**_GEMMA_POSTNORM),
    "falcon": ArchSpec("transformer.h", "transformer.ln_f", "lm_head", attn="self_attention", ffn="mlp",
                       ffn_inplace=True, attn_out="self_attention.dense"),
    # this project's trained decoder (models/custom.py): norm, FFN and residual each optional
    "probe_transformer": ArchSpec("model.layers", "model.norm", "lm_head", attn="attn", ffn="mlp", ffn_in="mlp",
                                  attn_out="attn.out"),
}


def arch_spec(model_type: str) -> ArchSpec:
    if model_type not in ARCHITECTURES:
        raise ProbeError(f"unknown architecture {model_type!r}; accepted: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def _get(root, path: str | None):
    """Follow a dotted path of attributes; None where the path or any step is missing/None."""
    if not path:
        return None
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first(x):
    return x[0] if isinstance(x, tuple) else x


class Arch:
    """An nnsight model seen through its architecture's table.

    Methods returning activations (`resid`, `attn_update`, `ffn_update`) must be called inside a trace, in
    forward order; `decode` is plain torch on the real modules and can be called anywhere.
    """

    def __init__(self, model):
        self.model = model  # nnsight TransformersModel
        self.hf = model._module
        self.config = self.hf.config
        self.model_type = self.config.model_type
        self.spec = arch_spec(self.model_type)
        self.n_layers = len(_get(self.hf, self.spec.layers))
        # parts a trained architecture may lack (models/custom.py); every pretrained family has both
        self.has_ffn = _get(_get(self.hf, self.spec.layers)[0], self.spec.ffn) is not None
        self.residual = bool(getattr(self.config, "residual", True))
        # whether a block computes from its input alone; the value residual (models/custom.py) hands a layer's raw
        # projections to later layers, so a forward cannot start part-way (activation patching skips blocks)
        self.independent_layers = all(getattr(self.config, f"{p}_residual", "none") == "none"
                                      for p in ("query", "key", "value"))
        self.n_params = sum(p.numel() for p in self.hf.parameters())  # packed, for bitsandbytes weights
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self._norm = _get(self.hf, self.spec.final_norm)
        self._pre_unembed = _get(self.hf, self.spec.pre_unembed)
        self._unembed = _get(self.hf, self.spec.unembed)
        self.vocab_size = self._unembed.weight.shape[0]
        self.n_heads = int(next(getattr(self.config, k) for k in ("num_attention_heads", "n_head", "num_heads")
                                if getattr(self.config, k, None)))

    @property
    def context_length(self) -> int | None:
        """The most positions the model reads (None: no limit its config states)."""
        for key in ("max_position_embeddings", "n_positions", "seq_length"):
            if getattr(self.config, key, None):
                return int(getattr(self.config, key))
        return None

    # --- inside a trace -------------------------------------------------------------------------------------
    def block(self, i: int):
        return _get(self.model, self.spec.layers)[i]

    def block_input(self, i: int):
        return self.block(i).input

    def block_output(self, i: int):
        return _first(self.block(i).output)

    def resid(self, index: int):
        """Residual stream at residual index `index` (0 = embeddings, i = output of block i-1)."""
        return self.block_input(0) if index == 0 else self.block_output(index - 1)

    def attn_update(self, i: int):
        return _first(_get(self.block(i), self.spec.attn).output)

    def heads_input(self, i: int):
        """Every head's output of block i side by side, (batch, seq, heads x head_dim), as the output projection
        reads it: head h is the h-th slice. The live tensor: write into a slice to change one head."""
        return _get(self.block(i), self.spec.attn_out).input

    def set_heads_input(self, i: int, value) -> None:
        """Replace what the output projection of block i reads (out of place: autograd may hold the tensor)."""
        _get(self.block(i), self.spec.attn_out).input = value

    def _update_module(self, i: int, site: str):
        return _get(self.block(i), self.spec.attn if site == "attn" else self.spec.ffn)

    def update_output(self, i: int, site: str):
        """Block i's attention or FFN update (site 'attn' or 'ffn') as its module returns it (flat for flat FFNs):
        the tensor the block goes on to use."""
        return _first(self._update_module(i, site).output)

    def set_update(self, i: int, site: str, value) -> None:
        """Replace block i's attention or FFN update (site 'attn' or 'ffn'), as attn_update / ffn_output give it,
        out of place: a quantized layer's output may be a view that autograd forbids editing in place."""
        module = self._update_module(i, site)
        out = module.output
        value = value.view(_first(out).shape) if site == "ffn" and self.spec.ffn_flat else value
        module.output = (value, *out[1:]) if isinstance(out, tuple) else value

    def ffn_module(self, i: int):
        return _get(self.block(i), self.spec.ffn)

    def _unflat(self, t, like):
        return t.view(*like.shape[:-1], t.shape[-1]) if self.spec.ffn_flat else t

    def ffn_input(self, i: int, like=None):
        """What the FFN of block i reads (its normalised input), shaped (batch, seq, d)."""
        return self._unflat(_get(self.block(i), self.spec.ffn_in).input, like)

    def ffn_output(self, i: int, like=None):
        """The FFN update of block i as the live tensor (batch, seq, d): write into it to change the update.
        `like` (the block input) gives the (batch, seq) shape for flat FFNs."""
        return self._unflat(self.ffn_module(i).output, like)

    def ffn_update(self, i: int, like=None):
        """The FFN update of block i, safe to keep (cloned where the family edits it in place later)."""
        out = self.ffn_output(i, like)
        return out.clone() if self.spec.ffn_inplace else out

    # --- plain torch ----------------------------------------------------------------------------------------
    @property
    def unembed_device(self) -> torch.device:
        return execution_device(self._unembed)

    @torch.no_grad()
    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """Residual vectors (..., d) -> logits, through final norm, projection, unembedding and softcap."""
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """`decode` with autograd, for what trains through the read-out (the tuned lens' translators)."""
        if self._norm is not None:
            h = self._norm(h.to(execution_device(self._norm), first_weight(self._norm).dtype))
        if self._pre_unembed is not None:
            w = self._pre_unembed.weight
            h = self._pre_unembed(h.to(execution_device(self._pre_unembed),
                                       w.dtype if w.dtype.is_floating_point else h.dtype))
        logits = self._unembed(h.to(device=self.unembed_device, dtype=self._unembed_dtype()))
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def _unembed_dtype(self) -> torch.dtype:
        w = self._unembed.weight
        return w.dtype if w.dtype.is_floating_point else torch.bfloat16


def parse_blocks(value, n_layers: int, what: str) -> list[int]:
    """'all', '3', '3,5', '10-17' or a list -> block indices, checked against the model."""
    if value in (None, "all"):
        return list(range(n_layers))
    if isinstance(value, int):
        value = [value]
    accepted = f"'all', a block, a list or ranges of blocks like '3,5' or '10-17' (blocks 0 to {n_layers - 1})"
    if isinstance(value, str):
        out = []
        for part in value.split(","):
            a, sep, b = part.strip().partition("-")
            try:
                lo, hi = int(a), int(b if sep else a)
            except ValueError:
                raise ProbeError(f"bad {what} {value!r}; accepted: {accepted}") from None
            if hi < lo:
                raise ProbeError(f"bad {what} {value!r}: the range {part.strip()!r} is empty; accepted: {accepted}")
            out += list(range(lo, hi + 1))
        value = out
    bad = [v for v in value if not 0 <= int(v) < n_layers]
    if bad:
        raise ProbeError(f"{what} {bad[0]} out of range; accepted: blocks 0 to {n_layers - 1}")
    return [int(v) for v in value]
