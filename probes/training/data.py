"""A synthetic task's data and vocabulary for training, one `Generator` per task (`task.generator` of a config):
N-back and trees here, in-context classification in icl_data.py, language modelling in lm_data.py; `GENERATORS`
names them all.

Every generator gives rows of (input_ids, target): target[p] is what position p is trained to output (IGNORE where
nothing is scored), over the generator's `readout` tokens (N-back: the two labels) or, without one, the whole
vocabulary (tree: the next token). The vocabulary is a `tokenizers` word-level tokenizer saved with the model.

N-back: the letters come from the same generator as the prompted N-back task (tasks/nback_trials.py: exactly `matches`
targets at positions >= N, no accidental match anywhere), training sequences and test sequences from disjoint
indices. The model reads the letters alone; at each position its answer is its choice between the two label tokens
"m" (match) and "-". `loss: all` (the authors') trains every position, the first N labelled "-" (no letter N back:
position alone decides them); `loss: from-n` trains positions N on only. Every evaluation logs accuracy over all
positions and over positions >= N, and the authors' total entropy on the test sequences; the first training batch of
each epoch logs it too (the authors' statistic, whose minimum over epochs they report). The vocabulary is a `tokenizers` word-level tokenizer saved with the model, so
the project's `nback` task files for trained models (tasks/nback-trained*.yaml) run on a checkpoint unchanged.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import ProbeError
from ..methods.attention import total_entropies
from ..tasks.nback_trials import NBack
from ..tasks.tree import ORDERS, TOPOLOGICAL, make_tree, vocabulary
from . import icl_data, lm_data
from .generator import IGNORE, Generator, TensorRows, word_tokenizer

LABELS = ("-", "m")  # target 0: no match, 1: match
LOSSES = ("all", "from-n")  # which positions the N-back loss covers: every one (the authors'), or N on
TREE_LOSSES = ("path", "authors")  # the path and the two "," that end it, or every token after the root


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
    """{'train': TensorRows, 'test': TensorRows} of (input_ids, target) per sequence; the first N positions' target
    is "no match" (0) with `loss: all`, IGNORE with `loss: from-n`."""
    gen = nback_generator(task)
    n, skip = task["n"], task["loss"] == "from-n"
    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for s in range(task["train"] + task["test"]):
        letters, labels = gen.sequence(n, s)
        rows.append({"input_ids": ids(letters),
                     "target": [IGNORE if t < n and skip else int(m) for t, m in enumerate(labels)]})
    return {"train": TensorRows(rows[: task["train"]]), "test": TensorRows(rows[task["train"]:])}


def entropy_metrics(attentions: tuple, prefix: str) -> dict:
    """The authors' total entropy (attention averaged over the sequences, row entropies summed) of every layer and
    head: `<prefix>` alone for a 1-layer 1-head model, else `<prefix>_L<l>H<h>` each."""
    values = {(l, h): float(v) for l, a in enumerate(attentions) for h, v in enumerate(total_entropies(a.float()).tolist())}
    return {prefix if len(values) == 1 else f"{prefix}_L{l}H{h}": v for (l, h), v in values.items()}


@contextlib.contextmanager
def eager_attention(model):
    """transformers' families return attention probabilities from their eager attention only (SDPA gives none)."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before not in (None, "eager") and config.model_type != "probe_transformer":
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        if before is not None and config._attn_implementation != before:
            config._attn_implementation = before


def _attentions(model, input_ids) -> tuple:
    with eager_attention(model):
        out = model(input_ids=input_ids, output_attentions=True)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if not out.attentions or (n_layers and len(out.attentions) != n_layers):
        raise ProbeError(f"{model.config.model_type} returned no attention probabilities; accepted: a model whose "
                         "attention returns them (eager)")
    return out


@torch.no_grad()
def nback_metrics(model, test, task: dict) -> dict:
    """At each evaluation, on the test sequences: accuracy over all positions (the first N's answer is "no match")
    and over positions >= N, and the total entropy."""
    device = next(model.parameters()).device
    out = _attentions(model, test.columns["input_ids"].to(device))
    labels = tokenizer_for(task).convert_tokens_to_ids(list(LABELS))
    right = (out.logits[..., labels].argmax(-1).cpu() == test.columns["target"].clamp_min(0))  # IGNORE: no match
    return {"accuracy_all": float(right.float().mean()), "accuracy_from_n": float(right[:, task["n"]:].float().mean()),
            **entropy_metrics(out.attentions, "total_entropy")}


