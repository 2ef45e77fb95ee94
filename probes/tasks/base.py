"""What every task is: items (prompt, answer, argument, group) and the rule that scores them on a tokenizer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeError


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


@dataclass
class Task:
    """Common to every kind: identity, provenance and the scoring rule."""

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

    def items(self, limit: int | None = None, inputs: list[str] | None = None) -> list[Item]:
        raise NotImplementedError

    def digest(self) -> str:
        """A hash of everything that makes this task's items: every field as resolved (file and overrides) and
        the data it reads, so an edited template or data file is a different task even at the same version."""
        fields_ = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.init and f.name not in ("path", "overrides")}
        text = json.dumps([fields_, self.data_digest()], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def data_digest(self) -> str | None:
        """A hash of the data file's bytes (None for tasks that generate their items)."""
        return None

    def scored_items(self, tokenizer, limit: int | None = None, inputs: list[str] | None = None):
        """Items as a model's tokenizer sees them: (kept items, {index: reason} of the ambiguous ones).

        An item is ambiguous when its answer's first token is also the argument's first token, or when the
        answer is several tokens and its first token also starts a different answer of the task. `ambiguous:
        drop` leaves them out; `flag` keeps them (probes mark them in an `ambiguous` column).
        """
        items = self.items(limit, inputs)
        if self.kind == "nback":
            return items, {}
        first = {it.index: first_token(tokenizer, it.answer) for it in items}
        starts: dict[int, set[str]] = {}
        for it in self.items():
            starts.setdefault(first_token(tokenizer, it.answer), set()).add(it.output)
        reasons = {}
        for it in items:
            if first[it.index] == first_token(tokenizer, it.argument):
                reasons[it.index] = "answer starts with the argument's token"
            elif len(tokenizer(it.answer, add_special_tokens=False).input_ids) > 1 and len(starts[first[it.index]]) > 1:
                reasons[it.index] = "first answer token shared with other answers"
        kept = [it for it in items if self.ambiguous == "flag" or it.index not in reasons]
        return kept, reasons


def first_token(tokenizer, text: str) -> int:
    """The first token id of `text` encoded alone (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ProbeError(f"{text!r} tokenizes to nothing")
    return ids[0]


def answer_token(tokenizer, item: Item) -> int:
    """The first token the model would emit for the answer: where prompt + answer tokenizes as the prompt's
    tokens followed by more, the first of those; otherwise the answer encoded alone."""
    prompt = tokenizer(item.prompt).input_ids
    full = tokenizer(item.prompt + item.answer).input_ids
    if len(full) > len(prompt) and full[:len(prompt)] == prompt:
        return full[len(prompt)]
    return first_token(tokenizer, item.answer)


def item_columns(tokenizer, item: Item) -> dict:
    """The columns every probe's rows start with: which item, its group, and the tokens it is scored on."""
    return {"item": item.index, "input": item.input, "output": item.output, "group": item.group,
            "answer_token": tokenizer.decode(answer_token(tokenizer, item)) if item.answer else "",
            "argument_token": tokenizer.decode(first_token(tokenizer, item.argument)) if item.argument else "",
            **item.extra}
