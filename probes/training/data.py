"""A synthetic task's data and vocabulary for training, one `Generator` per task (`task.generator` of a config):
N-back and trees here, in-context classification in icl_data.py, language modelling in lm_data.py; `GENERATORS`
names them all.

Every generator gives rows of (input_ids, target): target[p] is what position p is trained to output (IGNORE where
nothing is scored), over the generator's `readout` tokens (N-back: the two labels) or, without one, the whole
vocabulary (tree: the next token). The vocabulary is a `tokenizers` word-level tokenizer saved with the model.

N-back: the letters come from the same generator as the prompted N-back task (tasks/nback_trials.py: exactly `matches`
targets at positions >= N, no accidental match anywhere), training sequences and test sequences from disjoint
indices. The model reads the letters alone; at each position from N on, its answer is its choice between the two
label tokens "m" (match) and "-". The vocabulary is a `tokenizers` word-level tokenizer saved with the model, so
the project's `nback` task files for trained models (tasks/nback-trained*.yaml) run on a checkpoint unchanged.
"""

from __future__ import annotations

from ..errors import ProbeError
from ..tasks.nback_trials import NBack
from ..tasks.tree import ORDERS, make_tree, vocabulary
from . import icl_data, lm_data
from .generator import IGNORE, Generator, TensorRows, word_tokenizer

LABELS = ("-", "m")  # target 0: no match, 1: match


def nback_generator(task: dict, n: int | None = None) -> NBack:
    """The N-back sequence generator of the training task (letters joined by spaces, no feedback)."""
    if set(task["letters"]) & set("".join(LABELS)) or len(set(task["letters"])) != len(task["letters"]):
        raise ProbeError(f"task letters {task['letters']!r}; accepted: distinct letters other than {LABELS}")
    return NBack(name="nback-train", version=1, kind="nback", seed=task["seed"], n=[n or task["n"]],
                 sequences=task["train"] + task["test"], length=task["length"], matches=task["matches"],
                 letters=task["letters"], instruction="", trial="{letter}", separator=" ", feedback=False)


def tokenizer_for(task: dict):
    """The task's vocabulary (its generator's): N-back: pad, unk, letters..., -, m; tree: the authors' 35 tokens,
    then unk; in-context classification: the labels "0".."L-1" (their ids are their indices), pad, unk; text: a BPE
    trained on the corpus's training documents."""
    return GENERATORS[task["generator"]].tokenizer(task)


def nback_splits(task: dict, tokenizer) -> dict:
    """{'train': TensorRows, 'test': TensorRows} of (input_ids, target) per sequence."""
    gen = nback_generator(task)
    n = task["n"]
    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for s in range(task["train"] + task["test"]):
        letters, labels = gen.sequence(n, s)
        rows.append({"input_ids": ids(letters),
                     "target": [IGNORE if t < n else int(m) for t, m in enumerate(labels)]})
    return {"train": TensorRows(rows[: task["train"]]), "test": TensorRows(rows[task["train"]:])}


def tree_splits(task: dict, tokenizer) -> dict:
    """{'train': TensorRows, 'test': TensorRows}: trees 0..train-1 and the next `test` ones; the input is the
    sequence but its last token, the target the next token at the path's positions (each path node, then the two
    "," that end it, as the authors score them)."""
    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for index in range(task["train"] + task["test"]):
        tree = make_tree(task["seed"], index, task["nodes"], task["order"])
        tokens = ids(tree.tokens(task["nodes"]))
        first, last = tree.start() + 1, tree.start() + len(tree.path) + 1  # target positions (token index)
        rows.append({"input_ids": tokens[:-1],
                     "target": [tokens[p + 1] if first <= p + 1 <= last else IGNORE for p in range(len(tokens) - 1)]})
    return {"train": TensorRows(rows[: task["train"]]), "test": TensorRows(rows[task["train"]:])}


def check_tree(task: dict, where: str) -> None:
    if task["order"] not in ORDERS:
        raise ProbeError(f"{where}: task.order {task['order']!r}; accepted: {', '.join(ORDERS)}")
    if task["nodes"] < 3:
        raise ProbeError(f"{where}: task.nodes {task['nodes']}; accepted: 3 or more")


GENERATORS = {
    "nback": Generator(
        {"generator": (str, "nback"), "n": (int, 2), "train": (int, 800), "test": (int, 200), "length": (int, 24),
         "matches": (int, 8), "letters": (str, "bcdfghjklnpqrstvwxyz"), "seed": (int, 0)},
        check=lambda t, where: None,  # the letters: when the generator is built (nback_generator)
        tokenizer=lambda t: word_tokenizer(["<pad>", "<unk>", *t["letters"], *LABELS], pad="<pad>"),
        splits=nback_splits, readout=lambda t: LABELS, positions=lambda t: t["length"],
        run_name=lambda t, seed: f"n{t['n']}-seed{seed}", chance=lambda t: 1 - t["matches"] / (t["length"] - t["n"]),
        summary=lambda t: f"N={t['n']}"),
    "tree": Generator(
        {"generator": (str, "tree"), "nodes": (int, 16), "train": (int, 135000), "test": (int, 15000),
         "order": (str, "mixed"), "seed": (int, 0)},
        check=check_tree, tokenizer=lambda t: word_tokenizer([*vocabulary(t["nodes"]), "<unk>"], pad=","),
        splits=tree_splits, readout=lambda t: None, positions=lambda t: 4 * t["nodes"] + 1,
        run_name=lambda t, seed: f"seed{seed}", chance=lambda t: 1 / t["nodes"],
        summary=lambda t: f"{t['nodes']}-node trees"),
    "icl": icl_data.GENERATOR,
    "text": lm_data.GENERATOR,
}
