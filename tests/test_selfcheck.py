"""The self-check before every run's first batch: it passes on every family, and each check fails on a model made
to break it (an architecture table pointing at the wrong module, a model whose output depends on its padding)."""

import dataclasses
import json

import pytest
import torch

from probes.errors import ProbeError
from probes.models import arch as arch_module
from probes.models.arch import Arch
from probes.runs.selfcheck import describe, self_check
from probes.tasks.files import load_task

from .conftest import TINY, loaded
from .test_cli import probe_here

TASK = load_task("capitals", {"ambiguous": "flag"})


def items(lm, n=8):
    return TASK.scored_items(lm.tokenizer, n)[0]


@pytest.mark.parametrize("name", TINY)
def test_every_family_passes_in_float32(name):
    lm = loaded(name)
    got = self_check(lm, items(lm))
    assert got["lens_logits"] < 1e-5 and got["lens_top1"] and got["padding"] < 1e-5 and got["tolerance"] == 1e-4
    assert got["identity"] < 1e-5  # every tiny model has residual blocks with an FFN


def with_table(lm, monkeypatch, family, **changes):
    """`lm` seen through a changed architecture table entry."""
    monkeypatch.setitem(arch_module.ARCHITECTURES, family, dataclasses.replace(arch_module.ARCHITECTURES[family],
                                                                               **changes))
    return dataclasses.replace(lm, arch=Arch(lm.model))


def test_a_table_reading_the_mlp_module_where_the_update_is_elsewhere_fails_the_identity(monkeypatch):
    lm = with_table(loaded("tiny-bloom"), monkeypatch, "bloom", ffn="mlp")  # BLOOM's mlp adds the residual itself
    with pytest.raises(ProbeError, match=r"^self-check failed on tiny-bloom: block output = input \+ attention update "
                                         r"\+ FFN update does not hold .*for bloom is not the update; accepted: "
                                         "--no-self-check"):
        self_check(lm, items(lm))


def test_a_table_without_the_final_norm_fails_lens_equals_logits(monkeypatch):
    lm = with_table(loaded("tiny-gpt2"), monkeypatch, "gpt2", final_norm=None)
    with pytest.raises(ProbeError, match="the lens of the last layer is not the model's logits"):
        self_check(lm, items(lm))


@pytest.fixture
def ignores_padding():
    """tiny-gpt2 made to attend to its padding: its attention mask is dropped before every forward."""
    lm = loaded("tiny-gpt2")

    def drop_mask(module, args, kwargs):
        return args, {**kwargs, "attention_mask": None}

    hook = lm.model._module.register_forward_pre_hook(drop_mask, with_kwargs=True)
    yield lm
    hook.remove()


def test_a_model_whose_output_depends_on_padding_fails(ignores_padding):
    lm = ignores_padding
    with pytest.raises(ProbeError, match="a padded prompt does not get the logits it gets alone"):
        self_check(lm, items(lm))
    got = self_check(lm, items(lm), strict=False)
    assert got["went_on"] and got["padding"] > 1e-3 and "going on (--no-self-check)" in describe(got)


def test_one_length_prompts_get_a_longer_one_so_the_batch_is_padded_within_the_runs_batch_size():
    lm = loaded("tiny-llama")
    got = self_check(lm, items(lm)[:1])
    assert got["prompts"] == 2 and got["padding"] != "n/a"
    assert self_check(lm, items(lm), batch_size=3)["prompts"] == 3
    alone = self_check(lm, items(lm), batch_size=1)  # a run of one prompt per batch is never padded
    assert alone["prompts"] == 1 and alone["padding"] == "n/a"


def test_the_command_prints_the_line_keeps_the_figures_and_stops_on_a_failure(capsys, tmp_path, monkeypatch):
    run = ["run", "--model", "tiny-gpt2", "--task", "capitals", "--task-option", "ambiguous=flag", "--limit", "4"]
    r = probe_here(capsys, *run, "--output", tmp_path / "ok")
    assert r.returncode == 0 and "self-check: lens = logits (" in r.stderr and "padding invariant (" in r.stderr
    assert json.loads((tmp_path / "ok" / "meta.json").read_text())["self_check"]["lens_top1"] is True
    monkeypatch.setitem(arch_module.ARCHITECTURES, "gpt2", dataclasses.replace(arch_module.ARCHITECTURES["gpt2"],
                                                                               final_norm=None))
    monkeypatch.setattr("probes.api.load", lambda *a, **k: dataclasses.replace(loaded("tiny-gpt2"),
                                                                              arch=Arch(loaded("tiny-gpt2").model)))
    r = probe_here(capsys, *run, "--output", tmp_path / "bad")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("probe: error: self-check failed")
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    r = probe_here(capsys, *run, "--output", tmp_path / "anyway", "--no-self-check")
    assert r.returncode == 0 and "going on (--no-self-check)" in r.stderr
    meta = json.loads((tmp_path / "anyway" / "meta.json").read_text())
    assert meta["self_check"]["went_on"] and "lens of the last layer" in meta["self_check"]["failed"]


