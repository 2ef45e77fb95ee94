"""Tasks: one YAML file under tasks/ each. Two kinds of file:

Relational tasks (abstractive: the answer comes from pretraining; extractive: the answer is in the prompt):

    name: capitals
    version: 1
    kind: abstractive            # or extractive
    data: {file: data/world_capitals.csv, input: country, output: capital, group: type}   # group optional
    source: ...                  # where the data comes from, and its licence
    license: ...
    template: "Q: What is the capital of {input}?\\nA:"
    answer: " {output}"          # as the model would emit it after the prompt; scored on its first token
    argument: " {input}"         # the argument's token, tracked by the lens
    shots: 1                     # worked examples, drawn with `seed`, never the queried item itself
    separator: "\\n"
    context: "The capital of {input} is {output}."   # extractive: facts stated before the query...
    context_items: 3             # ...this many, the queried item's among them, in seeded order
    ambiguous: drop              # drop or flag items whose first answer token is ambiguous for a tokenizer
    seed: 0

Every other kind (kinds.py: N-back letters, trees, IOI prompts, repeated sequences, text documents, in-context
classification test sets) generates or reads its items as its own module says (tasks/nback_trials.py, tree.py, ioi.py,
repeat.py, documents.py, icl_sequences.py); docs/schema.md lists every field of every kind.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from pathlib import Path

import yaml

from ..errors import ProbeError, choice_error, read_yaml
from ..paths import tasks_dir
from .base import Task
from .kinds import kinds
from .prompts import FORMATS, prompts_task

_AMBIGUOUS = ("drop", "flag")
_TYPE_NAMES = {int: "an integer", str: "a text", dict: "a mapping", list: "a list"}


def _check_types(cls, spec: dict, name: str) -> None:
    """Every field of a task file against the type its class declares (one schema: the dataclass), and counts
    against their range (the classes' NONNEGATIVE); N-back's `n` may be one integer or a list."""
    hints = typing.get_type_hints(cls)
    nonnegative = {k for c in cls.__mro__ for k in vars(c).get("NONNEGATIVE", ())}
    for key, value in spec.items():
        want = hints.get(key)
        want = typing.get_origin(want) or want
        if key == "n" and isinstance(value, int) and not isinstance(value, bool):
            continue
        if want in _TYPE_NAMES and (not isinstance(value, want) or isinstance(value, bool)):
            accepted = "a list of integers 1 to 6, or one" if key == "n" else _TYPE_NAMES[want]
            raise ProbeError(f"task {name!r}: {key} {value!r} is not {_TYPE_NAMES[want]}; accepted: {accepted}"
                             + (", 0 or more" if key in nonnegative else ""))
        if key in nonnegative and value < 0:
            raise ProbeError(f"task {name!r}: {key} {value!r} is negative; accepted: an integer, 0 or more")


def build_task(spec: dict, path: Path | None = None, overrides: dict | None = None) -> Task:
    """Validate a task definition (a mapping, e.g. read from YAML) with optional field overrides."""
    where = str(path) if path else "task"
    if not isinstance(spec, dict):
        raise ProbeError(f"task file {where!r} must be a mapping")
    spec = {**spec, **(overrides or {})}
    name = spec.get("name", Path(where).stem)
    missing = [k for k in ("name", "version", "kind") if k not in spec]
    if missing:
        raise ProbeError(f"task {name!r} ({where}) is missing field(s) {', '.join(missing)}; "
                         "required: name, version, kind")
    known = kinds()
    if spec["kind"] not in known:
        raise ProbeError(f"task {name!r} has kind {spec['kind']!r}; accepted: {', '.join(known)}")
    cls, required = known[spec["kind"]].cls, known[spec["kind"]].required
    missing = [k for k in required if k not in spec]
    if missing:
        raise ProbeError(f"task {name!r} ({where}) is missing field(s) {', '.join(missing)}; "
                         f"a {spec['kind']} task requires: {', '.join(required)}")
    accepted = [f.name for f in fields(cls) if f.init and f.name not in ("path", "overrides")]
    unknown = set(spec) - set(accepted)
    if unknown:
        raise ProbeError(f"task {name!r} has unknown field(s) {', '.join(sorted(unknown))}; "
                         f"accepted: {', '.join(accepted)}")
    _check_types(cls, spec, name)
    if spec.get("ambiguous", "drop") not in _AMBIGUOUS:
        raise ProbeError(f"task {name!r}: ambiguous {spec['ambiguous']!r}; accepted: {', '.join(_AMBIGUOUS)}")
    cls.check_file(spec, name)
    return cls(**spec, path=path, overrides=dict(overrides or {}))


def load_task_file(path: Path, overrides: dict | None = None) -> Task:
    return build_task(read_yaml(path, "task file"), Path(path), overrides)


def available_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(tasks_dir().glob("*.yaml"))}


def load_task(name: str, overrides: dict | None = None) -> Task:
    """A task by name, a task .yaml file, or a prompts file (.csv or .jsonl with prompt and answer columns)."""
    tasks = available_tasks()
    if name in tasks:
        return load_task_file(tasks[name], overrides)
    if Path(name).suffix in FORMATS:
        return prompts_task(name, overrides=overrides)
    if Path(name).is_file():
        return load_task_file(Path(name), overrides)
    raise choice_error("task", name, list(tasks) + ["<task .yaml file>", "<prompts .csv/.jsonl file>"])


def parse_overrides(pairs: list[str] | None) -> dict:
    """`--task-option n=2 --task-option shots=3` -> {'n': 2, 'shots': 3} (values read as YAML)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ProbeError(f"bad --task-option {pair!r}; accepted: FIELD=VALUE, e.g. n=2 or shots=3")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = None
        out[key.strip()] = value if parsed is None else parsed  # blank or non-YAML values stay text
    return out
