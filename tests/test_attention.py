"""Working-memory probes: entropy, d', attention weights checked against a hand computation, letter positions."""

import math

import pytest
import torch

from probes.methods.attention import attention_weights, entropy, letter_positions, run_attention, total_entropy, without_sink
from probes.methods.nback import dprime, run_nback
from probes.errors import ProbeError
from probes.models.loading import load_model
from probes.models.registry import load_registry
from probes.tasks.files import load_task

from .conftest import bundled, loaded

REG = load_registry()
PROMPT = "Letter: K\nResponse: -\nLetter: B\nResponse: -\nLetter: K\nResponse:"


def eager(name):
    return loaded(name, attn_implementation="eager")


def test_entropy_of_uniform_and_one_hot_rows():
    for k in (1, 2, 7, 100):
        assert entropy(torch.full((k,), 1 / k)).item() == pytest.approx(math.log(k))
    assert entropy(torch.tensor([0.0, 1.0, 0.0])).item() == 0.0
    rows = torch.tensor([[0.5, 0.25, 0.25, 0.0]])
    assert entropy(without_sink(rows)).item() == pytest.approx(math.log(2))  # key 0 dropped, renormalised
    assert total_entropy([torch.eye(3).numpy(), torch.eye(3).numpy()]) == 0.0


def test_dprime_is_signed_and_corrected():
    hit, fa, d = dprime(8, 8, 0, 16)  # perfect: rates 1 and 0 are corrected, d' finite and positive
    assert (hit, fa) == (1.0, 0.0) and 2.5 < d < 4
    _, _, d_below = dprime(0, 8, 16, 16)  # always wrong: below chance, negative, never an absolute value
    assert d_below == pytest.approx(-d, rel=0.2) and d_below < 0
    assert dprime(4, 8, 8, 16)[2] == pytest.approx(0.0, abs=0.1)


def test_a_tiny_model_whose_attention_is_set_to_uniform():
    lm = load_model(REG["tiny-llama"], attn_implementation="eager")  # own copy: weights are changed below
    attn = lm.model._module.model.layers[0].self_attn
    with torch.no_grad():
        attn.q_proj.weight.zero_()  # every score 0: uniform over the causal keys
    w = attention_weights(lm, PROMPT)[0]
    n = w.shape[-1]
    expected = torch.log(torch.arange(1, n + 1, dtype=torch.float32))
    for h in range(w.shape[0]):
        torch.testing.assert_close(entropy(w[h]), expected, atol=1e-5, rtol=1e-5)


def _causal_softmax(scores):
    n = scores.shape[-1]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1)


def test_gpt2_weights_equal_softmax_qk_by_hand():
    lm = eager("tiny-gpt2")
    block = lm.model._module.transformer.h[0]
    with lm.model.trace(PROMPT):
        x = lm.arch.block_input(0).save()
    with torch.no_grad():
        q, k, _ = block.attn.c_attn(block.ln_1(x[0])).split(block.attn.embed_dim, dim=-1)
        H = block.attn.num_heads
        q, k = (t.view(t.shape[0], H, -1).transpose(0, 1) for t in (q, k))
        hand = _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(attention_weights(lm, PROMPT)[0], hand, atol=1e-5, rtol=1e-5)


def test_grouped_query_weights_are_expanded_per_head_on_llama():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = eager("tiny-llama")
    hf = lm.model._module
    layer, cfg = hf.model.layers[0], hf.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    with lm.model.trace(PROMPT):
        x = lm.arch.block_input(0).save()
    with torch.no_grad():
        h = layer.input_layernorm(x)
        hd = cfg.hidden_size // cfg.num_attention_heads
        q = layer.self_attn.q_proj(h).view(1, -1, cfg.num_attention_heads, hd).transpose(1, 2)
        k = layer.self_attn.k_proj(h).view(1, -1, cfg.num_key_value_heads, hd).transpose(1, 2)
        pos = torch.arange(x.shape[1])[None]
        cos, sin = hf.model.rotary_emb(x, pos)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)
        hand = _causal_softmax(q[0] @ k[0].transpose(-1, -2) / math.sqrt(hd))
    w = attention_weights(lm, PROMPT)[0]
    assert w.shape[0] == cfg.num_attention_heads
    torch.testing.assert_close(w, hand, atol=1e-5, rtol=1e-5)


def test_a_model_without_attention_weights_gets_a_clear_error():
    lm = loaded("tiny-llama")  # default (sdpa) attention returns no weights
    if lm.model._module.config._attn_implementation == "eager":
        pytest.skip("transformers chose eager attention by default here")
    with pytest.raises(ProbeError, match="returns no attention weights"):
        attention_weights(lm, PROMPT)


@pytest.mark.parametrize("name", ["gemma3-270m", "smollm2-135m"])
def test_letter_positions_come_from_offsets(name):
    tok = bundled(name).tokenizer
    item = load_task("nback-sequence", {"n": 2}).items()[0]
    pos = letter_positions(tok, item.prompt)
    ids = tok(item.prompt).input_ids
    assert len(pos) == 24
    assert "".join(tok.decode(ids[p]).strip() for p in pos) == item.extra["letters"]


def test_probes_run_end_to_end_on_a_tiny_model():
    lm = eager("tiny-llama")
    trials = load_task("nback", {"n": [1, 2], "sequences": 1}).items()[:6]
    rows = run_nback(lm, trials)
    assert {r["choice"] for r in rows} <= {"m", "-"} and all(0 <= r["p_match"] <= 1 for r in rows)
    seqs = load_task("nback-sequence", {"n": 2, "sequences": 1}).items()
    rows = run_attention(lm, seqs)
    heads = lm.model._module.config.num_attention_heads
    assert len(rows) == lm.arch.n_layers * heads
    assert all(r["entropy"] > 0 and 0 <= r["nback_mass_match"] <= 1 for r in rows)
    with pytest.raises(ProbeError, match="needs whole N-back sequences"):
        run_attention(lm, trials)
