"""The logit lens over positions (--positions) and without special tokens (--vocab text)."""

import json

import pandas as pd
import pytest
import torch

import probes
from probes.methods.lens import positions_of, run_lens
from probes.methods.readout import special_ids
from probes.reports import plots
from probes.runs.execution import counts_text, special_top1
from probes.tasks.base import Item, answer_token
from probes.tasks.prompts import prompts_task

from .conftest import loaded

PROMPTS = [{"prompt": "The capital of France is", "answer": "Paris", "argument": "France"},
           {"prompt": "Q: What is the capital of Poland?\nA:", "answer": "Warsaw", "argument": "Poland"},
           {"prompt": "Rome", "answer": "Italy", "argument": "Rome"}]


def full_logits(lm, prompt: str) -> torch.Tensor:
    """The model's own logits at every position of `prompt`, run alone (no padding), with transformers."""
    ids = lm.tokenizer(prompt, return_tensors="pt")
    return lm.model._module(**ids).logits[0].float()


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-opt"])
def test_the_lens_at_every_position_of_a_padded_batch_ends_in_the_model_s_own_logits(name):
    lm = loaded(name)
    items = prompts_task(rows=PROMPTS).items()
    rows = pd.DataFrame(run_lens(lm, items, positions="all"))
    last = rows[rows.layer == lm.arch.n_layers]
    for it in items:
        logits = full_logits(lm, it.prompt)
        mine = last[last.item == it.index].sort_values("position")
        assert list(mine.position) == list(range(len(logits)))  # every token, none of the padding
        target = answer_token(lm.tokenizer, it)
        ranks = [(logits[p] > logits[p, target]).sum().item() for p in range(len(logits))]
        assert list(mine.answer_rank) == ranks
        assert list(mine.top1) == [lm.tokenizer.decode(logits[p].argmax().item()) for p in range(len(logits))]
        assert list(mine.token) == [lm.tokenizer.decode(t) for t in lm.tokenizer(it.prompt).input_ids]
    # the last position of a lens over all positions is the default lens, number for number
    default = pd.DataFrame(run_lens(lm, items))
    at_last = rows[rows.last_position].sort_values(["item", "layer"]).reset_index(drop=True)
    default = default.sort_values(["item", "layer"]).reset_index(drop=True)
    for col in ("answer_rank", "argument_rank", "top1", "topk", "position"):
        assert list(at_last[col]) == list(default[col]), col
    assert (at_last.answer_prob - default.answer_prob).abs().max() < 1e-5


def test_positions_name_tokens_by_index_from_either_end_or_by_slice():
    it = Item(0, "x", "y", "x", " y", "")
    assert positions_of("last", 5, it) == [4] and positions_of("all", 3, it) == [0, 1, 2]
    assert positions_of("0,-1,2", 5, it) == [0, 2, 4] and positions_of("-3:", 5, it) == [2, 3, 4]
    assert positions_of("1:3", 5, it) == [1, 2] and positions_of("-1,4", 5, it) == [4]


def test_a_lens_over_positions_summarizes_the_last_position_and_draws_heat_maps(tmp_path, monkeypatch):
    lm = loaded("tiny-llama")
    task = prompts_task(rows=PROMPTS)
    some = probes.run(lm, task, "logit-lens", positions="-2:")
    last = probes.run(lm, task, "logit-lens")
    assert some.summary["accuracy"] == last.summary["accuracy"] and some.summary["items"] == 3
    assert set(some.table.groupby("item").position.nunique()) == {2}
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    plots.plot_lens(some.table, {"model": "m", "task": "t"}, tmp_path / "p.png")
    images = [ax.images for ax in drawn[0].axes if ax.images]
    assert len(images) == 3  # one layer x position map per item, each with its colour bar
    assert len([ax for ax in drawn[0].axes if ax.get_ylabel() == "P(answer)"]) == 3
    labels = [t.get_text() for t in drawn[0].axes[0].get_xticklabels()]
    assert len(labels) == 2 and all(labels)


@pytest.mark.parametrize("probe", ["logit-lens", "accuracy", "ffn-ablation"])
def test_vocab_text_never_ranks_a_special_token_and_only_lowers_ranks(probe):
    lm = loaded("tiny-gpt2")
    task = prompts_task(rows=PROMPTS)
    special = {lm.tokenizer.decode(i) for i in special_ids(lm.tokenizer)}
    assert special  # <|endoftext|>
    full = probes.run(lm, task, probe).table
    text = probes.run(lm, task, probe, vocab="text").table
    assert (text.answer_rank <= full.answer_rank).all()
    column = "topk" if probe == "logit-lens" else "predicted"
    shown = {t for v in text[column] for t in (json.loads(v) if column == "topk" else [v])}
    assert not shown & special
    assert not text.special_top1.fillna(False).astype(bool).any()


def test_gemma_special_tokens_include_its_unflagged_image_markers():
    from probes.cli import _tokenizer

    tok = _tokenizer("gemma3-270m")
    ids = set(special_ids(tok))
    for marker in ("<start_of_image>", "<end_of_image>", "<bos>", "<pad>", "<unused0>"):
        assert tok.convert_tokens_to_ids(marker) in ids, marker
    for text in ("<table>", "\n\n", " Paris", "<h1>"):
        assert tok.convert_tokens_to_ids(tok.tokenize(text)[0]) not in ids, text


def test_a_run_whose_top1_is_often_special_says_so():
    table = pd.DataFrame({"item": [0, 0, 1, 2, 3, 3], "predicted": ["<s>", " a", "<s>", "<s>", " b", " c"],
                          "special_top1": [True, False, True, True, False, False]})
    s = special_top1(table)
    assert s == {"special_top1_rows": 3, "special_top1_of": 6, "special_top1_items": 3, "special_top1_token": "<s>"}
    base = {"scored_items": 4, "task_items": 4}
    assert "special token (most often '<s>') in 3 of 6 predictions, on 3 items; --vocab text" in counts_text(
        {**base, **s})
    assert "special" not in counts_text({**base, **special_top1(table.iloc[:2])})


def test_vocab_text_ranks_count_only_text_tokens_ahead_of_the_answer():
    lm = loaded("tiny-gpt2")
    items = prompts_task(rows=PROMPTS).items()
    rows = pd.DataFrame(run_lens(lm, items, positions="all", vocab="text"))
    last = rows[rows.layer == lm.arch.n_layers]
    special = torch.tensor(special_ids(lm.tokenizer))
    for it in items:
        logits = full_logits(lm, it.prompt)
        target = answer_token(lm.tokenizer, it)
        ahead = logits > logits[:, target:target + 1]
        ahead[:, special] = False
        text_probs = logits.index_fill(-1, special, float("-inf")).softmax(-1)[:, target]
        mine = last[last.item == it.index].sort_values("position")
        assert list(mine.answer_rank) == ahead.sum(-1).tolist()
        assert torch.allclose(torch.tensor(mine.answer_prob.to_numpy(), dtype=torch.float), text_probs, atol=1e-5)
