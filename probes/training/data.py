"""A synthetic task's data and vocabulary for training, one `Generator` per task (`task.generator` of a config).

Every generator gives rows of (input_ids, target): target[p] is what position p is trained to output (IGNORE where
nothing is scored), over the generator's `readout` tokens (N-back: the two labels) or, without one, the whole
vocabulary (tree: the next token). The vocabulary is a `tokenizers` word-level tokenizer saved with the model.

N-back: the letters come from the same generator as the prompted N-back task (tasks/nback.py: exactly `matches`
targets at positions >= N, no accidental match anywhere), training sequences and test sequences from disjoint
indices. The model reads the letters alone; at each position from N on, its answer is its choice between the two
label tokens "m" (match) and "-". The vocabulary is a `tokenizers` word-level tokenizer saved with the model, so
the project's `nback` task files for trained models (tasks/nback-trained*.yaml) run on a checkpoint unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ProbeError
from ..tasks.nback import NBack
from ..tasks.tree import ORDERS, make_tree, vocabulary
from ..tasks import icl as icl_task
from . import icl, text

LABELS = ("-", "m")  # target 0: no match, 1: match
IGNORE = -100  # positions before N are not scored


def nback_generator(task: dict, n: int | None = None) -> NBack:
    """The N-back sequence generator of the training task (letters joined by spaces, no feedback)."""
    if set(task["letters"]) & set("".join(LABELS)) or len(set(task["letters"])) != len(task["letters"]):
        raise ProbeError(f"task letters {task['letters']!r}; accepted: distinct letters other than {LABELS}")
    return NBack(name="nback-train", version=1, kind="nback", seed=task["seed"], n=[n or task["n"]],
                 sequences=task["train"] + task["test"], length=task["length"], matches=task["matches"],
                 letters=task["letters"], instruction="", trial="{letter}", separator=" ", feedback=False)


def word_tokenizer(words: list[str], pad: str):
    """A word-level tokenizer over `words` (their order is their ids) split on whitespace, with `pad` padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no model_max_length: the model's positions bound its inputs (checked before a probe runs), and a probe
    # tokenizes a prompt with its answer, one token past the sequence, which is never fed to the model
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, unk_token="<unk>")


def tokenizer_for(task: dict):
    """The task's vocabulary: N-back: pad, unk, letters..., -, m; tree: the authors' 35 tokens, then unk; in-context
    classification: the labels "0".."L-1" (their ids are their indices), pad, unk; text: a BPE trained on the
    corpus's training documents."""
    if task["generator"] == "text":
        return text.tokenizer(task)
    if task["generator"] == "icl":
        return word_tokenizer([*icl_labels(task), "<pad>", "<unk>"], pad="<pad>")
    if task["generator"] == "tree":
        return word_tokenizer([*vocabulary(task["nodes"]), "<unk>"], pad=",")
    return word_tokenizer(["<pad>", "<unk>", *task["letters"], *LABELS], pad="<pad>")


def nback_splits(task: dict, tokenizer) -> dict:
    """{'train': Dataset, 'test': Dataset} of (input_ids, target) per sequence."""
    from datasets import Dataset

    gen = nback_generator(task)
    n = task["n"]
    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for s in range(task["train"] + task["test"]):
        letters, labels = gen.sequence(n, s)
        rows.append({"input_ids": ids(letters),
                     "target": [IGNORE if t < n else int(m) for t, m in enumerate(labels)]})
    return {"train": Dataset.from_list(rows[: task["train"]]), "test": Dataset.from_list(rows[task["train"]:])}


def tree_splits(task: dict, tokenizer) -> dict:
    """{'train': Dataset, 'test': Dataset}: trees 0..train-1 and the next `test` ones; the input is the sequence
    but its last token, the target the next token at the path's positions (each path node, then the two ","
    that end it, as the authors score them)."""
    from datasets import Dataset

    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for index in range(task["train"] + task["test"]):
        tree = make_tree(task["seed"], index, task["nodes"], task["order"])
        tokens = ids(tree.tokens(task["nodes"]))
        first, last = tree.start() + 1, tree.start() + len(tree.path) + 1  # target positions (token index)
        rows.append({"input_ids": tokens[:-1],
                     "target": [tokens[p + 1] if first <= p + 1 <= last else IGNORE for p in range(len(tokens) - 1)]})
    return {"train": Dataset.from_list(rows[: task["train"]]), "test": Dataset.from_list(rows[task["train"]:])}


