"""Architectures of this project, registered with transformers (`AutoConfig.register`,
`AutoModelForCausalLM.register`), so that `save_pretrained` / `from_pretrained` work with no remote code and a
trained checkpoint loads like any other model.

`probe_transformer`: the small decoder the synthetic-task papers train, with each part optional. Gong & Zhang's
N-back model is one layer, one head, width 512, attention only: no FFN, no norm, no residual, learned absolute
positions. A block computes

    a = attn(norm1(x));  h = x + a  (residual)  or  h = a  (none)
    f = ffn(norm2(h));   out = h + f  (residual)  or  out = f  (none)     [when it has an FFN]

so the architecture identities read: block out = in + attn + ffn with a residual; without one, block out = the
last update (the FFN's, else the attention's). Attention is eager and returns its probabilities, for the
attention probe. The in-context classification model of Burns, Fukai & Earls (after Reddy) is one too: vector
inputs (`inputs_embeds`, positions inside the vectors: `positions: false`), attention without biases, output
projection or 1/sqrt(d) scaling (`attn_bias`, `attn_out`, `attn_scale`), the value residual between layers
(`value_residual`, as below), and `head_layers` ReLU layers between the last block and the readout (they sit in
`model.norm`, after the LayerNorm if any, so the lens reads through them and its last layer is the logits).
`init_attn_std` (e.g. 1/sqrt(85)) draws the weights as the authors' code does: attention N(0, init_attn_std^2), ReLU layers
He-normal, readout N(0, 1/width); else transformers' default (N(0, 0.02^2)). `init: torch` draws every parameter as
the PyTorch modules Gong & Zhang build their model from would: token and position embeddings N(0, 1)
(`nn.Embedding`), the attention input projection xavier-uniform with zero biases and a zero output-projection
bias (`nn.MultiheadAttention`), every other Linear PyTorch's default (Kaiming-uniform); `init: transformer_lens` as
TransformerLens 1.x's HookedTransformer draws Brinkmann et al.'s tree model: every weight matrix N(0, 0.64/width),
biases zero; the default, `init: hf`, is transformers' N(0, 0.02^2) for every Linear and Embedding (existing
configs and checkpoints unchanged). With
embeddings at 0.02 the initial attention logits are ~1e-4 apart, and a 1-layer attention-only model without
residual sits at uniform attention (see docs/nback-trained.md).

`gpt2_value_residual`: GPT-2 with a residual path between the attention heads of adjacent layers (Burns, Fukai &
Earls), per projection: `value_residual` (and `key_residual`, `query_residual`) `none` (stock GPT-2, exactly),
`previous` (for every layer l >= 1, head h's values are its own plus the raw values of head h of layer l-1, before
the attention weighting and the output projection; each layer passes on its own raw values, not the sum) or
`first` (ResFormer: 0.5 V_0 + 0.5 V_l for l >= 1). Same module names and weights as GPT-2.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, GenerationMixin, GPT2Config, GPT2LMHeadModel,
                          PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutput
from transformers.pytorch_utils import Conv1D

from ..errors import ProbeError
from . import attention_record


class ProbeTransformerConfig(PretrainedConfig):
    model_type = "probe_transformer"

    def __init__(self, vocab_size: int = 32, n_positions: int = 64, n_layer: int = 1, n_head: int = 1,
                 n_embd: int = 64, ffn: bool = False, n_inner: int | None = None, norm: bool = False,
                 residual: bool = False, positions: bool = True, attn_bias: bool = True, attn_out: bool = True,
                 attn_scale: bool = True, value_residual: str = "none", key_residual: str = "none",
                 query_residual: str = "none", head_layers: int = 0, init_attn_std: float | None = None,
                 init: str = "hf", lm_head_bias: bool = False, **kwargs):
        self.vocab_size, self.n_positions, self.n_layer, self.n_head, self.n_embd = (
            vocab_size, n_positions, n_layer, n_head, n_embd)
        self.ffn, self.n_inner, self.norm, self.residual = ffn, n_inner or 4 * n_embd, norm, residual
        self.positions, self.attn_bias, self.attn_out, self.attn_scale = positions, attn_bias, attn_out, attn_scale
        self.value_residual, self.key_residual, self.query_residual = check_modes(
            value_residual=value_residual, key_residual=key_residual, query_residual=query_residual)
        self.head_layers, self.init_attn_std = head_layers, init_attn_std
        if init not in INITS:
            raise ProbeError(f"unknown init {init!r}; accepted: {', '.join(INITS)}")
        self.init, self.lm_head_bias = init, lm_head_bias
        # the names transformers and this project read
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = n_embd, n_layer, n_head
        self.max_position_embeddings = n_positions
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


RESIDUAL_MODES = ("none", "previous", "first")
INITS = ("hf", "torch", "transformer_lens")  # transformers' N(0, 0.02^2), the PyTorch modules' own, TransformerLens's


def check_modes(**modes: str) -> tuple:
    for name, mode in modes.items():
        if mode not in RESIDUAL_MODES:
            raise ProbeError(f"unknown {name} {mode!r}; accepted: {', '.join(RESIDUAL_MODES)}")
    return tuple(modes.values())


def residual_mix(raw: torch.Tensor, layer: int, modes: tuple, shared: dict, last: bool = False) -> torch.Tensor:
    """The concatenated query, key and value projections `raw` of `layer`, each given the raw ones of an earlier
    layer as its mode (in q, k, v order) says: `previous` adds layer l-1's, `first` averages with layer 0's. Keeps
    this layer's raw projections (and layer 0's) in `shared` for the next layer, unless it is the `last`. In place
    on `raw` (a fresh projection output), copying only the parts that pass on: the path costs a few percent of a
    step at most."""
    used = [i for i, m in enumerate(modes) if m != "none"]
    if not used:
        return raw
    third = raw.shape[-1] // 3
    own = {i: raw[..., i * third:(i + 1) * third].clone() for i in used} if not last else {}
    if layer > 0:
        for i in used:
            part = raw[..., i * third:(i + 1) * third]
            if modes[i] == "previous":
                part.add_(shared["previous"][i])
            else:
                part.mul_(0.5).add_(shared["first"][i], alpha=0.5)
    shared["previous"] = own
    if layer == 0:
        shared["first"] = own
    return raw


class Attention(nn.Module):
    def __init__(self, config: ProbeTransformerConfig, layer: int = 0, shared: dict | None = None):
        super().__init__()
        self.heads, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.scale = 1 / math.sqrt(self.head_dim) if config.attn_scale else 1.0
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.attn_bias)
        self.out = nn.Linear(config.n_embd, config.n_embd, bias=config.attn_bias) if config.attn_out else nn.Identity()
        self.layer, self.shared = layer, shared if shared is not None else {}
        self.last = layer == config.n_layer - 1
        self.modes = (config.query_residual, config.key_residual, config.value_residual)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, d = x.shape
        qkv = residual_mix(self.qkv(x), self.layer, self.modes, self.shared, self.last)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in qkv.split(d, dim=-1))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
        if attention_record.active():  # for AtP*'s QK fix
            additive = torch.zeros((), dtype=scores.dtype, device=scores.device).masked_fill(
                ~mask, torch.finfo(scores.dtype).min)
            attention_record.record(self.layer, attention_record.Recorded(q, k, additive, self.scale, None, probs))
        return self.out((probs @ v).transpose(1, 2).reshape(b, t, d)), probs


class Block(nn.Module):
    def __init__(self, config: ProbeTransformerConfig, layer: int = 0, shared: dict | None = None):
        super().__init__()
        self.residual = config.residual
        self.norm1 = nn.LayerNorm(config.n_embd) if config.norm else nn.Identity()
        self.attn = Attention(config, layer, shared)
        self.norm2 = nn.LayerNorm(config.n_embd) if config.norm and config.ffn else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, config.n_inner), nn.GELU(),
                                 nn.Linear(config.n_inner, config.n_embd)) if config.ffn else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, attentions: list | None = None) -> torch.Tensor:
        """The block's output; its attention probabilities are appended to `attentions` when given."""
        a, probs = self.attn(self.norm1(x), mask)
        if attentions is not None:
            attentions.append(probs)
        h = x + a if self.residual else a
        if self.mlp is None:
            return h
        f = self.mlp(self.norm2(h))
        return h + f if self.residual else f


