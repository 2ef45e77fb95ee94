"""The registry: every paper model present and well-formed; malformed files and bad values give clear errors."""

import pytest

from probes.errors import ProbeError
from probes.models.registry import load_registry, parse_entry, resolve_model

PAPER = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt-j-6b", "bloom-560m", "bloom-1b1", "bloom-1b7",
         "bloom-3b", "bloom-7b1", "bloom-176b"]


def test_registry_has_the_paper_models_and_bundled_ones():
    reg = load_registry()
    for name in PAPER:
        assert reg[name].source == "hub" and reg[name].repo and reg[name].params
    assert reg["bloom-176b"].repo == "bigscience/bloom"
    assert 175e9 < reg["bloom-176b"].params < 177e9
    assert reg["smollm2-135m"].source == reg["gemma3-270m"].source == "gguf"
    for family in ("gpt_neox", "opt", "llama", "gemma2", "gemma3_text"):
        assert any(s.family == family and s.source == "hub" for s in reg.values())
    assert all(not s.load.get("trust_remote_code") for s in reg.values())


def test_pinned_revisions_are_commits():
    reg = load_registry()
    assert reg["gpt2"].pinned and reg["gpt2"].revision == "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    assert all(s.pinned or s.revision == "main" for s in reg.values() if s.source == "hub")


@pytest.mark.parametrize("text, message", [
    ("models: [a, b", r"malformed model registry .* at line"),
    ("- just\n- a list\n", r"expected a top-level 'models:' mapping"),
    ("models:\n  x: {family: gpt2}\n", r"entry 'x' needs 'repo'"),
    ("models:\n  x: {repo: a/b, family: gpt2, dtype: float8}\n", r"dtype 'float8'; accepted: float32, float16, bfloat16"),
    ("models:\n  x: {repo: a/b, family: gpt2, load: {quantize: 3bit}}\n", r"quantize '3bit'; accepted: 8bit, 4bit"),
    ("models:\n  x: {repo: a/b, family: gpt2, colour: red}\n", r"unknown field\(s\) colour"),
    ("models:\n  x: {repo: a/b, family: gpt2, params: lots}\n", r"bad params 'lots'"),
])
def test_malformed_registry_is_refused(tmp_path, text, message):
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ProbeError, match=message):
        load_registry(path)


def test_resolve_unknown_model_names_it_and_the_accepted_ones():
    with pytest.raises(ProbeError, match=r"unknown model 'gpt5'; accepted: .*gpt2-medium.*tiny-llama"):
        resolve_model("gpt5")


def test_local_folder_and_config_file_are_models(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "gpt2"}')
    assert resolve_model(str(tmp_path / "ckpt")).source == "local"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model_type: llama\nnum_hidden_layers: 1\nhidden_size: 32\nnum_attention_heads: 2\n")
    spec = resolve_model(str(cfg))
    assert spec.source == "random" and spec.family == "llama" and spec.random["num_hidden_layers"] == 1


def test_params_accept_suffixes():
    assert parse_entry("x", {"repo": "a/b", "family": "bloom", "params": "176B"}, "t").params == 176_000_000_000