@torch.no_grad()
def nback_epoch_metrics(model, batch: dict, task: dict) -> dict:
    """At the first training batch of each epoch, before its step: the total entropy on that batch."""
    return entropy_metrics(_attentions(model, batch["input_ids"]).attentions, "first_batch_entropy")


def check_nback(task: dict, where: str) -> None:
    if task["loss"] not in LOSSES:
        raise ProbeError(f"{where}: task.loss {task['loss']!r}; accepted: {', '.join(LOSSES)}")


def tree_splits(task: dict, tokenizer) -> dict:
    """{'train': TensorRows, 'test': TensorRows}: trees 0..train-1 and the next `test` ones; the input is the
    sequence but its last token, the target the next token at the scored positions: `loss: path`, each path node
    then the two "," that end it; `loss: authors`, every token after the root through the padding (their mask)."""
    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for index in range(task["train"] + task["test"]):
        tree = make_tree(task["seed"], index, task["nodes"], task["order"], task["topological"])
        tokens = ids(tree.tokens(task["nodes"]))
        first = tree.start() + 1  # target positions (token index)
        last = len(tokens) - 1 if task["loss"] == "authors" else tree.start() + len(tree.path) + 1
        rows.append({"input_ids": tokens[:-1],
                     "target": [tokens[p + 1] if first <= p + 1 <= last else IGNORE for p in range(len(tokens) - 1)]})
    return {"train": TensorRows(rows[: task["train"]]), "test": TensorRows(rows[task["train"]:])}


def check_tree(task: dict, where: str) -> None:
    for key, accepted in (("order", ORDERS), ("topological", TOPOLOGICAL), ("loss", TREE_LOSSES)):
        if task[key] not in accepted:
            raise ProbeError(f"{where}: task.{key} {task[key]!r}; accepted: {', '.join(accepted)}")
    if task["nodes"] < 3:
        raise ProbeError(f"{where}: task.nodes {task['nodes']}; accepted: 3 or more")


def tree_chance(task: dict) -> float:
    """`loss: authors`: the share of "," among the scored tokens (nodes + 2 per tree, nodes / 2 of them path nodes
    on average: path lengths are uniform over 1..nodes-1); `loss: path`: one node in `nodes`."""
    return (task["nodes"] / 2 + 2) / (task["nodes"] + 2) if task["loss"] == "authors" else 1 / task["nodes"]


GENERATORS = {
    "nback": Generator(
        {"generator": (str, "nback"), "n": (int, 2), "train": (int, 800), "test": (int, 200), "length": (int, 24),
         "matches": (int, 8), "letters": (str, "bcdfghjklnpqrstvwxyz"), "seed": (int, 0), "loss": (str, "all")},
        check=check_nback,  # the letters: when the generator is built (nback_generator)
        tokenizer=lambda t: word_tokenizer(["<pad>", "<unk>", *t["letters"], *LABELS], pad="<pad>"),
        splits=nback_splits, readout=lambda t: LABELS, positions=lambda t: t["length"],
        run_name=lambda t, seed: f"n{t['n']}-seed{seed}",
        chance=lambda t: 1 - t["matches"] / (t["length"] - (t["n"] if t["loss"] == "from-n" else 0)),
        summary=lambda t: f"N={t['n']}", extra_metrics=nback_metrics, epoch_metrics=nback_epoch_metrics),
    "tree": Generator(
        {"generator": (str, "tree"), "nodes": (int, 16), "train": (int, 135000), "test": (int, 15000),
         "order": (str, "mixed"), "topological": (str, "bfs"), "loss": (str, "path"), "seed": (int, 0)},
        check=check_tree, tokenizer=lambda t: word_tokenizer([*vocabulary(t["nodes"]), "<unk>"], pad=","),
        splits=tree_splits, readout=lambda t: None, positions=lambda t: 4 * t["nodes"] + 1,
        run_name=lambda t, seed: f"seed{seed}", chance=tree_chance,
        summary=lambda t: f"{t['nodes']}-node trees"),
    "icl": icl_data.GENERATOR,
    "text": lm_data.GENERATOR,
}
