"""Reddy's (2024) in-context classification task, as Burns, Fukai & Earls ran it (their public toy-Transformer code).

A sequence is `pairs` (item, label) pairs then a query item: 2 * pairs + 1 vectors of `2 * max_pairs + 1 + item_dim`
dimensions (8 pairs, 32, 85: 17 vectors of 150). The first 2 * max_pairs + 1 dimensions hold the position as a
one-hot, shifted by a random offset per sequence; the rest hold the content:

    item of class k   e * (mu_k + noise * z / sqrt(item_dim)),  e = 1 / sqrt(1 + noise^2),  z ~ N(0, I)
    label l           lambda_l (no noise)
    class k's label   k mod labels

with class means mu (classes x item_dim) and label vectors lambda (labels x item_dim) drawn N(0, I / item_dim) from
the task's seed. The model answers the query's label (a `labels`-way choice). Kinds of sequence:

    bursty   pairs / burstiness classes with distinct labels, each `burstiness` times, shuffled; the query is one of
             them (the in-context solution works)
    plain    every item's class and the query's drawn independently from the `classes` (only the in-weights
             solution works, mostly)
    novel    bursty, over classes drawn fresh for the sequence (never seen in training twice: only in-context)

Training draws novel sequences with probability p_novel, else bursty with probability p_bursty, else plain; fresh
sequences at every step. The test sets (the authors' four): `in` (the training mixture), `ic` (all novel), `ic2`
(known classes, bursty, every context label shifted by one: the answer is the shifted label, which only the context
tells) and `iw` (plain, with the query's class absent from the context, as Reddy defines it; the authors' code
draws it independently, so it is present in about 1.6% of their sequences).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ProbeError
from .base import Item, Task, VectorPrompt, paired
from .kinds import register_kind

TESTS = ("in", "ic", "ic2", "iw")
FIELDS = {"generator": (str, "icl"), "classes": (int, 512), "labels": (int, 32), "pairs": (int, 8),
          "max_pairs": (int, 32), "item_dim": (int, 85), "burstiness": (int, 2), "p_bursty": (float, 0.5),
          "p_novel": (float, 0.5), "noise": (float, 0.1), "zipf": (float, 0.0), "test": (int, 10000),
          "seed": (int, 0)}


def check(task: dict, where: str) -> None:
    """Values the field types cannot say, each as one line."""
    if task["classes"] % task["labels"] or task["classes"] < task["labels"]:
        raise ProbeError(f"{where}: task.classes {task['classes']} is not a multiple of task.labels "
                         f"{task['labels']}; accepted: classes = labels x an integer")
    if task["pairs"] % task["burstiness"] or task["burstiness"] >= task["pairs"]:
        raise ProbeError(f"{where}: task.burstiness {task['burstiness']} must divide task.pairs {task['pairs']} "
                         "and be smaller; accepted: e.g. burstiness 2 with 8 pairs")
    if task["pairs"] // task["burstiness"] > task["labels"]:
        raise ProbeError(f"{where}: {task['pairs'] // task['burstiness']} classes per context need distinct labels, "
                         f"but task.labels is {task['labels']}; accepted: pairs / burstiness <= labels")
    if task["pairs"] > task["max_pairs"]:
        raise ProbeError(f"{where}: task.pairs {task['pairs']} > task.max_pairs {task['max_pairs']}; accepted: "
                         "pairs <= max_pairs")
    for key in ("p_bursty", "p_novel"):
        if not 0 <= task[key] <= 1:
            raise ProbeError(f"{where}: task.{key} {task[key]}; accepted: a probability in [0, 1]")
    if task["noise"] < 0 or task["zipf"] < 0:
        raise ProbeError(f"{where}: task.noise and task.zipf must be >= 0; accepted: e.g. noise 0.1, zipf 0")


def width(task: dict) -> int:
    """The vectors' dimension (the model's width): the shifted one-hot position, then the content."""
    return 2 * task["max_pairs"] + 1 + task["item_dim"]


def length(task: dict) -> int:
    return 2 * task["pairs"] + 1


class Classes:
    """The task's fixed draws: class means, label vectors, each class's label, and the class frequencies."""

    def __init__(self, task: dict):
        rng = np.random.default_rng([task["seed"], 0])
        d = task["item_dim"]
        self.task = task
        self.label_vectors = rng.normal(size=(task["labels"], d)) / np.sqrt(d)
        self.means = rng.normal(size=(task["classes"], d)) / np.sqrt(d)
        self.label_of = np.arange(task["classes"]) % task["labels"]
        p = 1.0 / np.arange(1, task["classes"] + 1) ** task["zipf"]
        self.p = p / p.sum()

    def sample(self, n: int, rng: np.random.Generator, kind: str) -> dict:
        """n sequences of one kind ('train' and 'in' mix them): {'inputs_embeds' (n, T, width) float32, 'target' (n,)
        label index, 'classes' (n, pairs + 1) class per item (query last; -1 for novel ones), 'labels' (n, pairs)
        context labels, 'match' (n, pairs) whether a context item is of the query's class}."""
        t, P, L = self.task, self.task["pairs"], self.task["labels"]
        if kind in ("train", "in"):
            novel = rng.random(n) < t["p_novel"]
            bursty = ~novel & (rng.random(n) < t["p_bursty"])
        else:
            novel, bursty = np.full(n, kind == "ic"), np.full(n, kind == "ic2")
        classes = np.empty((n, P + 1), dtype=np.int64)
        labels = np.empty((n, P + 1), dtype=np.int64)
        d = t["item_dim"]
        content = np.empty((n, P + 1, d))
        # bursty contexts (known or novel classes): pairs / burstiness classes with distinct labels
        m = P // t["burstiness"]
        chosen_labels = np.argsort(rng.random((n, L)), axis=1)[:, :m]  # distinct labels per sequence
        known = chosen_labels + L * rng.integers(0, t["classes"] // L, size=(n, m))
        slots = np.argsort(rng.random((n, P)), axis=1) % m  # each of the m classes `burstiness` times, shuffled
        query_slot = rng.integers(0, m, size=n)
        rows = np.arange(n)[:, None]
        classes[:, :P] = known[rows, slots]
        classes[:, P] = known[np.arange(n), query_slot]
        labels[:] = self.label_of[classes]
        plain = ~bursty & ~novel
        if plain.any():  # every item and the query independent (iw: the query's class absent from the context)
            k = int(plain.sum())
            cls = rng.choice(t["classes"], size=(k, P + 1), p=self.p)
            if kind == "iw":
                for i in np.flatnonzero((cls[:, :P] == cls[:, P:]).any(1)):
                    while cls[i, P] in cls[i, :P]:
                        cls[i, P] = rng.choice(t["classes"], p=self.p)
            classes[plain], labels[plain] = cls, self.label_of[cls]
        content[:] = self.means[classes]
        if novel.any():  # fresh means, one per context class; their labels the bursty draw's distinct labels
            k = int(novel.sum())
            fresh = rng.normal(size=(k, m, d)) / np.sqrt(d)
            content[novel, :P] = fresh[np.arange(k)[:, None], slots[novel]]
            content[novel, P] = fresh[np.arange(k), query_slot[novel]]
            labels[novel, :P] = chosen_labels[novel][np.arange(k)[:, None], slots[novel]]
            labels[novel, P] = chosen_labels[novel][np.arange(k), query_slot[novel]]
            classes[novel] = -1
        if kind == "ic2":  # the context teaches each class the next label; the answer follows the context
            labels = (labels + 1) % L
        e = 1 / np.sqrt(1 + t["noise"] ** 2)
        content = e * (content + t["noise"] * rng.normal(size=content.shape) / np.sqrt(d))
        x = np.zeros((n, length(t), width(t)), dtype=np.float32)
        pos = 2 * t["max_pairs"] + 1
        x[:, 0:-1:2, pos:] = content[:, :P]
        x[:, 1:-1:2, pos:] = self.label_vectors[labels[:, :P]]
        x[:, -1, pos:] = content[:, P]
        shift = rng.integers(0, pos - length(t) + 1, size=n)
        x[np.arange(n)[:, None], np.arange(length(t)), shift[:, None] + np.arange(length(t))] = 1.0
        match = np.where(novel[:, None], slots == query_slot[:, None], classes[:, :P] == classes[:, P:])
        return {"inputs_embeds": x, "target": labels[:, P], "classes": classes, "labels": labels[:, :P],
                "match": match}


def query_mass(query, match):
    """The query's attention on the context items of its class and on their labels, (item mass, label mass) each
    of shape (...): `query` (..., positions) is the query's attention over a sequence (items at even positions, each
    label after its item, the query last), `match` (..., pairs) 1 where a context item is of the query's class. The
    one computation of this measure, for the training log (icl_data.py) and the attention probe alike."""
    return (query[..., 0:-1:2] * match).sum(-1), (query[..., 1:-1:2] * match).sum(-1)


def test_set(task: dict, kind: str, n: int) -> dict:
    """Test set `kind` of `n` sequences, drawn once from the task's seed (training logs its accuracy on it)."""
    return Classes(task).sample(n, np.random.default_rng([task["seed"], 2, TESTS.index(kind)]), kind)


@register_kind("icl")
@dataclass
class IclTask(Task):
    """A trained classifier's test set as probe items (`kind: icl`): sequence i of test set `set` as training drew
    it (its first `sequences` of `test`), so a probe's accuracy equals the logged one on the same weights. The
    generator fields must be the model's training task's (a sweep passes them: `{task.max_pairs}`...). An item's
    prompt is a `VectorPrompt` named "x 13 x 4 ... x" (items, their labels, the query); the answer is the query's
    label; positions by meaning: `query`, `match_item` and `match_label` (the first context item of the query's
    class and its label; none in `iw`). Activation patching's corrupted sequence relabels the context items of the
    query's class with a label the context does not use: the in-context answer moves to it."""

    SCHEMA: ClassVar[dict] = {
        "classes": ("icl: as the model's training task.classes (the generator's fields must all be its)", "512"),
        "labels": ("icl: as task.labels", "32"),
        "pairs": ("icl: as task.pairs", "8"),
        "max_pairs": ("icl: as task.max_pairs", "12"),
        "item_dim": ("icl: as task.item_dim", "39"),
        "burstiness": ("icl: as task.burstiness", "2"),
        "p_bursty": ("icl: as task.p_bursty", "0.5"),
        "p_novel": ("icl: as task.p_novel", "0.5"),
        "noise": ("icl: as task.noise", "0.1"),
        "zipf": ("icl: as task.zipf", "0.0"),
        "set": ("icl: the test set: in (the training mixture), ic (novel classes), ic2 (labels shifted), iw (query "
                "class absent)", "ic"),
        "sequences": ("icl: the test set's first ones", "1000"),
        "test": ("icl: as task.test (the test set's size as training drew it)", "10000"),
    }
    NONNEGATIVE: ClassVar[tuple] = ("sequences", "test")

    classes: int = 512
    labels: int = 32
    pairs: int = 8
    max_pairs: int = 32
    item_dim: int = 85
    burstiness: int = 2
    p_bursty: float = 0.5
    p_novel: float = 0.5
    noise: float = 0.1
    zipf: float = 0.0
    set: str = "ic"
    sequences: int = 1000
    test: int = 10000
    _draw: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.set not in TESTS:
            raise ProbeError(f"task {self.name!r}: set {self.set!r}; accepted: {', '.join(TESTS)}")
        if not 1 <= self.sequences <= self.test:
            raise ProbeError(f"task {self.name!r}: sequences {self.sequences}; accepted: 1 to test ({self.test})")
        check(self.generator(), f"task {self.name!r}")

    def generator(self) -> dict:
        return {k: getattr(self, k) for k in FIELDS if k != "generator"}

    def width(self) -> int:
        return width(self.generator())

    def drawn(self) -> dict:
        if not self._draw:
            self._draw.update(test_set(self.generator(), self.set, self.test),
                              label_vectors=Classes(self.generator()).label_vectors)
        return self._draw

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        s = self.drawn()
        out = []
        for i in range(self.sequences):
            labels, answer = s["labels"][i], str(int(s["target"][i]))
            tokens = [w for label in labels for w in ("x", str(int(label)))] + ["x"]
            chars = np.cumsum([0] + [len(t) + 1 for t in tokens]).tolist()
            named = {"query": chars[-2]}
            match = np.flatnonzero(s["match"][i])
            if len(match):
                named.update(match_item=chars[2 * match[0]], match_label=chars[2 * match[0] + 1])
            prompt = VectorPrompt(" ".join(tokens), s["inputs_embeds"][i])
            out.append(Item(i, f"{self.set} {i}", answer, prompt, " " + answer, "", group=self.set,
                            extra={"set": self.set, "query_class": int(s["classes"][i, -1]),
                                   "match_items": " ".join(map(str, match))}, positions=named))
            if limit and len(out) >= limit:
                break
        return [it for it in out if inputs is None or it.input in inputs]

    def corrupted(self, item: Item) -> tuple[VectorPrompt, str] | None:
        """The item's sequence with the labels of the query's class in the context relabelled to a label the
        context does not use (drawn with the task's seed and the item), and that label: the answer the context now
        teaches; nothing else changes. None where no context item is of the query's class (iw, plain sequences)."""
        s = self.drawn()
        match = np.flatnonzero(s["match"][item.index])
        unused = np.setdiff1d(np.arange(self.labels), s["labels"][item.index])
        if not len(match) or not len(unused):
            return None
        new = int(np.random.default_rng([self.seed, 7, item.index]).choice(unused))
        x = np.array(item.prompt.embeds)
        x[2 * match + 1, 2 * self.max_pairs + 1:] = s["label_vectors"][new]
        words = str(item.prompt).split()
        for j in match:
            words[2 * j + 1] = str(new)
        return VectorPrompt(" ".join(words), x), " " + str(new)

    def corrupted_pairs(self, items: list[Item], tokenizer) -> list[Item]:
        """Each sequence paired with itself relabelled (`corrupted`); sequences with no context item of the
        query's class (iw) are left out."""
        relabelled = ((it, self.corrupted(it)) for it in items)
        return [paired(it, other[0], f"{it.input} relabelled", other[1]) for it, other in relabelled
                if other is not None]

    def no_pairs(self, model: str) -> str:
        return (f"no sequence of task {self.name!r} has a context item of its query's class to relabel; "
                "accepted: set in, ic or ic2")
