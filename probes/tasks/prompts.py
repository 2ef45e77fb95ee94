"""Prompts a user lists: a CSV or JSONL file with `prompt` and `answer` columns (and optionally `argument`,
`group`), or one prompt from the command line (`--prompt TEXT --answer TEXT`). No template, no worked examples:
each row is one item, scored on the first token of its answer as it continues the prompt.

The answer (and argument) follow the prompt after `delimiter` (default one space, as lm-evaluation-harness'
`target_delimiter`) unless they begin with whitespace or the prompt ends with it, so "The capital of France is" +
"Paris" is scored on " Paris". Ambiguous items are flagged, not dropped (the user chose them)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeError
from .base import Item, Task

COLUMNS = ("prompt", "answer", "argument", "group")
FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json"}


@dataclass
class Prompts(Task):
    file: str = ""  # CSV or JSONL; relative paths are to the current folder
    prompts: list = field(default_factory=list)  # or the rows themselves: [{prompt, answer[, argument, group]}]
    delimiter: str = " "
    ambiguous: str = "flag"
    _rows: list | None = field(default=None, init=False, repr=False, compare=False)

    def rows(self) -> list[dict]:
        if self._rows is None:
            self._rows = self._check(self._read() if self.file else list(self.prompts))
        return self._rows

    def _read(self) -> list[dict]:
        from datasets import disable_progress_bars, load_dataset

        path = Path(self.file)
        if path.suffix not in FORMATS:
            raise ProbeError(f"prompts file {self.file!r} has an unknown format; accepted: .csv, .jsonl")
        if not path.is_file():
            raise ProbeError(f"prompts file {self.file!r} not found")
        disable_progress_bars()
        try:
            ds = load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets raises several types for an empty or unreadable file
            raise ProbeError(f"prompts file {self.file!r} has no rows or cannot be read ({type(e).__name__})")
        return [dict(r) for r in ds]

    def _check(self, rows: list) -> list[dict]:
        where = f"prompts file {self.file!r}" if self.file else "prompts"
        if not rows:
            raise ProbeError(f"{where} has no rows; accepted: rows with prompt and answer")
        has_argument = None
        out = []
        for i, row in enumerate(rows, start=1):
            if not isinstance(row, dict):
                raise ProbeError(f"{where}: row {i} is not a mapping; accepted: prompt, answer[, argument, group]")
            unknown = sorted(set(row) - set(COLUMNS))
            if unknown:
                raise ProbeError(f"{where} has unknown column(s) {', '.join(unknown)}; accepted: "
                                 + ", ".join(COLUMNS))
            cells = {k: "" if row.get(k) is None else str(row[k]) for k in COLUMNS}
            for key in ("prompt", "answer"):
                if not cells[key].strip():
                    raise ProbeError(f"{where}: row {i} has no {key}; accepted: a text in every prompt and answer")
            given = bool(cells["argument"].strip())
            if has_argument is not None and given != has_argument:
                raise ProbeError(f"{where}: row {i} {'has' if given else 'has no'} argument unlike row 1; "
                                 "accepted: an argument in every row or in none")
            has_argument = given
            out.append(cells)
        return out

    def data_digest(self) -> str | None:
        return hashlib.sha256(json.dumps(self.rows(), sort_keys=True).encode()).hexdigest()[:16]

    def _continue(self, prompt: str, text: str) -> str:
        """`text` as it is emitted after `prompt`: the delimiter in between unless either side has whitespace."""
        return text if not text or text[0].isspace() or prompt[-1:].isspace() else self.delimiter + text

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        out = []
        for i, r in enumerate(self.rows()):
            if (limit and i >= limit) or (inputs is not None and r["prompt"] not in inputs):
                continue
            argument = r["argument"].strip()
            out.append(Item(i, r["prompt"], r["answer"].strip(), r["prompt"], self._continue(r["prompt"], r["answer"]),
                            self._continue(r["prompt"], argument) if argument else "", group=r["group"]))
        return out

    def provenance(self) -> dict:
        return {"prompts": self.rows()}


OPTIONS = {"delimiter": str, "ambiguous": str, "seed": int}  # what --task-option may set on prompts


def prompts_task(file: str | Path | None = None, rows: list[dict] | None = None, overrides: dict | None = None
                 ) -> Prompts:
    """A prompts task from a file, or from rows given directly; named after the file, or after its content.
    `overrides`: delimiter, ambiguous (flag or drop) and seed, as --task-option sets them."""
    if (file is None) == (rows is None):
        raise ProbeError("give prompts as a file or as rows, not both or neither")
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if key not in OPTIONS:
            raise ProbeError(f"prompts take no task option {key!r}; accepted: {', '.join(OPTIONS)}")
        if not isinstance(value, OPTIONS[key]) or isinstance(value, bool):
            raise ProbeError(f"prompts task option {key} {value!r} is not {OPTIONS[key].__name__}")
    if overrides.get("ambiguous", "flag") not in ("flag", "drop"):
        raise ProbeError(f"prompts task option ambiguous {overrides['ambiguous']!r}; accepted: drop, flag")
    common = dict(version=1, kind="prompts", overrides=overrides, **overrides)
    if file is not None:
        path = Path(file).resolve()
        task = Prompts(name=f"prompts-{path.stem}", file=str(path), source=str(path), **common)
    else:
        task = Prompts(name="prompts", prompts=list(rows), source="given directly", **common)
        task.name = f"prompts-{task.data_digest()[:8]}"
    task.rows()  # refused now if malformed, before any model loads
    return task
