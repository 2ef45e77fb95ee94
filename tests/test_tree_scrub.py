"""tree-scrub, Brinkmann et al.'s causal scrubbing at the root (figures.ipynb, test_hypothesis_1), on a tiny model of
their architecture: a scrubbed activation that every tree shares changes nothing, a resampled run is what plain
PyTorch hooks compute, the sources meet the hypothesis and differ otherwise, bad input is one line."""

import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import probes
from probes.errors import ProbeError
from probes.methods.tree_scrub import draw_sources, first_step, up_node
from probes.runs.plan import plan_run
from probes.tasks.files import load_task
from probes.training.config import load_training_config
from probes.training.data import tokenizer_for
from probes.training.trainer import train

from .conftest import ROOT

AUTHORS = ROOT / "configs" / "training" / "tree-authors.yaml"
SMALL = {"model.n_layer": 2, "model.n_embd": 32, "model.n_inner": 64, "task.train": 256, "task.test": 16,
         "train.epochs": 2, "train.batch_size": 32, "train.eval_steps": 8, "train.save_steps": 16, "train.lr": 3e-3}
HELD_OUT = {"first_tree": 272, "trees": 300, "topological": "networkx"}  # after the 272 trees the run saw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Their block (probe_transformer, tree-authors) at 2 layers and width 32, 16 steps on 256 trees."""
    folder = tmp_path_factory.mktemp("scrub") / "run"
    train(load_training_config(AUTHORS, SMALL), folder, progress=False)
    return folder


def scrub(folder, limit=8, **options):
    return probes.run(probes.load(str(folder)), load_task("tree-trained-first", HELD_OUT), "tree-scrub",
                      limit=limit, **options).table


def test_a_scrubbed_activation_every_tree_shares_recovers_the_clean_run_exactly(run, tmp_path):
    """Block 1's attention projected to nothing but its bias: every tree has the same update at the root, so
    resampling it, from any tree, gives the clean run; block 0's update differs between trees and its scrub shows."""
    frozen = tmp_path / "frozen"
    shutil.copytree(run, frozen)
    model = AutoModelForCausalLM.from_pretrained(frozen)
    with torch.no_grad():
        model.model.layers[1].attn.out.weight.zero_()
    model.save_pretrained(frozen)
    df = scrub(frozen)
    same = df[df.block == 1]
    assert len(same) == 16 and set(same.condition) == {"matched", "random"}
    assert np.allclose(same.loss_scrubbed, same.loss_clean, atol=1e-6, rtol=0)
    assert np.allclose(same.recovered, 1.0, atol=1e-6) and same.agrees.all()
    assert (df[df.block == 0].loss_scrubbed - df[df.block == 0].loss_clean).abs().max() > 1e-3


def test_a_resampled_run_is_what_plain_pytorch_hooks_compute(run):
    df = scrub(run, limit=6)
    task = load_task("tree-trained-first", HELD_OUT)
    tok = tokenizer_for(load_training_config(AUTHORS)["task"])
    model = AutoModelForCausalLM.from_pretrained(run).eval()

    def ids(tree):
        return torch.tensor([tok(first_step(task.tree(tree), 16)).input_ids])

    for row in df.itertuples():
        attn, kept = model.model.layers[row.block].attn, {}

        def take(m, i, out):
            kept["root"] = out[0][:, -1].clone()

        keep = attn.register_forward_hook(take)
        with torch.no_grad():
            model(input_ids=ids(row.source_tree))
        keep.remove()

        def put(m, i, out):
            out[0][:, -1] = kept["root"]
            return out

        with torch.no_grad():
            clean = model(input_ids=ids(row.tree)).logits[0, -1].double().log_softmax(-1)
            hook = attn.register_forward_hook(put)
            scrubbed = model(input_ids=ids(row.tree)).logits[0, -1].double().log_softmax(-1)
            hook.remove()
        top, uniform = int(clean.argmax()), math.log(clean.shape[-1])
        assert uniform == pytest.approx(row.loss_uniform) and tok.decode(top) == row.clean_top
        assert -clean[top].item() == pytest.approx(row.loss_clean, abs=1e-5)
        assert -scrubbed[top].item() == pytest.approx(row.loss_scrubbed, abs=1e-5)
        want = (-scrubbed[top].item() - uniform) / (-clean[top].item() - uniform)
        assert want == pytest.approx(row.recovered, abs=1e-4)
    assert (df.loss_scrubbed - df.loss_clean).abs().max() > 1e-3  # the scrubs do change the runs compared


def their_inverse_path(path: tuple) -> list:
    """figures.ipynb get_inverse_path on "...:root>a>...>goal": the nodes after the root, goal first, padded with
    the root's child six times."""
    after_root = list(path[1:])
    return after_root[::-1] + [after_root[0]] * 6


