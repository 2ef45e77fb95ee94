"""Relational tasks (abstractive: the answer comes from pretraining; extractive: the answer is in the prompt),
read from a data file with `datasets`; rows with an input already seen are dropped (the first is kept)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..errors import ProbeError
from ..paths import tasks_dir
from .base import Item, Task, answer_token, check_template, paired
from .kinds import register_kind

VARS = ("input", "output")  # the template variables: a data row's input and output columns


@dataclass
class Relational(Task):
    SCHEMA: ClassVar[dict] = {
        "data": ("relational: the data file (CSV/JSON/JSONL, relative to the task file) and its input, output and "
                 "optional group columns", "{file: data/world_capitals.csv, input: country, output: capital}"),
        "template": ("relational: the query, with {input} and {output}", "'Q: What is the capital of {input}?\\nA:'"),
        "answer": ("relational: the answer as emitted after the prompt; scored on its first token", "' {output}'"),
        "argument": ("relational: the argument's text as it would be emitted; the lens tracks its first token",
                     "' {input}'"),
        "shots": ("relational: worked examples before the query (other items, never ambiguous ones)", "1"),
        "separator": ("text between facts, examples and the query (N-back: between trials)", "'\\n'"),
        "context": ("extractive: a fact stated before the query", "'The capital of {input} is {output}.'"),
        "context_items": ("extractive: facts stated, the queried item's among them", "3"),
    }
    NONNEGATIVE: ClassVar[tuple] = ("shots", "context_items")

    data: dict = field(default_factory=dict)
    template: str = ""
    answer: str = " {output}"
    argument: str = " {input}"
    shots: int = 0
    separator: str = "\n"
    context: str = ""
    context_items: int = 0
    _rows: list | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def check_file(cls, spec: dict, name: str) -> None:
        if not isinstance(spec["data"], dict) or "file" not in spec["data"]:
            raise ProbeError(f"task {name!r}: data must be a mapping with 'file' (and optional input, output, "
                             "group columns)")
        for key in ("template", "answer", "argument", "context"):
            if key in spec:
                check_template(name, key, spec[key], VARS)
        for key in ("template", "answer"):
            if not str(spec.get(key, " {output}")).strip():
                raise ProbeError(f"task {name!r}: {key} is empty; accepted: a template such as "
                                 + ("'Q: What is the capital of {input}?\\nA:'" if key == "template" else "' {output}'"))

    def rows(self) -> list[dict]:
        """The data rows, read once per task object (items and scored_items ask for them several times)."""
        if self._rows is None:
            self._rows = self._read_rows()
        return self._rows

    def data_file(self) -> Path:
        return (self.path.parent if self.path else tasks_dir()) / self.data["file"]

    def data_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.data_file().read_bytes()).hexdigest()[:16]
        except OSError:
            return None  # reading the rows says what is wrong with the file

    def _read_rows(self) -> list[dict]:
        from datasets import disable_progress_bars, load_dataset

        disable_progress_bars()
        file = self.data_file()
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
        cols = {f: self.data.get(f, f) for f in VARS + ("group",) if f in VARS or f in self.data}
        missing = [c for c in cols.values() if c not in ds.column_names]
        if missing:
            raise ProbeError(f"task {self.name!r}: data column(s) {missing} not in {file.name}; "
                             f"columns: {', '.join(ds.column_names)}")
        rows, seen = [], set()
        for line, r in enumerate(ds, start=2):  # line 1 of a CSV is its header
            empty = [c for c in cols.values() if r[c] is None or not str(r[c]).strip()]
            if empty:
                raise ProbeError(f"task {self.name!r}: {file.name} row {line} has an empty {empty[0]!r}; accepted: "
                                 "a value in every input, output and group cell")
            row = {f: str(r[c]).strip() for f, c in cols.items()}
            if row["input"] not in seen:
                seen.add(row["input"])
                rows.append(row)
        if not rows:
            raise ProbeError(f"task {self.name!r}: data file {file.name!r} has no rows")
        return rows

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
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
            out.append(Item(i, row["input"], row["output"], self.prompt(i, rows, shot_exclude), self.answer.format(**row),
                            self.argument.format(**row), group=row.get("group", "")))
        return out

    def prompt(self, index: int, rows: list[dict], shot_exclude: set[int] = frozenset()) -> str:
        """[context facts, the item's among them] + [shots, never the item] + the query, seeded per item."""
        rng = np.random.default_rng([self.seed, index])
        # worked examples and context facts: other items, never excluded ones nor any whose answer is its argument
        others = np.array([j for j in range(len(rows)) if j != index and j not in shot_exclude
                           and rows[j]["output"] != rows[j]["input"]], dtype=int)
        need = self.shots + max(self.context_items - 1, 0)
        if need > len(others):
            raise ProbeError(f"task {self.name!r}: {self.shots} shots and {self.context_items} context facts "
                             f"need more than the {len(others)} other items usable as examples (of {len(rows)}: "
                             "not ambiguous for this tokenizer, answer other than the argument); accepted: fewer "
                             "shots or --task-option ambiguous=flag")
        picked = [int(j) for j in rng.choice(others, size=need, replace=False)]
        shots, facts = picked[:self.shots], picked[self.shots:]
        parts = []
        if self.context_items:
            facts.insert(int(rng.integers(0, len(facts) + 1)), index)
            parts += [self.context.format(**rows[j]) for j in facts]
        parts += [self.template.format(**rows[j]) + self.answer.format(**rows[j]) for j in shots]
        return self.separator.join(parts + [self.template.format(**rows[index])])

    def corrupted_pairs(self, items: list[Item], tokenizer) -> list[Item]:
        """The items that have a partner: the same prompt (shots and all) with the query asked of another item
        whose answer starts with another token, of the same token length; drawn with the task's seed."""
        rows = self.rows()
        length = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
        pool = self.items()  # partners: any item of the task, limited or not
        query = {it.index: self.template.format(**rows[it.index]) for it in pool}
        out = []
        for it in items:
            rng = np.random.default_rng([self.seed, 7, it.index])  # per item: pairs do not depend on the others
            prefix = it.prompt[: len(it.prompt) - len(query[it.index])]
            n, first = length(it.prompt), answer_token(tokenizer, it)
            for j in rng.permutation(len(pool)):
                other = pool[int(j)]
                corrupted = prefix + query[other.index]
                if other.index != it.index and answer_token(tokenizer, other) != first and length(corrupted) == n:
                    out.append(paired(it, corrupted, other.input, other.answer))
                    break
        return out


register_kind("abstractive", required=("template", "data"))(Relational)
register_kind("extractive", required=("template", "data", "context", "context_items"))(Relational)
