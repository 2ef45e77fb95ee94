"""Repeated random sequences (tasks/repeat.py) and the induction probe: the score equals the attention read by hand,
SmolLM2 has induction heads and copies from context, and the probe refuses other tasks in one line."""

import pytest
import torch

import probes
from probes.errors import ProbeError
from probes.methods.induction import run_induction
from probes.tasks.files import build_task
from probes.tasks.repeat import repeat_start

from .conftest import bundled, loaded
from .test_cli import probe


def repeat(**changes):
    return build_task({"name": "r", "version": 1, "kind": "repeat", "sequences": 3, "length": 8, **changes})


def test_each_item_is_a_segment_said_twice_and_tokenizes_so():
    items = repeat().items()
    for it in items:
        half = it.prompt[: len(it.prompt) // 2]
        assert it.prompt == half + half and half.startswith(" ") and len(set(half.split())) == 8
    for name in ("tiny-gpt2", "tiny-llama"):  # without and with a BOS token
        tok = loaded(name).tokenizer
        ids = tok(items[0].prompt).input_ids
        start = repeat_start(tok, items[0].prompt)
        k = len(ids) - start
        assert ids[start - k:start] == ids[start:]
    assert repeat().items() == items and repeat(seed=1).items() != items


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_the_score_is_the_attention_to_the_token_after_the_first_occurrence(name):
    lm = loaded(name, attn_implementation="eager")
    it = repeat().items()[0]
    rows = run_induction(lm, [it])
    ids = torch.tensor([lm.tokenizer(it.prompt).input_ids])
    with torch.no_grad():
        attn = lm.arch.hf(ids, output_attentions=True).attentions
    start = repeat_start(lm.tokenizer, it.prompt)
    k = ids.shape[1] - start
    for row in (r for r in rows if r["head"] is not None):
        w = attn[row["layer"]][0, row["head"]]
        expected = torch.stack([w[q, q - k + 1] for q in range(start + 1, ids.shape[1])]).mean()
        assert row["score"] == pytest.approx(float(expected), abs=1e-5)
    loss = [r for r in rows if r["head"] is None][0]
    logits = lm.arch.hf(ids).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
    assert loss["loss_repeat"] == pytest.approx(float(nll[start:].mean()), abs=1e-4)
    assert loss["loss_first"] == pytest.approx(float(nll[start - k:start - 1].mean()), abs=1e-4)


def test_smollm2_has_induction_heads_and_copies_from_context():
    bundled("smollm2-135m")  # the package it comes from is installed
    lm = loaded("smollm2-135m", attn_implementation="eager")
    s = probes.run(lm, probes.task("repeat", sequences=6), "induction").summary
    assert s["induction_heads"] and s["heads"][s["best_head"]]["score"] > 0.6  # SmolLM2: 18.6 at 0.92
    assert s["loss_drop_lo"] > 3  # 9.6 nats on the first pass, 1.7 on the repeat


def test_the_induction_probe_refuses_other_tasks_in_one_line(tmp_path):
    r = probe("run", "--model", "tiny-gpt2", "--task", "capitals", "--probe", "induction", "--output", str(tmp_path))
    assert r.returncode == 2 and "probe 'induction' does not run on abstractive task 'capitals'; accepted: repeat" \
        in r.stderr and len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ProbeError, match="accepted: 1 or more sequences of 2 to"):
        repeat(length=1)
