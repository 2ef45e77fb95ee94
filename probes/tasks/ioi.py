"""Indirect-object identification (Wang et al. 2022), as Burns, Fukai & Earls measure their 8M language models, but
on many template-generated prompts: "When Mary and John went to the store, John gave a drink to" -> " Mary".

Each draw (template, two names, place, object; seeded) gives two items with the same sentence and the names'
roles swapped, so a preference for one name cancels over the pair: the indirect object (IO, the answer) and the
subject (S, repeated: the item's `argument`, the wrong answer the model is tempted by). `group` says which of the
two names comes first in the opening clause: "IO first" (ABBA in Wang et al.'s terms) or "S first" (BABA). The
logit-difference probe scores P(IO) against P(S) per item; the logit lens and activation patching (pairs: the same
sentence with the other name repeated) work on it as on any task with arguments.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ProbeError
from .base import Item, Task, paired
from .kinds import register_kind

# names that are one token with a leading space in GPT-2-, Llama- and Gemma-style vocabularies (checked per
# tokenizer: an item whose names are not single tokens is flagged ambiguous like any other)
NAMES = ["Mary", "John", "Tom", "James", "Dan", "Emily", "Anna", "Paul", "Kate", "Mark", "Lucy", "Sam", "Jane",
         "Mike", "Sarah", "David", "Lisa", "Peter", "Alice", "Bob", "Ben", "Tim", "Amy", "Jack", "Max", "Lily",
         "Emma", "Adam", "Kevin", "Laura"]
PLACES = ["store", "park", "shops", "school", "market", "beach", "garden", "zoo", "library", "station"]
OBJECTS = ["a bottle of milk", "the ball", "an apple", "a book", "a drink", "a flower", "a kiss", "a present",
           "a cake", "a toy"]
TEMPLATES = ["When {A} and {B} went to the {place}, {S} gave {object} to",
             "After {A} and {B} went to the {place}, {S} gave {object} to",
             "Then, {A} and {B} went to the {place}. {S} gave {object} to",
             "While {A} and {B} were at the {place}, {S} handed {object} to",
             "Friends {A} and {B} found {object} at the {place}. {S} gave it to"]
FIELDS = ("A", "B", "S", "place", "object")


@register_kind("ioi")
@dataclass
class IOITask(Task):
    """Template-generated IOI prompts, two per draw (the names' roles swapped)."""

    SCHEMA: ClassVar[dict] = {
        "draws": ("ioi: draws of template, names, place and object; two prompts each (the roles swapped)", "100"),
        "templates": ("ioi: sentences with {A} and {B} (the names, in order), {S} (the repeated one), {place}, "
                      "{object}", "['When {A} and {B} went to the {place}, {S} gave {object} to']"),
        "names": ("ioi: the names drawn (two distinct per draw)", "[Mary, John, Tom]"),
        "places": ("ioi: the places drawn", "[store, park]"),
        "objects": ("ioi: the objects drawn", "[a drink, the ball]"),
    }
    NONNEGATIVE: ClassVar[tuple] = ("draws",)

    draws: int = 100
    templates: list = field(default_factory=lambda: list(TEMPLATES))
    names: list = field(default_factory=lambda: list(NAMES))
    places: list = field(default_factory=lambda: list(PLACES))
    objects: list = field(default_factory=lambda: list(OBJECTS))

    def __post_init__(self):
        if self.draws < 1:
            raise ProbeError(f"task {self.name!r}: draws {self.draws}; accepted: 1 or more")
        if len(set(self.names)) < 2 or not self.places or not self.objects or not self.templates:
            raise ProbeError(f"task {self.name!r}: needs 2 or more distinct names and at least one template, place "
                             "and object")
        for t in self.templates:
            used = {f for _, f, _, _ in string.Formatter().parse(t) if f is not None}
            if not {"A", "B", "S"} <= used or used - set(FIELDS):
                raise ProbeError(f"task {self.name!r}: template {t!r} must use {{A}}, {{B}} and {{S}} (the repeated "
                                 "name); accepted variables: " + ", ".join("{" + f + "}" for f in FIELDS))

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        rng = np.random.default_rng(self.seed)
        out = []
        for d in range(self.draws):
            t = self.templates[int(rng.integers(len(self.templates)))]
            a, b = (self.names[int(i)] for i in rng.choice(len(self.names), size=2, replace=False))
            place = self.places[int(rng.integers(len(self.places)))]
            obj = self.objects[int(rng.integers(len(self.objects)))]
            for io, s in ((a, b), (b, a)):  # the same sentence, the roles swapped
                prompt = t.format(A=a, B=b, S=s, place=place, object=obj)
                out.append(Item(len(out), prompt, io, prompt, f" {io}", f" {s}",
                                group="IO first" if io == a else "S first",
                                extra={"draw": d, "io": io, "s": s}))
        if inputs is not None:
            out = [it for it in out if it.input in inputs]
        return out[:limit] if limit else out

    def swapped(self, item: Item) -> Item:
        """The pair's other item: the same sentence, the other name repeated (activation patching's corruption)."""
        return self.items()[item.index ^ 1]

    def corrupted_pairs(self, items: list[Item], tokenizer) -> list[Item]:
        """Each prompt paired with its twin (`swapped`: its answer is this one's subject), where both have the same
        token count."""
        length = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
        twins = ((it, self.swapped(it)) for it in items)
        return [paired(it, other.prompt, other.input, other.answer) for it, other in twins
                if length(other.prompt) == length(it.prompt)]

    def no_pairs(self, model: str) -> str:
        return f"no IOI prompt of task {self.name!r} has a swapped partner of the same token length"
