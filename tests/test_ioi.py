"""IOI prompts (tasks/ioi.py) and the logit-difference probe: two prompts per draw with the names' roles swapped,
the probe equal to the hand computation, SmolLM2 preferring the indirect object, patching pairs each prompt with
its twin, and bad task files as one-line errors."""

import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods.contrast import run_contrast
from probes.methods.patching import prepare_patching
from probes.tasks.base import answer_token
from probes.tasks.files import build_task

from .conftest import bundled, loaded


def ioi(**changes):
    return build_task({"name": "t", "version": 1, "kind": "ioi", "draws": 30, **changes})


def test_each_draw_gives_the_sentence_twice_with_the_roles_swapped():
    task = ioi()
    items = task.items()
    assert len(items) == 60 and [it.index for it in items] == list(range(60))
    for a, b in zip(items[::2], items[1::2]):
        io, s = a.extra["io"], a.extra["s"]
        assert (b.extra["io"], b.extra["s"]) == (s, io) and a.extra["draw"] == b.extra["draw"]
        for it in (a, b):
            words = it.prompt.replace(",", " ").replace(".", " ").split()
            assert words.count(it.extra["s"]) == 2 and words.count(it.extra["io"]) == 1
            assert it.answer == f" {it.extra['io']}" and it.argument == f" {it.extra['s']}"
        assert {a.group, b.group} == {"IO first", "S first"} and task.swapped(a) == b and task.swapped(b) == a
    assert ioi().items() == items and ioi(seed=1).items() != items  # seeded


@pytest.mark.parametrize("change, message", [
    ({"draws": 0}, "draws 0"),
    ({"templates": ["{A} met {B} at the {place}."]}, "must use {A}, {B} and {S}"),
    ({"templates": ["{A} and {B}: {S} gave {gift} to"]}, "accepted variables: {A}, {B}, {S}, {place}, {object}"),
    ({"names": ["Ann", "Ann"]}, "needs 2 or more distinct names"),
])
def test_bad_ioi_tasks_are_one_line_errors(change, message):
    with pytest.raises(ProbeError) as e:
        ioi(**change)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_logit_difference_equals_the_hand_computation():
    lm = loaded("tiny-llama")
    items = ioi(ambiguous="flag").items()[:6]
    rows = run_contrast(lm, items)
    tok = lm.tokenizer
    for it, row in zip(items, rows):
        with torch.no_grad():
            logits = lm.arch.hf(tok(it.prompt, return_tensors="pt").input_ids).logits[0, -1].float()
        a, s = answer_token(tok, it), answer_token(tok, it.__class__(**{**it.__dict__, "answer": it.argument}))
        assert row["logit_diff"] == pytest.approx(float(logits[a] - logits[s]), abs=1e-4)
        p = logits.softmax(-1)
        assert row["prob_diff"] == pytest.approx(float(p[a] - p[s]), abs=1e-5)
        assert row["answer_preferred"] == bool(logits[a] > logits[s])


def test_smollm2_prefers_the_indirect_object():
    lm = bundled("smollm2-135m")
    result = probes.run(lm, probes.task("ioi", draws=20), "logit-difference")
    s = result.summary
    assert s["items"] == 40 and s["answer_preferred_lo"] > 0.75 and s["logit_diff_lo"] > 2  # SmolLM2: 0.96, 4.4


def test_patching_pairs_each_prompt_with_its_twin():
    lm = bundled("smollm2-135m")  # names are one token each here, so twins have one length
    task = ioi()
    items = task.items()[:4]
    paired, _, meta = prepare_patching(lm, task, items, {})
    for it in paired:
        twin = task.swapped(it)
        assert it.extra["corrupted"] == twin.prompt and it.extra["corrupted_answer"] == twin.answer == it.argument
    assert meta["pairs"] == 4 and meta["unpaired"] == 0
