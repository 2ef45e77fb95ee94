"""Every attention layer's queries, keys and probabilities as the layer uses them (after rotary embeddings and
query/key norms), for probes that need more than a layer's output: AtP*'s QK fix (methods/atp_star.py).

Families whose attention goes through transformers' attention interface (llama, mistral, qwen2/3, gemma 1-3, GPT-2,
GPT-J, GPT-NeoX, OPT) run, while recording, an eager attention registered here under IMPLEMENTATION (scores,
softcap, mask, float32 softmax, as the families' own eager code: equal logits, tested per family), with an eager
(additive) mask. This project's trained decoder (models/custom.py) records from its own attention. BLOOM and
Falcon compute attention in their own code, so nothing is recorded for them (`recordable`)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

IMPLEMENTATION = "probe_recorded"
OWN_CODE = ("bloom", "falcon")  # attention written in the modeling file, past the attention interface
_active: dict | None = None  # layer -> Recorded, while recording (the forward may run in another thread)


@dataclass
class Recorded:
    query: torch.Tensor  # (batch, heads, seq, head_dim), in the autograd graph of the forward
    key: torch.Tensor  # (batch, heads, seq, head_dim): key-value heads repeated for grouped-query attention
    mask: torch.Tensor | None  # additive, broadcast to (batch, 1, seq, seq)
    scaling: float
    softcap: float | None
    probs: torch.Tensor | None  # (batch, heads, seq, seq): the probabilities the layer multiplies the values by

    def scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Scores of queries (..., q, d) against keys (..., k, d) as the layer computes them, before its mask is
        added: softcap(scaling q . k)."""
        return self.capped(query @ key.transpose(-1, -2) * self.scaling)

    def capped(self, raw: torch.Tensor) -> torch.Tensor:
        """The layer's softcap of raw scores (scaling q . k), if it has one."""
        return raw if self.softcap is None else torch.tanh(raw / self.softcap) * self.softcap


def active() -> bool:
    return _active is not None


def record(layer: int, rec: Recorded) -> None:
    if _active is not None:
        _active[layer] = rec


def recordable(arch) -> str | None:
    """Why this model's attention cannot be recorded, or None."""
    if arch.model_type in OWN_CODE:
        return f"{arch.model_type} computes attention in its own code"
    modes = [getattr(arch.config, f"{p}_residual", "none") for p in ("query", "key")]
    if any(m != "none" for m in modes):  # a layer's queries would carry an earlier layer's
        return "its queries or keys take an earlier layer's (query/key residual)"
    return None


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' attention interface: eager attention, recorded."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    key, value = _repeat(key, query.shape[1]), _repeat(value, query.shape[1])
    mask = None if attention_mask is None else attention_mask[..., :key.shape[-2]]
    rec = Recorded(query, key, mask, scaling, softcap, None)
    s = rec.scores(query, key)
    probs = torch.softmax(s if mask is None else s + mask, -1, dtype=torch.float32).to(query.dtype)
    rec.probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    record(module.layer_idx, rec)
    return (rec.probs @ value).transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, attend)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextmanager
def recording(arch):
    """Inside: forwards of `arch`'s model record each layer's attention into the dict this yields (layer ->
    Recorded)."""
    global _active
    _register()
    config, got = arch.config, {}
    before = getattr(config, "_attn_implementation", None)
    hf_interface = arch.model_type != "probe_transformer"
    if hf_interface:
        config._attn_implementation = IMPLEMENTATION
    _active = got
    try:
        yield got
    finally:
        _active = None
        if hf_interface:
            config._attn_implementation = before
