"""Documents of natural text, for measures over a whole context (the in-context learning score). From a JSONL file
(one {"text": ...} per line) or a plain-text file whose documents are separated by a line holding only
`<|endoftext|>` (as TinyStories writes them), or from a data set by name through `datasets` (e.g. TinyStories:
`dataset: roneneldan/TinyStories`, `split: validation`), the first `documents` of at least `min_chars` characters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ProbeError
from ..paths import tasks_dir
from .base import Item, Task

SEPARATOR = "<|endoftext|>"


@dataclass
class TextTask(Task):
    data: dict = field(default_factory=dict)  # {file: path (relative to tasks/), or dataset: NAME, split, column}
    documents: int = 100
    min_chars: int = 0
    max_chars: int = 6000  # each document cut to this many characters (over 1,000 tokens of English; within contexts)
    _docs: list | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.data, dict) or ("file" in self.data) == ("dataset" in self.data):
            raise ProbeError(f"task {self.name!r}: data must name a file or a dataset (one of them); accepted: "
                             "{file: docs.jsonl} or {dataset: roneneldan/TinyStories, split: validation}")
        if self.documents < 1 or self.max_chars < 1:
            raise ProbeError(f"task {self.name!r}: documents {self.documents}, max_chars {self.max_chars}; accepted: "
                             "1 or more of each")

    def texts(self) -> list[str]:
        if self._docs is None:
            self._docs = [t for t in self._read() if len(t) >= self.min_chars][: self.documents]
            if not self._docs:
                raise ProbeError(f"task {self.name!r}: no document of at least {self.min_chars} characters in "
                                 f"{self.data}; accepted: a smaller min_chars")
        return self._docs

    def _read(self):
        if "dataset" in self.data:
            from datasets import load_dataset

            rows = load_dataset(self.data["dataset"], split=self.data.get("split", "validation"), streaming=True)
            column = self.data.get("column", "text")
            return (r[column].strip() for r in rows.take(self.documents * 4))
        path = Path(self.data["file"])
        path = path if path.is_absolute() else (Path(self.path).parent if self.path else tasks_dir()) / path
        if not path.is_file():
            raise ProbeError(f"task {self.name!r}: data file {str(path)!r} not found; accepted: a .jsonl or .txt file")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            try:
                return [json.loads(line)["text"].strip() for line in text.splitlines() if line.strip()]
            except (ValueError, KeyError, TypeError):
                raise ProbeError(f"task {self.name!r}: {path} must hold one {{\"text\": ...}} object per line") from None
        return [d.strip() for d in text.split(f"\n{SEPARATOR}\n") if d.strip()]

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        out = [Item(i, t[:60], "", t[: self.max_chars], "", "", extra={"document": i})
               for i, t in enumerate(self.texts())]
        if inputs is not None:
            out = [it for it in out if it.input in inputs]
        return out[:limit] if limit else out

    def ambiguity(self, tokenizer) -> dict[int, str]:
        return {}  # no answers to be ambiguous
