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

N-back tasks (`kind: nback`) generate letter sequences from the seed instead of reading data; see `NBack`.
Data is read with `datasets`; rows with an input already seen are dropped (the first is kept).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from .errors import ProbeError, choice_error, read_yaml
from .registry import ROOT

_KINDS = ("abstractive", "extractive", "nback")
_AMBIGUOUS = ("drop", "flag")
_VARS = ("input", "output")


def tasks_dir() -> Path:
    return Path(os.environ.get("PROBE_TASKS", ROOT / "tasks"))


@dataclass(frozen=True)
class Item:
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


@dataclass
class Relational(Task):
    data: dict = field(default_factory=dict)
    template: str = ""
    answer: str = " {output}"
    argument: str = " {input}"
    shots: int = 0
    separator: str = "\n"
    context: str = ""
    context_items: int = 0
    _rows: list | None = field(default=None, init=False, repr=False, compare=False)

    def rows(self) -> list[dict]:
        """The data rows, read once per task object (items and scored_items ask for them several times)."""
        if self._rows is None:
            self._rows = self._read_rows()
        return self._rows

    def _read_rows(self) -> list[dict]:
        from datasets import disable_progress_bars, load_dataset

        disable_progress_bars()
        file = (self.path.parent if self.path else tasks_dir()) / self.data["file"]
        if not file.exists():
            raise ProbeError(f"task {self.name!r}: data file {str(file)!r} not found")
        fmt = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(file.suffix)
        if fmt is None:
            raise ProbeError(f"task {self.name!r}: data file {file.name!r} has an unknown format; "
                             "accepted: .csv, .json, .jsonl")
        try:
            ds = load_dataset(fmt, data_files=str(file), split="train")
        except Exception as e:  # datasets raises several types for an empty or unreadable file
            raise ProbeError(f"task {self.name!r}: data file {file.name!r} has no rows or cannot be read ({e})")
        cols = {f: self.data.get(f, f) for f in _VARS + ("group",) if f in _VARS or f in self.data}
        missing = [c for c in cols.values() if c not in ds.column_names]
        if missing:
            raise ProbeError(f"task {self.name!r}: data column(s) {missing} not in {file.name}; "
                             f"columns: {', '.join(ds.column_names)}")
        rows, seen = [], set()
        for r in ds:
            row = {f: str(r[c]).strip() for f, c in cols.items()}
            if row["input"] not in seen:
                seen.add(row["input"])
                rows.append(row)
        if not rows:
            raise ProbeError(f"task {self.name!r}: data file {file.name!r} has no rows")
        return rows

    def items(self, limit: int | None = None, inputs: list[str] | None = None) -> list[Item]:
        """The first `limit` items, or those whose input is in `inputs`; prompts never depend on either."""
        rows = self.rows()
        if inputs is not None:
            unknown = set(inputs) - {r["input"] for r in rows}
            if unknown:
                raise ProbeError(f"task {self.name!r} has no item(s) {', '.join(sorted(unknown))}")
        out = []
        for i, row in enumerate(rows):
            if (limit and i >= limit) or (inputs is not None and row["input"] not in inputs):
                continue
            out.append(Item(i, row["input"], row["output"], self.prompt(i, rows), self.answer.format(**row),
                            self.argument.format(**row), group=row.get("group", "")))
        return out

    def prompt(self, index: int, rows: list[dict]) -> str:
        """[context facts, the item's among them] + [shots, never the item] + the query, seeded per item."""
        rng = np.random.default_rng([self.seed, index])
        others = np.delete(np.arange(len(rows)), index)
        need = self.shots + max(self.context_items - 1, 0)
        if need > len(others):
            raise ProbeError(f"task {self.name!r}: {self.shots} shots and {self.context_items} context facts "
                             f"need more than {len(rows)} items")
        picked = [int(j) for j in rng.choice(others, size=need, replace=False)]
        shots, facts = picked[:self.shots], picked[self.shots:]
        parts = []
        if self.context_items:
            facts.insert(int(rng.integers(0, len(facts) + 1)), index)
            parts += [self.context.format(**rows[j]) for j in facts]
        parts += [self.template.format(**rows[j]) + self.answer.format(**rows[j]) for j in shots]
        return self.separator.join(parts + [self.template.format(**rows[index])])


NBACK_LETTERS = "BCDFGHJKLMNPQRSTVWXZ"  # 20 consonants
NBACK_RANGE = range(1, 7)