class ProbeTransformerModel(nn.Module):
    def __init__(self, config: ProbeTransformerConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd) if config.positions else None
        shared: dict = {}  # the raw q/k/v projections a layer passes to the next (value residual)
        self.layers = nn.ModuleList(Block(config, i, shared) for i in range(config.n_layer))
        self.norm = final(config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, output_hidden_states: bool = False,
                inputs_embeds=None, keep: int = 0, output_attentions: bool = False):
        """(final hidden states (the last `keep` positions, or all), the residual stream before each block and
        after the last, or None, each block's attention probabilities (batch, heads, queries, keys), or None)."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        b, t = x.shape[:2]
        if self.wpe is not None:
            if position_ids is None:
                position_ids = torch.arange(t, device=x.device).expand(b, t)
            x = x + self.wpe(position_ids)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None, None]
        if attention_mask is not None:  # padding: no query attends to a pad key
            mask = mask & attention_mask[:, None, None, :].bool()
        states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for block in self.layers:
            x = block(x, mask, attentions)
            if states is not None:
                states.append(x)
        if keep:
            x = x[:, -keep:].contiguous()  # a strided slice makes BLAS round rows of one batch differently
        return ((self.norm(x) if self.norm is not None else x), (tuple(states) if states is not None else None),
                tuple(attentions) if attentions is not None else None)


def final(config: ProbeTransformerConfig) -> nn.Module | None:
    """What lies between the last block and the readout: the LayerNorm, then `head_layers` ReLU layers."""
    parts = ([nn.LayerNorm(config.n_embd)] if config.norm else []) + [
        m for _ in range(config.head_layers) for m in (nn.Linear(config.n_embd, config.n_embd), nn.ReLU())]
    if not config.head_layers:
        return parts[0] if parts else None
    return nn.Sequential(*parts)


class ProbeTransformerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = ProbeTransformerConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_attention_backend = False
    supports_kv_cache = False  # every forward reads the whole prompt (probes fall back to full passes)

    def __init__(self, config: ProbeTransformerConfig):
        super().__init__(config)
        self.model = ProbeTransformerModel(config)
        # a bias: Gong & Zhang's readout is nn.Linear(512, 2) with one (its two rows are the label tokens' rows)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=getattr(config, "lm_head_bias", False))
        self.post_init()
        if getattr(config, "init", "hf") == "torch":
            self._draw_as_torch()
        elif getattr(config, "init", "hf") == "transformer_lens":
            self._draw_as_transformer_lens(config)
        if config.init_attn_std is not None:
            self._draw_as_authors(config)

    @torch.no_grad()
    def _draw_as_torch(self) -> None:
        """Every module's own PyTorch draw (`reset_parameters`: embeddings N(0, 1), Linear Kaiming-uniform), then
        what nn.MultiheadAttention does to its projections: input projection xavier-uniform, biases zero."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                m.reset_parameters()
        for layer in self.model.layers:
            nn.init.xavier_uniform_(layer.attn.qkv.weight)
            for m in (layer.attn.qkv, layer.attn.out):
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @torch.no_grad()
    def _draw_as_transformer_lens(self, config: ProbeTransformerConfig) -> None:
        """HookedTransformer.init_weights of TransformerLens 1.x with its default initializer_range 0.8/sqrt(width):
        every weight matrix (token and position embeddings, Q/K/V/O, MLP, unembedding) N(0, that^2), untruncated and
        not scaled by depth; every bias zero; LayerNorms 1 and 0."""
        std = 0.8 / math.sqrt(config.n_embd)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0, std)
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def _draw_as_authors(self, config: ProbeTransformerConfig) -> None:
        """Burns et al.'s toy-model draws (see the module docstring); biases N(0, 1/width) like theirs."""
        width = config.n_embd
        for layer in self.model.layers:
            for m in (layer.attn.qkv, layer.attn.out):
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0, config.init_attn_std)
        for m in (self.model.norm or []) if config.head_layers else []:
            if isinstance(m, nn.Linear):
                m.weight.normal_(0, math.sqrt(2 / width))
                m.bias.normal_(0, math.sqrt(1 / width))
        self.lm_head.weight.normal_(0, math.sqrt(1 / width))

    def get_input_embeddings(self):
        return self.model.wte

    def set_input_embeddings(self, value):
        self.model.wte = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep: int = 0,
                output_hidden_states: bool | None = None, inputs_embeds=None, output_attentions: bool | None = None,
                **kwargs) -> CausalLMOutput:
        h, states, attentions = self.model(input_ids, attention_mask, position_ids, bool(output_hidden_states),
                                           inputs_embeds, logits_to_keep, bool(output_attentions))
        return CausalLMOutput(logits=self.lm_head(h), hidden_states=states, attentions=attentions)


