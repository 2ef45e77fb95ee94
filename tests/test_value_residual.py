"""The value-residual GPT-2 (Burns, Fukai & Earls): `none` is stock GPT-2 exactly, `previous` and `first` equal
the computation written out by hand, it saves and loads with no remote code, and a bad mode is a clear error.
(Its architecture identities are tested with every tiny model: it is `tiny-gpt2-value-residual` of the registry.)"""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from probes.errors import ProbeError
from probes.models.custom import ValueResidualGPT2Config, ValueResidualGPT2LMHeadModel

SIZE = dict(n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=50, attn_implementation="eager",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
IDS = torch.tensor([[3, 14, 15, 9, 2, 6, 5, 35]])


def models(mode: str, part: str = "value_residual"):
    torch.manual_seed(0)
    stock = GPT2LMHeadModel(GPT2Config(**SIZE)).eval()
    ours = ValueResidualGPT2LMHeadModel(ValueResidualGPT2Config(**SIZE, **{"value_residual": "none", part: mode})).eval()
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def by_hand(model, modes: dict) -> torch.Tensor:
    """GPT-2's forward written out, with the q/k/v residual of `modes` ({'q'|'k'|'v': none|previous|first})."""
    t, d, heads = IDS.shape[1], SIZE["n_embd"], SIZE["n_head"]
    tr = model.transformer
    x = tr.wte(IDS) + tr.wpe(torch.arange(t))[None]
    raw_first = raw_prev = None
    for i, block in enumerate(tr.h):
        h = block.ln_1(x)
        raw = h @ block.attn.c_attn.weight + block.attn.c_attn.bias  # Conv1D: x W + b
        q, k, v = raw.split(d, dim=-1)
        parts = {"q": q, "k": k, "v": v}
        if i > 0:
            for name, mode in modes.items():
                j = "qkv".index(name)
                if mode == "previous":
                    parts[name] = parts[name] + raw_prev.split(d, dim=-1)[j]
                elif mode == "first":
                    parts[name] = 0.5 * raw_first.split(d, dim=-1)[j] + 0.5 * parts[name]
        raw_prev = raw
        raw_first = raw if i == 0 else raw_first
        q, k, v = (parts[n].view(1, t, heads, d // heads).transpose(1, 2) for n in "qkv")
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // heads)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), torch.finfo(scores.dtype).min)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, t, d)
        x = x + block.attn.c_proj(a)
        x = x + block.mlp(block.ln_2(x))
    return model.lm_head(tr.ln_f(x))


def test_none_is_stock_gpt2_exactly():
    stock, ours = models("none")
    with torch.no_grad():
        assert torch.equal(stock(IDS).logits, ours(IDS).logits)


@pytest.mark.parametrize("part, mode", [("value_residual", "previous"), ("value_residual", "first"),
                                        ("key_residual", "previous"), ("query_residual", "first")])
def test_a_residual_layer_equals_the_computation_written_out_by_hand(part, mode):
    stock, ours = models(mode, part)
    with torch.no_grad():
        out = ours(IDS).logits
        expected = by_hand(ours, {part[0]: mode})
        assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
        assert (out - stock(IDS).logits).abs().max() > 1e-4  # the path changes what the model computes


def test_it_saves_and_loads_with_no_remote_code(tmp_path):
    _, ours = models("previous")
    ours.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False, attn_implementation="eager").eval()
    # by name: another test re-imports the package, and transformers' registry keeps the class it saw first
    assert type(again).__name__ == "ValueResidualGPT2LMHeadModel" and again.config.value_residual == "previous"
    assert type(again.transformer.h[1].attn.c_attn).__name__ == "ResidualQKV"
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, ours(IDS).logits)


def test_a_bad_mode_is_a_clear_error():
    with pytest.raises(ProbeError, match=r"^unknown value_residual 'sum'; accepted: none, previous, first$"):
        ValueResidualGPT2Config(value_residual="sum")


def test_quantizing_it_is_refused_before_loading():
    from probes.models.options import load_options
    from probes.models.planning import check_quantizable
    from probes.models.registry import load_registry

    spec = load_registry()["tiny-gpt2-value-residual"]
    with pytest.raises(ProbeError, match="carries its value residual in each attention's c_attn"):
        check_quantizable(spec, load_options(spec, quantize="8bit"))