@dataclass
class NBack(Task):
    """N-back trials in the prompted format of the working-memory studies.

    Each sequence has `length` letters from `letters` with exactly `matches` targets (a letter equal to the one
    N back; no other position matches by chance). `unit: trial` gives one item per letter from position N on:
    the instruction, the letters so far each followed by its correct response, and the current letter, to be
    answered " m" (match) or " -". `unit: sequence` gives one item per sequence with every response filled in,
    for attention analysis over all positions (probes find the letters through the tokenizer's offsets).
    """

    n: list = field(default_factory=lambda: list(NBACK_RANGE))
    sequences: int = 4
    length: int = 24
    matches: int = 8
    letters: str = NBACK_LETTERS
    unit: str = "trial"
    instruction: str = ""
    trial: str = "Letter: {letter}\nResponse:"
    match_answer: str = " m"
    nonmatch_answer: str = " -"
    separator: str = "\n"

    def __post_init__(self):
        self.n = [self.n] if isinstance(self.n, int) else list(self.n)
        bad = [n for n in self.n if not isinstance(n, int) or n not in NBACK_RANGE]
        if bad:
            raise ProbeError(f"task {self.name!r}: N {bad[0]!r} is outside the supported range; accepted: 1 to 6")
        if self.unit not in ("trial", "sequence"):
            raise ProbeError(f"task {self.name!r}: unit {self.unit!r}; accepted: trial, sequence")
        if not 0 <= self.matches <= self.length - max(self.n) or len(set(self.letters)) < 2:
            raise ProbeError(f"task {self.name!r}: {self.matches} matches do not fit {self.length} letters for "
                             f"N up to {max(self.n)}; accepted: 0 to {self.length - max(self.n)}")

    def sequence(self, n: int, s: int) -> tuple[list[str], list[bool]]:
        """Letters and match labels of sequence `s` for `n`, generated from (seed, n, s)."""
        rng = np.random.default_rng([self.seed, n, s])
        targets = set(rng.choice(np.arange(n, self.length), size=self.matches, replace=False).tolist())
        letters = []
        for t in range(self.length):
            if t in targets:
                letters.append(letters[t - n])
            else:
                pool = [c for c in self.letters if t < n or c != letters[t - n]]
                letters.append(pool[int(rng.integers(len(pool)))])
        return letters, [t >= n and letters[t] == letters[t - n] for t in range(self.length)]

    def _response(self, match: bool) -> str:
        return self.match_answer if match else self.nonmatch_answer

    def items(self, limit: int | None = None, inputs: list[str] | None = None) -> list[Item]:
        out = []
        for n in self.n:
            head = self.instruction.format(n=n)
            for s in range(self.sequences):
                letters, labels = self.sequence(n, s)
                shown = [self.trial.format(letter=c) + self._response(m) for c, m in zip(letters, labels)]
                extra = {"n": n, "sequence": s, "letters": "".join(letters)}
                if self.unit == "sequence":
                    out.append(Item(len(out), "".join(letters), "".join("m" if m else "-" for m in labels),
                                    self.separator.join([head] + shown), "", "", group=f"N={n}",
                                    extra={**extra, "matches": int(sum(labels))}))
                    continue
                for t in range(n, self.length):
                    prompt = self.separator.join([head] + shown[:t] + [self.trial.format(letter=letters[t])])
                    out.append(Item(len(out), letters[t], "m" if labels[t] else "-", prompt,
                                    self._response(labels[t]), " " + letters[t - n], group=f"N={n}",
                                    extra={**extra, "position": t, "match": bool(labels[t])}))
        return out[:limit] if limit else out


_CLASSES = {"abstractive": Relational, "extractive": Relational, "nback": NBack}
_REQUIRED = {"abstractive": ("template", "data"), "extractive": ("template", "data", "context", "context_items"),
             "nback": ("instruction",)}


def _check_template(name: str, key: str, text: str, accepted=_VARS):
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(text) if f is not None]
    except ValueError as e:
        raise ProbeError(f"task {name!r}: {key} is not a valid template ({e})")
    for var in names:
        if var not in accepted:
            raise ProbeError(f"task {name!r}: {key} uses unknown variable {{{var}}}; accepted: "
                             + ", ".join("{" + f + "}" for f in accepted))


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
    if spec["kind"] not in _KINDS:
        raise ProbeError(f"task {name!r} has kind {spec['kind']!r}; accepted: {', '.join(_KINDS)}")
    cls = _CLASSES[spec["kind"]]
    missing = [k for k in _REQUIRED[spec["kind"]] if k not in spec]
    if missing:
        raise ProbeError(f"task {name!r} ({where}) is missing field(s) {', '.join(missing)}; "
                         f"a {spec['kind']} task requires: {', '.join(_REQUIRED[spec['kind']])}")
    accepted = [f.name for f in fields(cls) if f.init and f.name not in ("path", "overrides")]
    unknown = set(spec) - set(accepted)
    if unknown:
        raise ProbeError(f"task {name!r} has unknown field(s) {', '.join(sorted(unknown))}; "
                         f"accepted: {', '.join(accepted)}")
    if spec.get("ambiguous", "drop") not in _AMBIGUOUS:
        raise ProbeError(f"task {name!r}: ambiguous {spec['ambiguous']!r}; accepted: {', '.join(_AMBIGUOUS)}")
    if cls is Relational:
        if not isinstance(spec["data"], dict) or "file" not in spec["data"]:
            raise ProbeError(f"task {name!r}: data must be a mapping with 'file' (and optional input, output, "
                             "group columns)")
        for key in ("template", "answer", "argument", "context"):
            if key in spec:
                _check_template(name, key, spec[key])
    else:
        _check_template(name, "instruction", spec["instruction"], accepted=("n",))
        _check_template(name, "trial", spec.get("trial", "{letter}"), accepted=("letter",))
    return cls(**spec, path=path, overrides=dict(overrides or {}))


def load_task_file(path: Path, overrides: dict | None = None) -> Task:
    return build_task(read_yaml(path, "task file"), Path(path), overrides)


def available_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(tasks_dir().glob("*.yaml"))}


def load_task(name: str, overrides: dict | None = None) -> Task:
    tasks = available_tasks()
    if name in tasks:
        return load_task_file(tasks[name], overrides)
    if Path(name).is_file():
        return load_task_file(Path(name), overrides)
    raise choice_error("task", name, list(tasks) + ["<task .yaml file>"])


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