def icl_labels(task: dict) -> tuple:
    return tuple(str(i) for i in range(task["labels"]))


def icl_splits(task: dict, tokenizer) -> dict:
    """{'train': fresh sequences (task.train of them per epoch), 'test': {in, ic, ic2, iw}: task.test each}."""
    return {"train": icl.Fresh(task, task["train"]), "test": {k: icl.Fixed(task, k, task["test"]) for k in icl_task.TESTS}}


def collate_ids(rows: list[dict]) -> dict:
    """Rows of equal-length token sequences (never padded: every generator's sequences have one length)."""
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "target": torch.tensor([r["target"] for r in rows])}


@dataclass(frozen=True)
class Generator:
    """What training needs of a synthetic task: its config fields (type, default), data, readout and names."""

    fields: dict  # name -> (type, default)
    splits: Callable  # (task, tokenizer) -> {'train': Dataset, 'test': Dataset}
    readout: Callable  # task -> the tokens the loss chooses among at each scored position; None: the whole vocabulary
    positions: Callable  # task -> input positions of a sequence
    run_name: Callable  # (task, seed) -> the run's folder name
    chance: Callable  # task -> the test accuracy of a model that always gives the commonest answer (None: unknown)
    summary: Callable  # task -> what a run trained on, in a few words
    collate: Callable = lambda splits: collate_ids  # the train split -> its batches' collate function
    eval_on_start: bool = False  # evaluate before the first step too (curves from step 0)
    extra_metrics: Callable | None = None  # (model, test splits) -> {name: value}, logged at every evaluation
    eval_batch: int = 64  # sequences per evaluation batch
    whole_sequences: bool = True  # also the accuracy of whole sequences (every scored position right)
    milestone: str | None = "eval_accuracy"  # the logged metric whose steps to 50% and 95% runs are compared on


GENERATORS = {
    "nback": Generator(
        {"generator": (str, "nback"), "n": (int, 2), "train": (int, 800), "test": (int, 200), "length": (int, 24),
         "matches": (int, 8), "letters": (str, "bcdfghjklnpqrstvwxyz"), "seed": (int, 0)},
        nback_splits, lambda t: LABELS, lambda t: t["length"], lambda t, seed: f"n{t['n']}-seed{seed}",
        lambda t: 1 - t["matches"] / (t["length"] - t["n"]), lambda t: f"N={t['n']}"),
    "tree": Generator(
        {"generator": (str, "tree"), "nodes": (int, 16), "train": (int, 135000), "test": (int, 15000),
         "order": (str, "mixed"), "seed": (int, 0)},
        tree_splits, lambda t: None, lambda t: 4 * t["nodes"] + 1, lambda t, seed: f"seed{seed}",
        lambda t: 1 / t["nodes"], lambda t: f"{t['nodes']}-node trees"),
    "icl": Generator(
        {**icl_task.FIELDS, "train": (int, 9_600_000)}, icl_splits, icl_labels, icl_task.length, lambda t, seed: f"seed{seed}",
        lambda t: 1 / t["labels"], lambda t: f"in-context classification, {t['pairs']} pairs",
        collate=lambda splits: icl.collate(splits["train"]), eval_on_start=True,
        extra_metrics=lambda model, test: {f"ic_{k}": v for k, v in icl.query_attention(model, test["ic"]).items()},
        eval_batch=1000, milestone="eval_ic_accuracy"),
    "text": Generator(
        text.FIELDS, text.splits, lambda t: None, lambda t: t["context"], lambda t, seed: f"seed{seed}",
        lambda t: None, lambda t: f"{t['corpus']}, {t['context']}-token blocks",
        extra_metrics=lambda model, test: text.icl_score(model, test), eval_batch=16, whole_sequences=False,
        milestone=None),
}


def check_task(task: dict, where: str) -> None:
    """Values a generator's types cannot say: tree orders and sizes, N-back letters, in-context classes."""
    if task["generator"] == "icl":
        icl_task.check(task, where)
    if task["generator"] == "text":
        text.check(task, where)
    if task["generator"] == "tree":
        if task["order"] not in ORDERS:
            raise ProbeError(f"{where}: task.order {task['order']!r}; accepted: {', '.join(ORDERS)}")
        if task["nodes"] < 3:
            raise ProbeError(f"{where}: task.nodes {task['nodes']}; accepted: 3 or more")
