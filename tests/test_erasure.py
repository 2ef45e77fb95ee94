"""Concept erasure in the linear probe (--erase): the LEACE eraser leaves the label's classes with one mean on the
data it was fitted to, the random control removes as many directions, the edit lands exactly where a hand-written
hook puts it (and an identity edit changes nothing), a run reports clean / erased / control answers on the held-out
half, and bad layers are one-line errors."""

import json

import pandas as pd
import pytest
import torch

from probes.methods import erasure
from probes.tasks.base import Item

from .conftest import loaded
from .test_cli import probe


def test_leace_leaves_one_class_mean_and_the_control_removes_as_many_directions():
    g = torch.Generator().manual_seed(0)
    labels = ["a", "b", "c"] * 40
    offset = {"a": 0.0, "b": 3.0, "c": -2.0}
    x = torch.randn(120, 16, generator=g, dtype=torch.float64)
    x[:, 0] += torch.tensor([offset[y] for y in labels], dtype=torch.float64)  # the label lives on dimension 0
    items = [Item(i, f"p{i}", "", f"p{i}", " x", "") for i in range(120)]
    state = erasure.fit(None, items, labels, lambda its: x[[it.index for it in its]][:, None], 0, seed=0)
    fitted = sorted(state["fit"])
    assert state["rank"] == 2 and len(fitted) == 60  # half of each class
    erased = state["eraser"](x[fitted])
    for c in "bc":
        a = erased[[k for k, i in enumerate(fitted) if labels[i] == "a"]].mean(0)
        other = erased[[k for k, i in enumerate(fitted) if labels[i] == c]].mean(0)
        assert torch.allclose(a, other, atol=1e-8)  # no linear trace of the label left on the fitted half
    assert (x[fitted][:, 0].std() > 1.5) and not torch.allclose(erased, x[fitted])
    moved = state["control"](x) - x
    assert torch.linalg.matrix_rank(moved).item() == 2  # as many random directions as LEACE's rank


@pytest.mark.parametrize("site,layer", [("resid", 1), ("resid", 2), ("attn", 0), ("ffn", 1)])
def test_the_edit_lands_where_a_hook_puts_it_and_an_identity_edit_changes_nothing(site, layer):
    lm = loaded("tiny-gpt2")
    prompt = "The capital of France is the city of"
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    pos = ids.shape[1] - 1  # the last position, where the probe reads and erases by default
    hf = lm.arch.hf
    clean = erasure.edited_logits(lm, prompt, site, layer, pos, None)
    assert torch.equal(erasure.edited_logits(lm, prompt, site, layer, pos, lambda v: v), clean)
    edit = lambda v: v * 3.0 + 1.0  # noqa: E731
    got = erasure.edited_logits(lm, prompt, site, layer, pos, edit)
    blocks = hf.transformer.h

    def change(t):
        t = t.clone()
        t[0, pos] = edit(t[0, pos].float()).to(t.dtype)
        return t

    if site == "resid" and layer < len(blocks):
        hook = blocks[layer].register_forward_pre_hook(lambda m, args: (change(args[0]), *args[1:]))
    elif site == "resid":
        hook = blocks[-1].register_forward_hook(lambda m, i, o: (change(o[0]), *o[1:]) if isinstance(o, tuple) else change(o))
    elif site == "attn":
        hook = blocks[layer].attn.register_forward_hook(lambda m, i, o: (change(o[0]), *o[1:]))
    else:
        hook = blocks[layer].mlp.register_forward_hook(lambda m, i, o: change(o))
    try:
        with torch.no_grad():
            want = hf(ids).logits[0, -1].float()
    finally:
        hook.remove()
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, clean, atol=1e-3)


def test_a_run_with_erase_scores_the_held_out_half_and_bad_layers_are_one_line(tmp_path):
    out = tmp_path / "run"
    r = probe("run", "--model", "tiny-gpt2", "--task", "past-tense", "--probe", "linear-probe", "--erase", "1",
              "--limit", "40", "--task-option", "ambiguous=flag", "--output", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "erasure at layer 1 (LEACE, rank 1" in r.stdout
    table = pd.read_csv(out / "table.csv")
    per = table[table.layer == 0]
    assert set(per.erase_half) == {"fit", "scored"} and per.erase_clean.notna().sum() == (per.erase_half == "scored").sum()
    s = json.loads((out / "meta.json").read_text())["summary"]["erasure"]
    assert s["items"] == (per.erase_half == "scored").sum() and s["clean_n"] == s["items"]
    for bad, message in (("9", "bad --erase '9' for site resid; accepted: a layer 0..2"),
                         ("x", "bad --erase 'x'")):
        r = probe("run", "--model", "tiny-gpt2", "--task", "past-tense", "--probe", "linear-probe", "--erase", bad,
                  "--limit", "20", "--task-option", "ambiguous=flag", "--output", str(tmp_path / f"bad{bad}"))
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-1000:]