AutoConfig.register(ProbeTransformerConfig.model_type, ProbeTransformerConfig)
AutoModelForCausalLM.register(ProbeTransformerConfig, ProbeTransformerForCausalLM)


class ValueResidualGPT2Config(GPT2Config):
    model_type = "gpt2_value_residual"

    def __init__(self, value_residual: str = "previous", key_residual: str = "none", query_residual: str = "none",
                 **kwargs):
        self.value_residual, self.key_residual, self.query_residual = check_modes(
            value_residual=value_residual, key_residual=key_residual, query_residual=query_residual)
        super().__init__(**kwargs)


class ResidualQKV(Conv1D):
    """GPT-2's c_attn (same weight and bias), whose query, key and value outputs receive those of an earlier layer
    (`residual_mix`)."""

    layer: int
    last: bool
    modes: tuple
    shared: dict

    def forward(self, x):
        return residual_mix(super().forward(x), self.layer, self.modes, self.shared, self.last)


class ValueResidualGPT2LMHeadModel(GPT2LMHeadModel):
    config_class = ValueResidualGPT2Config

    def __init__(self, config: ValueResidualGPT2Config):
        super().__init__(config)
        shared: dict = {}
        modes = (config.query_residual, config.key_residual, config.value_residual)
        for i, block in enumerate(self.transformer.h):
            block.attn.c_attn.__class__ = ResidualQKV  # the same parameters, so GPT-2's weights load as they are
            block.attn.c_attn.layer, block.attn.c_attn.modes, block.attn.c_attn.shared = i, modes, shared
            block.attn.c_attn.last = i == config.n_layer - 1


AutoConfig.register(ValueResidualGPT2Config.model_type, ValueResidualGPT2Config)
AutoModelForCausalLM.register(ValueResidualGPT2Config, ValueResidualGPT2LMHeadModel)
