"""Tree path-finding (Brinkmann et al.): the generator's invariants, the authors' token positions, training targets
on the path alone, a trained run that loads as a model and is probed on held-out trees, and bad configs."""

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

import probes
from probes.errors import ProbeError
from probes.tasks.files import load_task
from probes.tasks.tree import make_tree, vocabulary
from probes.training.config import load_training_config
from probes.training.data import IGNORE, tokenizer_for, tree_splits

from .conftest import TREE_TINY
from .test_cli import probe

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "configs" / "training" / "tree-paper.yaml"
TINY = TREE_TINY


@pytest.mark.parametrize("order", ["mixed", "forward", "random"])
def test_trees_are_binary_with_sixteen_nodes_a_leaf_goal_and_a_valid_path(order):
    lengths = Counter()
    for index in range(600):
        tree = make_tree(3, index, 16, order)
        parents = Counter(a for a, _ in tree.edges)
        children = [b for _, b in tree.edges]
        assert len(tree.edges) == 15 and max(parents.values()) <= 2  # binary, 15 edges
        assert sorted(children + [tree.root]) == list(range(16))  # every node but the root has one parent
        assert tree.goal not in parents  # the goal is a leaf
        assert tree.path[0] == tree.root and tree.path[-1] == tree.goal
        assert all(edge in tree.edges for edge in zip(tree.path, tree.path[1:]))  # the path follows edges
        if len(tree.path) < 16:
            assert parents[tree.root] == 2  # the second branch from the root
        if order == "forward" or (order == "mixed" and index % 2 == 0):  # topological, or reversed topological
            seen = {tree.root}
            for a, b in tree.edges if order == "forward" else tree.edges[::-1]:
                assert a in seen  # a parent's edge comes before its children's
                seen.add(b)
        tokens = tree.tokens(16)
        assert len(tokens) == 66 and tokens[44] == "|" and tokens[45] == str(tree.goal) and tokens[46] == ":"
        assert tokens[47] == str(tree.root) and tree.start() == 47
        assert tokens[48:48 + len(tree.path) - 1] == [f">{v}" for v in tree.path[1:]]
        assert set(tokens[48 + len(tree.path) - 1:]) == {","}
        lengths[len(tree.path) - 1] += 1
    assert set(lengths) == set(range(1, 16))  # paths of every length 1..15


def test_the_vocabulary_is_the_authors_and_targets_are_the_path_and_its_end():
    task = load_training_config(PAPER, TINY)["task"]
    tok = tokenizer_for(task)
    assert vocabulary(16)[:3] == [",", ":", "|"] and len(vocabulary(16)) == 35 and len(tok) == 36
    data = tree_splits(task, tok)
    for split, first in (("train", 0), ("test", 256)):
        for i, row in enumerate(data[split].select(range(8))):
            tree = make_tree(0, first + i, 16, "mixed")
            ids = tok.convert_tokens_to_ids(tree.tokens(16))
            assert row["input_ids"] == ids[:-1] == tok(" ".join(tree.tokens(16)[:-1])).input_ids
            scored = [p for p, t in enumerate(row["target"]) if t != IGNORE]
            steps = len(tree.path) - 1
            assert scored == list(range(47, 47 + steps + 2))  # each path node, then the two "," that end it
            assert [row["target"][p] for p in scored] == ids[48:48 + steps + 2]


def test_bad_tree_configs_are_one_line_errors():
    for change, message in (({"task.order": "sideways"}, "task.order 'sideways'; accepted: mixed, forward"),
                            ({"task.nodes": 2}, "task.nodes 2; accepted: 3 or more"),
                            ({"task.n": 2}, "unknown task field 'n'; accepted: generator, nodes"),
                            ({"train.schedule": "cosine"}, "train.min_lr goes with schedule cosine_with_min_lr")):
        with pytest.raises(ProbeError, match=message):
            load_training_config(PAPER, change)


@pytest.fixture(scope="module")
def tiny_run(tree_run):
    return tree_run