def test_the_sources_meet_the_hypothesis_and_differ_otherwise():
    task = load_task("tree-trained-first", HELD_OUT)
    items = task.items()[:60]
    for it in items:
        path = task.tree(it.extra["tree"]).path
        assert [up_node(path, b) for b in range(6)] == their_inverse_path(path)[:6]
    blocks = list(range(6))
    sources = draw_sources(task, items, blocks, len)
    goals_differ, edges_differ, random_meets, pairs = 0, 0, 0, 0
    for it in items:
        t = it.extra["tree"]
        clean = task.tree(t)
        for b in blocks:
            if (b, "matched") not in sources[it.index]:
                continue
            m, r = (task.tree(sources[it.index][b, c]) for c in ("matched", "random"))
            assert sources[it.index][b, "matched"] != t and sources[it.index][b, "random"] != t
            assert len(m.path) - 1 > b and m.path[-1 - b] == up_node(clean.path, b)  # the hypothesis' class
            pairs += 1
            goals_differ += b > 0 and m.goal != clean.goal
            edges_differ += set(m.edges) != set(clean.edges)
            random_meets += len(r.path) - 1 > b and r.path[-1 - b] == up_node(clean.path, b)
    assert pairs >= 300  # most items have a matched tree at every block among 300
    assert edges_differ == pairs  # always another tree
    assert goals_differ > 0.8 * sum(1 for it in items for b in blocks[1:] if (b, "matched") in sources[it.index])
    assert random_meets < 0.2 * pairs  # the unconstrained baseline rarely meets the hypothesis by chance
    again = draw_sources(task, items[5:7], blocks, len)  # an item's sources do not depend on the other items
    assert again == {it.index: sources[it.index] for it in items[5:7]}


@pytest.mark.parametrize("task_options, options, message", [
    ({"steps": "all"}, {}, "probe 'tree-scrub' scrubs at the root, .* has steps: all; accepted: a task with steps: "
                           "first"),
    ({}, {"layers": "x"}, "bad --layers 'x'; accepted: 'all'"),
])
def test_bad_options_are_refused_in_one_line_before_loading(task_options, options, message):
    task = load_task("tree-trained-first", {**HELD_OUT, **task_options})
    with pytest.raises(ProbeError, match=message) as e:
        plan_run("tiny-gpt2", [task], "tree-scrub", options)
    assert "\n" not in str(e.value)
    with pytest.raises(ProbeError, match="probe 'tree-scrub' does not run on abstractive task 'capitals'; accepted: "
                                         "tree tasks"):
        plan_run("tiny-gpt2", [load_task("capitals")], "tree-scrub")


def test_a_block_past_the_model_or_a_pool_with_no_match_is_one_line(run):
    with pytest.raises(ProbeError, match="--layers 2 out of range; accepted: blocks 0 to 1") as e:
        scrub(run, layers="2")
    assert "\n" not in str(e.value)
    lone = load_task("tree-trained-first", {**HELD_OUT, "trees": 1})
    with pytest.raises(ProbeError, match="no tree of task 'tree-trained-first' has another with the same node .* "
                                         "accepted: more trees") as e:
        probes.run(probes.load(str(run)), lone, "tree-scrub")
    assert "\n" not in str(e.value)


def test_the_report_gives_both_conditions_per_block_and_the_figure_by_path_length(run):
    result = probes.run(probes.load(str(run)), load_task("tree-trained-first", HELD_OUT), "tree-scrub", limit=8)
    s = result.summary
    assert s["trees"] == 8 and s["clean_right_n"] == 8
    for block in (0, 1):
        for cond in ("matched", "random"):
            got = s["blocks"][block][cond]
            assert got["recovered_n"] == 8 and got["agrees_n"] == 8 and got["recovered_lo"] <= got["recovered"]
            assert sum(v["recovered_n"] for v in got["by_length"].values()) == 8
    assert "block 1: matched" in result.report and "; random" in result.report
    assert "by block (rows) and path length (columns)" in result.report


def test_the_table_does_not_depend_on_the_batch_or_the_items_order(run):
    """The metamorphic battery's relations (tests/test_metamorphic.py runs them on tiny random families, which no
    tree task fits) on the tree model: batch 1 against the default, and the items reversed."""
    import pandas as pd

    task = load_task("tree-trained-first", HELD_OUT)
    model = probes.load(str(run))
    base = probes.run(model, task, "tree-scrub", limit=6).table
    one = probes.run(model, task, "tree-scrub", limit=6, batch_size=1).table
    pd.testing.assert_frame_equal(one, base, check_exact=False, rtol=1e-5, atol=1e-6)
    items = task.scored_items

    def reversed_items(tokenizer, limit=None, inputs=None):
        got, reasons = items(tokenizer, limit, inputs)
        return got[::-1], reasons

    task.scored_items = reversed_items
    back = probes.run(model, task, "tree-scrub", limit=6).table
    back = back.sort_values(["item", "block", "condition"], kind="stable").reset_index(drop=True)
    ordered = base.sort_values(["item", "block", "condition"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, ordered, check_exact=False, rtol=1e-5, atol=1e-6)
