"""Task kinds by name (a task file's `kind`): each is a `Task` subclass that registers itself with `register_kind`
in its own module, and carries what the rest of the project asks of a kind: its fields and their schema (`SCHEMA`,
`NONNEGATIVE`, `check_file`), its items, and its clean/corrupted pairs (`corrupted_pairs`). The task-file reader
(files.py) and the file reference (schema.py) read this table. docs/extending.md says how to add a kind."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

# the modules of the built-in kinds, in the order the kinds are listed (error messages, the file reference)
BUILTIN = ("relational", "nback_trials", "tree", "ioi", "repeat", "documents", "icl_sequences")


@dataclass(frozen=True)
class Kind:
    cls: type  # the Task subclass a task file of this kind builds
    required: tuple[str, ...] = ()  # the fields a task file of this kind must give


KINDS: dict[str, Kind] = {}  # as registered; `kinds()` orders them


def register_kind(name: str, required: tuple[str, ...] = ()):
    """A class decorator: task files with `kind: name` build this class; `required`: the fields they must give."""
    def add(cls):
        if name in KINDS and KINDS[name].cls is not cls:
            raise ValueError(f"task kind {name!r} is registered twice ({KINDS[name].cls.__name__}, {cls.__name__})")
        KINDS[name] = Kind(cls, tuple(required))
        return cls
    return add


def kinds() -> dict[str, Kind]:
    """Every kind: the built-in ones (their modules imported here) in `BUILTIN`'s order, then any other registered."""
    order = {f"{__package__}.{m}": i for i, m in enumerate(BUILTIN)}
    for module in order:
        importlib.import_module(module)
    return dict(sorted(KINDS.items(), key=lambda kv: order.get(kv[1].cls.__module__, len(order))))