def test_a_trained_tree_model_loads_and_is_probed_on_held_out_trees_by_path_length(tiny_run, tmp_path):
    meta = json.loads((tiny_run / "meta.json").read_text())
    assert meta["status"] == "complete" and {"eval_accuracy", "eval_sequence_accuracy"} <= set(meta["final"])
    log = pd.read_csv(tiny_run / "log.csv")
    assert log.loss.dropna().iloc[-1] < log.loss.dropna().iloc[0]  # it learns something in 40 steps
    task = load_task("tree-trained", {"first_tree": 256, "trees": 12})
    model = probes.load(str(tiny_run))
    items = task.items()
    tree = make_tree(0, 256, 16, "mixed")
    assert items[0].prompt == " ".join(tree.tokens(16)[:48]) and items[0].answer == f" >{tree.path[1]}"
    ids = model.tokenizer(items[1].prompt).input_ids
    assert ids == model.tokenizer.convert_tokens_to_ids(tree.tokens(16)[:49])  # the training tokens exactly
    result = probes.run(model, task, "accuracy")
    assert result.summary["items"] == len(items) == sum(len(make_tree(0, t).path) - 1 for t in range(256, 268))
    assert set(result.summary["by_group"]) == {str(len(make_tree(0, t).path) - 1) for t in range(256, 268)}
    r = probe("run", "--model", str(tiny_run), "--task", "tree-trained", "--task-option", "first_tree=256",
              "--task-option", "trees=6", "--probe", "logit-lens", "--output", str(tmp_path / "lens"))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and (tmp_path / "lens" / "plot.png").exists()


def test_items_carry_the_nodes_up_the_path_from_the_goal():
    task = load_task("tree-trained", {"trees": 30, "steps": "first"})
    items = task.items()
    assert len(items) == 30 and all(it.extra["step"] == 0 for it in items)
    for it in items:
        path = [int(v) for v in it.extra["path"].split()]
        assert it.extra["up0"] == str(path[-1]) == it.argument.strip()
        assert it.extra[f"up{len(path) - 1}"] == str(path[0]) == it.prompt.split()[-1]  # the root ends the prompt
        assert all(it.extra[f"up{k}"] == "-" for k in range(len(path), 16))


def test_patching_pairs_are_another_tree_at_the_same_step_with_another_answer(tiny_run):
    from probes.methods.patching import prepare_patching

    model = probes.load(str(tiny_run))
    task = load_task("tree-trained", {"first_tree": 256, "trees": 20})
    items = task.items()
    paired, _, meta = prepare_patching(model, task, items, {})
    # a step only one tree reaches has no partner: left out, and counted
    assert meta["pairs"] == len(paired) > 0.9 * len(items) and meta["unpaired"] == len(items) - len(paired)
    tok = model.tokenizer
    for it in paired:
        other = make_tree(0, it.extra["corrupted_input"])
        assert it.extra["corrupted_input"] != it.extra["tree"] and it.extra["corrupted_answer"] != it.answer
        assert len(tok(it.extra["corrupted"]).input_ids) == len(tok(it.prompt).input_ids)
        assert it.extra["corrupted"] == " ".join(other.tokens(16)[:48 + it.extra["step"]])


def test_several_labels_are_probed_on_the_same_activations_as_one_label_each(tiny_run):
    model = probes.load(str(tiny_run))
    task = load_task("tree-trained", {"first_tree": 256, "trees": 120, "steps": "first"})
    both = probes.run(model, task, "linear-probe", label="up0,up1")
    assert set(both.summary["labels"]) == {"up0", "up1"}
    for name in ("up0", "up1"):
        alone = probes.run(model, task, "linear-probe", label=name).summary
        mine = both.summary["labels"][name]
        assert mine["layers"] == alone["layers"] and mine["classes"] == alone["classes"]
        assert mine["left_out"] == alone["left_out"]
    assert "held-out accuracy by label and layer" in both.report and "up1 " in both.report


def test_whole_path_accuracy_counts_the_trees_with_every_step_right():
    from probes.methods.accuracy import summarize_accuracy

    df = pd.DataFrame({"tree": [1, 1, 2, 2, 2, 3, 4], "group": ["2", "2", "3", "3", "3", "1", "1"],
                       "path_length": [2, 2, 3, 3, 3, 1, 1],
                       "correct": [True, True, True, False, True, True, False]}).assign(consistent=lambda d: d.correct)
    s = summarize_accuracy(df)
    assert (s["accuracy_k"], s["accuracy_n"]) == (5, 7) and (s["whole_accuracy_k"], s["whole_accuracy_n"]) == (2, 4)
    assert list(s["by_group"]) == ["1", "2", "3"]  # path lengths in numeric order
    assert (s["by_group"]["1"]["whole_accuracy_k"], s["by_group"]["1"]["whole_accuracy_n"]) == (1, 2)
    assert (s["by_group"]["3"]["whole_accuracy_k"], s["by_group"]["3"]["whole_accuracy_n"]) == (0, 1)


def test_whole_path_accuracy_needs_every_step_of_each_tree():
    from probes.methods.accuracy import summarize_accuracy

    df = pd.DataFrame({"tree": [1, 1, 2], "path_length": [2, 2, 2], "group": ["2", "2", "2"],
                       "correct": [True, True, True]}).assign(consistent=lambda d: d.correct)
    assert "whole_accuracy" not in summarize_accuracy(df)  # tree 2 has one of its two steps (a --limit sample)
    assert summarize_accuracy(df.iloc[:2])["whole_accuracy_k"] == 1


