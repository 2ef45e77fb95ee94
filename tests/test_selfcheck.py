"""The self-check before every run's first batch: it passes on every family, and each check fails on a model made
to break it (an architecture table pointing at the wrong module, a model whose output depends on its padding)."""

import dataclasses
import json

import pytest

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
    with pytest.raises(ProbeError, match="a left-padded prompt does not get the logits it gets alone"):
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
