"""Documents of natural text, for measures over a whole context (the in-context learning score). From a JSONL file
(one {"text": ...} per line) or a plain-text file whose documents are separated by a line holding only
`<|endoftext|>` (as TinyStories writes them), from a data set by name through `datasets` (e.g. TinyStories:
`dataset: roneneldan/TinyStories`, `split: validation`), or from a training corpus's held-out or training documents
(`corpus: stdlib-english`, `split: test`, `holdout: 50`: tasks/corpus.py, the documents a text-trained model did not
see); the first `documents` of at least `min_chars` characters. With `chunk: N`, each document is first cut into
consecutive pieces of about N characters (at whitespace), each its own item: many contexts from a few long texts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..errors import ProbeError
from ..paths import tasks_dir
from . import corpus
from .base import Item, Task
from .kinds import register_kind

SOURCES = ("file", "dataset", "corpus")


@register_kind("text", required=("data",))
@dataclass
class TextTask(Task):
    SCHEMA: ClassVar[dict] = {
        "data": ("text: {file: docs.jsonl or .txt}, {dataset: NAME, split, column} or {corpus: stdlib-english, "
                 "split: test, holdout: 50} (a training corpus's held-out documents)", "{file: docs.jsonl}"),
        "documents": ("text: how many documents (the first ones long enough)", "100"),
        "min_chars": ("text: documents shorter than this are skipped", "2000"),
        "max_chars": ("text: each document cut to this many characters", "6000"),
        "chunk": ("text: cut each document into pieces of about this many characters first, one item each (0: "
                  "whole documents)", "1500"),
    }
    NONNEGATIVE: ClassVar[tuple] = ("documents", "min_chars", "max_chars")

    data: dict = field(default_factory=dict)  # {file: path (relative to tasks/)}, {dataset: NAME, split, column}
    # or {corpus: NAME, split: test|train, holdout: N}
    documents: int = 100
    min_chars: int = 0
    max_chars: int = 6000  # each document cut to this many characters (over 1,000 tokens of English; within contexts)
    chunk: int = 0  # characters per piece a document is cut into (0: whole documents)
    _docs: list | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.data, dict) or sum(k in self.data for k in SOURCES) != 1:
            raise ProbeError(f"task {self.name!r}: data must name one file, dataset or corpus; accepted: "
                             "{file: docs.jsonl}, {dataset: roneneldan/TinyStories, split: validation} or "
                             "{corpus: stdlib-english, split: test}")
        if "corpus" in self.data:
            corpus.check(self.data["corpus"], f"task {self.name!r}")
            holdout = self.data.get("holdout", 50)
            if self.data.get("split", "test") not in ("train", "test") or not isinstance(holdout, int) \
                    or isinstance(holdout, bool) or holdout < 2:
                raise ProbeError(f"task {self.name!r}: corpus split {self.data.get('split')!r}, holdout "
                                 f"{self.data.get('holdout')!r}; accepted: split train or test, holdout 2 or more")
        if self.documents < 1 or self.max_chars < 1 or self.chunk < 0:
            raise ProbeError(f"task {self.name!r}: documents {self.documents}, max_chars {self.max_chars}, chunk "
                             f"{self.chunk}; accepted: 1 or more documents and max_chars, chunk 0 or more")

    def texts(self) -> list[str]:
        if self._docs is None:
            docs = (p for t in self._read() for p in (_pieces(t, self.chunk) if self.chunk else [t]))
            self._docs = [t for t in docs if len(t) >= self.min_chars][: self.documents]
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
        if "corpus" in self.data:
            docs = corpus.documents(self.data["corpus"], self._folder())
            return corpus.split(docs, self.data.get("holdout", 50), self.data.get("split", "test"))
        try:
            return corpus.read_file(self._folder() / self.data["file"])
        except ProbeError as e:
            raise ProbeError(f"task {self.name!r}: {e}") from None

    def _folder(self) -> Path:
        return Path(self.path).parent if self.path else tasks_dir()

    def items(self, limit: int | None = None, inputs: list[str] | None = None,
              shot_exclude: set[int] = frozenset()) -> list[Item]:
        out = [Item(i, t[:60], "", t[: self.max_chars], "", "", extra={"document": i})
               for i, t in enumerate(self.texts())]
        if inputs is not None:
            out = [it for it in out if it.input in inputs]
        return out[:limit] if limit else out

    def ambiguity(self, tokenizer) -> dict[int, str]:
        return {}  # no answers to be ambiguous


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into consecutive pieces of at most `size` characters, each ending at whitespace where it can."""
    out, start = [], 0
    while start < len(text):
        end = start + size
        if end < len(text):
            cut = text.rfind(" ", start + 1, end)
            end = cut if cut > start else end
        out.append(text[start:end].strip())
        start = end
    return [p for p in out if p]
