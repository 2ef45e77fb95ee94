"""What every task is: items (prompt, answer, argument, group) and the rule that scores them on a tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import string
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ProbeError


class VectorPrompt(str):
    """The prompt of a model that reads vectors (`inputs_embeds`: the in-context classifier): `embeds` (positions,
    width) are what the model reads; the text names each position's token for the tokenizer and the tables (an item
    "x", unknown to the label vocabulary, or its label), so lengths, positions and answers resolve as for text.
    `Loaded.trace` feeds the vectors; a string made from it by slicing or joining is plain text (and refused)."""

    def __new__(cls, text: str, embeds):
        self = super().__new__(cls, text)
        self.embeds = embeds
        if len(text.split()) != len(embeds):
            raise ValueError(f"{len(text.split())} tokens named for {len(embeds)} vectors")
        return self

    def __reduce__(self):
        return VectorPrompt, (str(self), self.embeds)


@dataclass(frozen=True)
class Item:
    """One prompt of a task, with the answer it is scored on and the argument the lens tracks."""

    index: int
    input: str
    output: str
    prompt: str
    answer: str  # answer text as emitted after the prompt (e.g. " Warsaw")
    argument: str  # argument text as it would be emitted (e.g. " Poland")
    group: str = ""  # e.g. regular / irregular, or the N of an N-back trial
    extra: dict = field(default_factory=dict, compare=False)  # task-specific columns (N-back: n, sequence, ...)
    # positions by meaning (tree: goal, root, the edge into the goal...): name -> a character of the prompt; probes
    # resolve them to the token holding it, for any tokenizer (methods/positions.py: named_positions)
    positions: dict = field(default_factory=dict, compare=False)


@dataclass
class Task:
    """Common to every kind: identity, provenance and the scoring rule. A kind (a subclass registered in kinds.py)
    also says what its own fields mean (`SCHEMA`, the file reference's rows), which of its counts may not be
    negative (`NONNEGATIVE`), what else a task file must satisfy (`check_file`), and how an item pairs with its
    corrupted twin (`corrupted_pairs`)."""

    # field -> (meaning, example) for the fields a class declares; a field several kinds declare has their
    # meanings joined (in kind order) and the first one's example; a kind may leave such a field to another's
    SCHEMA: ClassVar[dict] = {
        "name": ("the task's name (runs are filed under it)", "capitals"),
        "version": ("bump when the items change meaning; part of a run's identity", "1"),
        "seed": ("draws worked examples, context facts, N-back letters, --limit samples, bootstrap resamples (icl: "
                 "the training task's seed)", "0"),
        "description": ("one line for `probe tasks` and reports", "world capitals, Q/A format"),
        "source": ("where the data comes from", "Wikipedia list of national capitals"),
        "license": ("the data's licence", "CC BY-SA 4.0"),
        "ambiguous": ("drop or flag items whose answer's first token is ambiguous for a tokenizer", "drop"),
    }  # `kind`'s row lists the registered kinds (schema.py)
    NONNEGATIVE: ClassVar[tuple] = ("version", "seed")  # integer fields a task file may not set below 0

    name: str
    version: int
    kind: str
    seed: int = 0
    description: str = ""
    source: str = ""
    license: str = ""
    ambiguous: str = "drop"
    path: Path | None = None
    overrides: dict = field(default_factory=dict)  # fields set on the command line (--task-option)

    @classmethod
    def check_file(cls, spec: dict, name: str) -> None:
        """What a task file of this kind must satisfy beyond its fields' types (raises ProbeError)."""

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        """The first `limit` items, or those whose input is in `inputs`; worked examples are never drawn from
        `shot_exclude` (indices)."""
        raise NotImplementedError

    def corrupted_pairs(self, items: list[Item], tokenizer) -> list[Item] | None:
        """Activation patching's pairs: each item that has a corrupted twin, its `extra` given `corrupted` (the
        twin's prompt, tokenized to as many tokens), `corrupted_input` and `corrupted_answer`; items without one
        are left out. None: this kind has no clean/corrupted pairs."""
        return None

    def no_pairs(self, model: str) -> str:
        """What to say when none of the items has a twin on `model` (`corrupted_pairs` gave none)."""
        return (f"no item of task {self.name!r} has a corrupted partner of the same token length on {model}; "
                "accepted: a task with more items")

    def digest(self) -> str:
        """A hash of everything that makes this task's items but the seed (which a run's identity names on its
        own, and runs that differ only by it are pooled): every field as resolved (file and overrides) and the
        data it reads, so an edited template or data file is a different task even at the same version."""
        fields_ = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.init and f.name not in ("path", "overrides", "seed")}
        text = json.dumps([fields_, self.data_digest()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def data_digest(self) -> str | None:
        """A hash of the data file's bytes (None for tasks that generate their items)."""
        return None

    def provenance(self) -> dict:
        """What a run folder's meta.json keeps of the task beyond its name, version and digest (the prompts a user
        listed; nothing for task files, which are in the repository)."""
        return {}

    def ambiguity(self, tokenizer) -> dict[int, str]:
        """{index: reason} of the items ambiguous for this tokenizer: the answer's first token is also the
        argument's first token, or the answer is several tokens and its first token also starts a different
        answer of the task."""
        items = self.items()
        first = {it.index: first_token(tokenizer, it.answer) for it in items}
        starts: dict[int, set[str]] = {}
        for it in items:
            starts.setdefault(first[it.index], set()).add(it.output)
        reasons = {}
        for it in items:
            if it.argument and first[it.index] == first_token(tokenizer, it.argument):
                reasons[it.index] = "answer starts with the argument's token"
            elif len(tokenizer(it.answer, add_special_tokens=False).input_ids) > 1 and len(starts[first[it.index]]) > 1:
                reasons[it.index] = "first answer token shared with other answers"
        return reasons

    def scored_items(self, tokenizer, limit: int | None = None, inputs: list[str] | None = None):
        """Items as a model's tokenizer sees them: (kept items, {index: reason} of the ambiguous ones).

        `ambiguous: drop` leaves the ambiguous items out, as queries and as worked examples; `flag` keeps them as
        both (probes mark them in an `ambiguous` column). `limit` then draws that many of the kept items,
        stratified over the task's groups with the task's seed (`stratified`)."""
        reasons = self.ambiguity(tokenizer)
        drop = self.ambiguous == "drop"
        if drop and reasons and len(reasons) == len(self.items()):
            return [], reasons  # nothing to score (the caller says so), and nothing to draw examples from
        items = self.items(inputs=inputs, shot_exclude=set(reasons) if drop else set())
        kept = [it for it in items if self.ambiguous == "flag" or it.index not in reasons]
        return (stratified(kept, limit, self.seed) if limit else kept), reasons


_ENCODED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {(text, special): ids}


def token_ids(tokenizer, text: str, special: bool = True) -> list[int]:
    """`tokenizer(text).input_ids` (`special`: with the special tokens a prompt gets), encoded once per tokenizer and
    text: a run reads each prompt's tokens in several places (positions, targets, row columns, the context check),
    and on a GPU those encodings, not the forward pass, were most of a lens batch's time."""
    try:
        cache = _ENCODED.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: encoded each time
        cache = {}
    key = (text, special)
    if key not in cache:
        cache[key] = tokenizer(text, add_special_tokens=special).input_ids
    return list(cache[key])


def check_template(name: str, key: str, text: str, accepted: tuple[str, ...]) -> None:
    """A task file's template `key` is a format string over the `accepted` variables only."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ProbeError(f"task {name!r}: {key} is not a valid template ({e})")
    for var in names:
        if var not in accepted:
            raise ProbeError(f"task {name!r}: {key} uses unknown variable {{{var}}}; accepted: "
                             + ", ".join("{" + f + "}" for f in accepted))


def paired(item: Item, corrupted: str, corrupted_input, corrupted_answer: str) -> Item:
    """`item` with its corrupted twin in `extra` (what `Task.corrupted_pairs` gives)."""
    return dataclasses.replace(item, extra={**item.extra, "corrupted": corrupted, "corrupted_input": corrupted_input,
                                            "corrupted_answer": corrupted_answer})


def first_token(tokenizer, text: str) -> int:
    """The first token id of `text` encoded alone (no special tokens)."""
    ids = token_ids(tokenizer, text, special=False)
    if not ids:
        raise ProbeError(f"{text!r} tokenizes to nothing")
    return ids[0]


def answer_token(tokenizer, item: Item) -> int:
    """The first token the model would emit for the answer: where prompt + answer tokenizes as the prompt's
    tokens followed by more, the first of those; otherwise the answer encoded alone."""
    prompt = token_ids(tokenizer, item.prompt)
    full = token_ids(tokenizer, item.prompt + item.answer)
    if len(full) > len(prompt) and full[:len(prompt)] == prompt:
        return full[len(prompt)]
    return first_token(tokenizer, item.answer)


def item_columns(tokenizer, item: Item) -> dict:
    """The columns every probe's rows start with: which item, its group, and the tokens it is scored on."""
    return {"item": item.index, "input": item.input, "output": item.output, "group": item.group,
            "answer_token": tokenizer.decode(answer_token(tokenizer, item)) if item.answer else "",
            "argument_token": tokenizer.decode(first_token(tokenizer, item.argument)) if item.argument else "",
            **item.extra}


def stratified(items: list[Item], n: int, seed: int) -> list[Item]:
    """`n` of `items` drawn with `seed`, every group present (when n >= the number of groups) and each group's
    share as in `items` (largest remainders); in task order. All of them when there are no more than `n`."""
    if n >= len(items):
        return list(items)
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    names = sorted(groups)
    floor = 1 if n >= len(names) else 0
    share = {g: len(groups[g]) * n / len(items) for g in names}
    take = {g: min(len(groups[g]), max(floor, int(share[g]))) for g in names}
    by_remainder = sorted(names, key=lambda g: (-(share[g] - int(share[g])), g))
    while sum(take.values()) < n:
        for g in by_remainder:
            if sum(take.values()) < n and take[g] < len(groups[g]):
                take[g] += 1
    while sum(take.values()) > n:  # the floor of 1 per group overshot: take back from the largest
        g = max(names, key=lambda g: take[g])
        take[g] -= 1
    rng = np.random.default_rng(seed)
    chosen = [groups[g][int(i)] for g in names for i in rng.choice(len(groups[g]), size=take[g], replace=False)]
    return sorted(chosen, key=lambda it: it.index)
