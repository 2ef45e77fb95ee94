"""Tasks: a YAML file under tasks/ names the data, the prompt template, the answer format and the seed.

    name: capitals
    version: 1
    kind: abstractive            # abstractive (answer from pretraining) or extractive (answer in the prompt)
    data: {file: data/world_capitals.csv, input: country, output: capital}
    source: ...                  # where the data comes from
    license: ...
    template: "Q: What is the capital of {input}?\\nA:"
    answer: " {output}"          # how the model would emit the answer; scored on its first token
    argument: " {input}"         # the argument's token, tracked by the lens
    shots: 1                     # few-shot examples, drawn with `seed`, never the queried item itself
    separator: "\\n"
    seed: 0

Data is read with `datasets`; rows with an input already seen are dropped (the first is kept).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .errors import ProbeError, choice_error
from .registry import ROOT

_REQUIRED = ("name", "version", "kind", "data", "template", "answer")
_OPTIONAL = {"description": "", "source": "", "license": "", "argument": " {input}", "shots": 0,
             "separator": "\n", "seed": 0}
_KINDS = ("abstractive", "extractive")
_FIELDS = ("input", "output")


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


@dataclass
class Task:
    name: str
    version: int
    kind: str
    data: dict
    template: str
    answer: str
    argument: str
    shots: int
    separator: str
    seed: int
    description: str = ""
    source: str = ""
    license: str = ""
    path: Path | None = None

    def rows(self) -> list[dict]:
        from datasets import disable_progress_bars, load_dataset

        disable_progress_bars()

        file = (self.path.parent if self.path else tasks_dir()) / self.data["file"]
        if not file.exists():
            raise ProbeError(f"task {self.name!r}: data file {str(file)!r} not found")
        fmt = {".csv": "csv", ".json": "json", ".jsonl": "json"}.get(file.suffix)
        if fmt is None:
            raise ProbeError(f"task {self.name!r}: data file {file.name!r} has an unknown format; accepted: .csv, .json, .jsonl")
        ds = load_dataset(fmt, data_files=str(file), split="train")
        cols = {f: self.data.get(f, f) for f in _FIELDS}
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
            shots = self._shots(i, len(rows))
            parts = [self.template.format(**rows[j]) + self.answer.format(**rows[j]) for j in shots]
            prompt = self.separator.join(parts + [self.template.format(**row)])
            out.append(Item(i, row["input"], row["output"], prompt, self.answer.format(**row),
                            self.argument.format(**row)))
        return out

    def _shots(self, index: int, n: int) -> list[int]:
        """Seeded per item (so --limit does not change the prompts), never the item itself."""
        if self.shots >= n:
            raise ProbeError(f"task {self.name!r}: {self.shots} shots need more than {n} items")
        rng = np.random.default_rng([self.seed, index])
        others = np.delete(np.arange(n), index)
        return [int(j) for j in rng.choice(others, size=self.shots, replace=False)]


def _check_template(name: str, key: str, text: str):
    for _, field, _, _ in string.Formatter().parse(text):
        if field is not None and field not in _FIELDS:
            raise ProbeError(f"task {name!r}: {key} uses unknown variable {{{field}}}; accepted: "
                             + ", ".join("{" + f + "}" for f in _FIELDS))


def load_task_file(path: Path) -> Task:
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise ProbeError(f"malformed task file {str(path)!r}: {getattr(e, 'problem', e)}")
    if not isinstance(spec, dict):
        raise ProbeError(f"task file {str(path)!r} must be a mapping")
    name = spec.get("name", Path(path).stem)
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ProbeError(f"task {name!r} ({path}) is missing field(s) {', '.join(missing)}; "
                         f"required: {', '.join(_REQUIRED)}")
    unknown = set(spec) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise ProbeError(f"task {name!r} has unknown field(s) {', '.join(sorted(unknown))}; "
                         f"accepted: {', '.join(list(_REQUIRED) + list(_OPTIONAL))}")
    if spec["kind"] not in _KINDS:
        raise ProbeError(f"task {name!r} has kind {spec['kind']!r}; accepted: {', '.join(_KINDS)}")
    if not isinstance(spec["data"], dict) or "file" not in spec["data"]:
        raise ProbeError(f"task {name!r}: data must be a mapping with 'file' (and optional input/output columns)")
    for key in ("template", "answer", "argument"):
        if key in spec:
            _check_template(name, key, spec[key])
    return Task(**{**_OPTIONAL, **spec, "path": Path(path)})


def available_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(tasks_dir().glob("*.yaml"))}


def load_task(name: str) -> Task:
    tasks = available_tasks()
    if name in tasks:
        return load_task_file(tasks[name])
    if Path(name).is_file():
        return load_task_file(Path(name))
    raise choice_error("task", name, list(tasks) + ["<task .yaml file>"])


def first_token(tokenizer, text: str) -> int:
    """The first token id of `text` as the model would emit it after a prompt (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ProbeError(f"{text!r} tokenizes to nothing")
    return ids[0]
