"""The two identities that prove the architecture table, for every supported family, plus module access."""

import pytest
import torch

from probes.models.arch import ARCHITECTURES, Arch, arch_spec
from probes.errors import ProbeError
from probes.methods.readout import last_residuals

from .conftest import REGISTRY, TINY, loaded

PROMPTS = ["Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:",
           "The capital of China is"]


def trace_updates(lm, prompt):
    arch = lm.arch
    saved = []
    with lm.model.trace(prompt):
        for i in range(arch.n_layers):
            x = arch.block_input(i)
            a = arch.attn_update(i)
            f = arch.ffn_update(i, like=x)
            y = arch.block_output(i)
            saved.append([t.save() for t in (x, a, f, y)])
        logits = lm.model.output.logits.save()
    return saved, logits


def test_every_family_has_a_tiny_model():
    assert {REGISTRY[n].family for n in TINY} == set(ARCHITECTURES) - {"qwen3"}


@pytest.mark.parametrize("name", TINY)
def test_block_output_is_input_plus_attention_plus_ffn(name):
    lm = loaded(name)
    saved, _ = trace_updates(lm, PROMPTS[0])
    for i, (x, a, f, y) in enumerate(saved):
        assert x.shape == a.shape == f.shape == y.shape
        torch.testing.assert_close(x + a + f, y, atol=1e-5, rtol=1e-5, msg=f"{name} block {i}")
        assert f.abs().max() > 1e-3 and a.abs().max() > 1e-3  # neither update is trivially zero


@pytest.mark.parametrize("name", TINY)
def test_lens_of_last_layer_is_the_models_logits(name):
    lm = loaded(name)
    saved, logits = trace_updates(lm, PROMPTS[0])
    torch.testing.assert_close(lm.arch.decode(saved[-1][3]), logits.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_layer_count_and_module_access_match_the_model(name):
    lm = loaded(name)
    hf, arch = lm.model._module, lm.arch
    assert arch.n_layers == hf.config.num_hidden_layers
    blocks = [m for m in hf.modules() if type(m).__name__.endswith(("Block", "DecoderLayer", "Layer"))
              and "Norm" not in type(m).__name__]
    assert len(blocks) == arch.n_layers
    # residual index 0 is the embedding output, the others are the blocks' outputs (HF's hidden_states, whose
    # last entry some families already passed through the final norm)
    ids = lm.tokenizer(PROMPTS[1], return_tensors="pt")
    hs = hf(**ids, output_hidden_states=True).hidden_states
    lens = last_residuals(lm, [PROMPTS[1]])[0]
    assert lens.shape[0] == arch.n_layers + 1
    for index in range(arch.n_layers):
        torch.testing.assert_close(lens[index], hs[index][0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-bloom", "tiny-gemma3", "tiny-probe-transformer"])
def test_left_padded_batch_equals_prompts_run_alone(name):
    lm = loaded(name)
    batch = last_residuals(lm, PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batch[b], last_residuals(lm, [prompt])[0], atol=1e-4, rtol=1e-4)


def test_unknown_architecture_is_named():
    with pytest.raises(ProbeError, match=r"unknown architecture 'bert'; accepted: .*gpt2"):
        arch_spec("bert")


def test_arch_refuses_a_model_it_does_not_know():
    lm = loaded("tiny-gpt2")

    class Fake:
        _module = type("M", (), {"config": type("C", (), {"model_type": "t5"})()})()

    with pytest.raises(ProbeError, match="unknown architecture 't5'"):
        Arch(Fake())
    assert Arch(lm.model).n_layers == 2