def test_goal_corruption_keeps_the_tree_and_swaps_the_goal_for_a_leaf_that_turns_elsewhere():
    task = load_task("tree-trained", {"trees": 40, "corrupt": "goal"})
    found = 0
    for it in task.items():
        other = task.other_goal(it)
        if other is None:
            continue
        found += 1
        corrupted, answer = other
        a, b = it.prompt.split(" "), corrupted.split(" ")
        assert len(a) == len(b) and [i for i in range(len(a)) if a[i] != b[i]] == [45]  # only the goal token
        tree = task.tree(it.extra["tree"])
        leaf = int(b[45])
        assert leaf not in {x for x, _ in tree.edges} and leaf != tree.goal  # another leaf
        assert answer != it.answer and (tree.path[it.extra["step"]], int(answer.strip()[1:])) in tree.edges
    first = [it for it in task.items() if it.extra["step"] == 0 and it.extra["path_length"] < 15]
    assert found >= len(first) and all(task.other_goal(it) for it in first)  # the root's second branch: always
    with pytest.raises(ProbeError, match="corrupt 'leaf'; accepted: tree, goal"):
        load_task("tree-trained", {"corrupt": "leaf"})


def test_positions_by_meaning_are_the_goal_root_and_edges_up_the_path_for_any_tokenizer(tiny_run):
    from probes.methods.positions import named_positions, resolve_positions

    task = load_task("tree-trained", {"first_tree": 256, "trees": 30})
    tree_tok = probes.load(str(tiny_run)).tokenizer
    bpe = probes.load("tiny-gpt2").tokenizer
    for it in task.items():
        path = [int(v) for v in it.extra["path"].split()]
        words = it.prompt.split(" ")
        named = named_positions(tree_tok, it)  # word-level: a token is a word
        assert words[named["bar"]] == "|" and words[named["colon"]] == ":" and named["root"] == 47
        assert words[named["goal"]] == str(it.extra["goal"]) and words[named["root"]] == str(path[0])
        assert [words[named[f"edge_up{k}"]] for k in range(len(path) - 1)] == [f">{v}" for v in reversed(path[1:])]
        assert f"edge_up{len(path) - 1}" not in named  # the root has no edge into it
        ids = bpe(it.prompt).input_ids
        for name, at in named_positions(bpe, it).items():  # another tokenizer: the token holding that word
            if name != "argument":
                word = words[named[name]]
                assert word.lstrip(">") in bpe.decode(ids[at]) or bpe.decode(ids[at]).strip() in word, (name, word)
        step = it.extra["step"]  # the last token is the root at the first step (then once only)
        want = [named["goal"], 47] + ([47 + step] if step else [])
        assert resolve_positions("goal,root,last", 48 + step, named) == want
    with pytest.raises(ProbeError, match="unknown patching position 'registers'; accepted: all, whole, last, argument, bar"):
        resolve_positions("registers", 48, named)


def test_the_linear_probe_reads_a_named_position(tiny_run):
    model = probes.load(str(tiny_run))
    task = load_task("tree-trained", {"first_tree": 256, "trees": 40, "steps": "first"})
    at_goal = probes.run(model, task, "linear-probe", label="up0", position="goal")
    rows = at_goal.table[at_goal.table.layer == 0]
    assert (rows.token_index == 45).all()  # the goal token, in every first-step prompt
    with pytest.raises(ProbeError, match="unknown probe position 'middle'; accepted: last, argument, bar, goal"):
        probes.run(model, task, "linear-probe", label="up0", position="middle")
    # several positions (the authors' registers are token indices): one probe each on the same forward passes
    several = probes.run(model, task, "linear-probe", label="up0,up1", position="goal,36,-1")
    assert list(several.summary["positions"]) == ["goal", "36", "-1"]
    assert several.summary["positions"]["goal"]["labels"]["up0"]["layers"] == at_goal.summary["layers"]  # same fits
    t = several.table
    assert sorted(t[t.layer == 0].groupby("position").token_index.unique().map(list).tolist()) == [[36], [45], [47]]
    mine = t[t.position.astype(str) == "goal"].sort_values(["item", "layer"]).vector.tolist()
    assert mine == at_goal.table.sort_values(["item", "layer"]).vector.tolist()  # the same vectors as alone
    assert "position 36: held-out accuracy by label and layer" in several.report
    with pytest.raises(ProbeError, match="probe position 48 is outside the prompt of item 0 \\(48 tokens\\)"):
        probes.run(model, task, "linear-probe", label="up0", position="48")