def poisoned(name: str, module: str, value: float):
    """A fresh load of `name` with one weight of `module` set to `value` (NaN or inf)."""
    from probes.models.loading import load_model
    from probes.models.registry import load_registry

    lm = load_model(load_registry()[name])
    weight = dict(lm.arch.hf.named_parameters())[module]
    with torch.no_grad():
        weight.view(-1)[0] = value
    return lm


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_model_fails_naming_the_first_module_and_the_dtype(value):
    lm = poisoned("tiny-llama", "model.layers.1.mlp.down_proj.weight", value)
    with pytest.raises(ProbeError, match=r"^self-check failed on tiny-llama: float32 computes non-finite values "
                                         r"\(NaN or inf\), first in block 1's FFN update \(model\.layers\.1\.mlp\)"):
        self_check(lm, items(lm))
    got = self_check(lm, items(lm), strict=False)
    assert got["went_on"] and "non-finite" in describe(got)


def test_non_finite_figures_never_pass():
    """Every comparison of a figure with its tolerance is False for NaN; so is the top-1 agreement of NaN rows."""
    from probes.runs.selfcheck import _failure, _top1_agrees

    base = {"lens_logits": 1e-7, "lens_top1": True, "identity": 1e-7, "padding": 1e-7, "padding_top1": True,
            "nonfinite": None, "quantize": None, "dtype": "float32"}
    assert _failure(base, 1e-4, "m", "llama") is None
    for key in ("lens_logits", "identity", "padding"):
        assert _failure({**base, key: float("nan")}, 1e-4, "m", "llama"), key
    nan = torch.full((2, 5), float("nan"))
    assert not _top1_agrees(nan, nan, 1e-4) and not _top1_agrees(torch.zeros(2, 5), nan, 1e-4)


def test_a_nan_row_never_ranks_top1():
    from probes.methods.readout import rank_of

    logits = torch.tensor([[float("nan")] * 4, [0.0, 1.0, float("nan"), 2.0], [3.0, 1.0, 0.0, 2.0]])
    assert rank_of(logits, torch.tensor([0, 1, 0])).tolist() == [4, 2, 0]


def test_a_run_on_a_nan_model_stops_before_writing(tmp_path, monkeypatch):
    """With the self-check waived, the rows' check stops the run at the first non-finite figure: exit 2, one line,
    no table."""
    import probes
    from probes.runs import execution

    lm = poisoned("tiny-llama", "model.layers.0.self_attn.o_proj.weight", float("nan"))
    with pytest.raises(ProbeError, match=r"^accuracy computed a non-finite \w+ \(nan\) for item \d+ on tiny-llama "
                                         r"in float32; the batches before it are kept"):
        probes.run(lm, "capitals", "accuracy", limit=4, output=tmp_path / "run", self_check=False, progress=False)
    assert not (tmp_path / "run" / "table.csv").exists()


def test_quantized_padding_is_judged_against_the_batch_dependence_measured_without_padding():
    """LLM.int8 moves a prompt by ~0.04-0.08 relative when it shares an unpadded batch (SmolLM2-135M: 0.076), and
    a padded batch by a little more (0.10): that passes, named as what it is; padding beyond 2x the unpadded
    dependence, or another top-1, fails naming both figures. Unquantized models keep their dtype's tolerance."""
    from probes.runs.selfcheck import QUANTIZED_TOLERANCE, _failure

    tol = QUANTIZED_TOLERANCE["8bit"]
    base = {"lens_logits": 0.0, "lens_top1": True, "identity": 0.0, "padding": 0.10, "padding_top1": True,
            "nonfinite": None, "quantize": "8bit", "dtype": "bfloat16", "batch": 0.076, "tolerance": tol,
            "batch_factor": 2.0, "prompts": 8}
    assert _failure(base, tol, "m", "llama") is None
    assert "padding 0.1 within 2x the 8bit batch dependence without padding (0.08)" in describe(base)
    failed = _failure({**base, "padding": 0.4}, tol, "m", "llama")
    assert "relative difference 0.4, tolerance 0.15, beyond 2x the 8bit batch dependence measured without " \
           "padding (0.076)" in failed
    assert "another top-1" in _failure({**base, "padding_top1": False}, tol, "m", "llama")
    plain = {**base, "quantize": None, "batch": "n/a", "dtype": "float32"}
    assert "tolerance 0.0001" in _failure(plain, 1e-4, "m", "llama")


def test_an_8bit_model_passes_by_default_and_says_what_it_measured():
    lm = loaded("tiny-llama", quantize="8bit")
    got = self_check(lm, items(lm))
    assert not got.get("failed") and got["quantize"] == "8bit" and got["tolerance"] == 0.05
    assert isinstance(got["batch"], float) and "8bit" in describe(got)
