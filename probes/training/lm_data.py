"""Language modelling on natural text (generator `text`): next-token prediction on blocks of `context` tokens.

The corpus (tasks/corpus.py: a registry package's English text, a data set by name, or a file) is split by document
(every `holdout`-th held out); a byte-level BPE of `vocab` tokens is trained by `tokenizers` on the training documents
(deterministic, so a resumed run rebuilds the same one; it is saved with the model). Documents are tokenized, each
ended by <|endoftext|>, joined, and cut into blocks of context + 1 tokens (as transformers' run_clm groups texts; the
tail of each batch of 1,000 documents that fills no block is dropped): a block's first `context` tokens are the
input, its last `context` the target. The test set is the first `test` blocks of the held-out documents. At every
evaluation the run also logs the in-context learning score on them (Olsson et al.): the loss late in a block minus
the loss early, each the mean over the WINDOW tokens up to token `late` (500, capped to the block) and up to token
`early` (50). The icl-score probe reads single tokens over many documents, with intervals; over a few dozen fixed
test blocks, a single token's loss is mostly the luck of which tokens sit there, hence the windows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..errors import ProbeError
from ..methods.icl_score import EARLY, LATE, token_losses
from ..tasks import corpus as corpora
from .generator import Generator, TensorRows

FIELDS = {"generator": (str, "text"), "corpus": (str, "stdlib-english"), "vocab": (int, 8192), "context": (int, 256),
          "holdout": (int, 50), "test": (int, 64), "seed": (int, 0)}
WINDOW = 21  # tokens averaged up to each
BATCH = 1000  # documents tokenized together


def check(task: dict, where: str) -> None:
    corpora.check(task["corpus"], where)
    if task["vocab"] < 257:
        raise ProbeError(f"{where}: task.vocab {task['vocab']}; accepted: 257 or more (the 256 bytes and "
                         "<|endoftext|>)")
    for key in ("context", "holdout"):
        if task[key] < 2:
            raise ProbeError(f"{where}: task.{key} {task[key]}; accepted: 2 or more")


def documents(task: dict, part: str):
    """The corpus's training or held-out documents as a `datasets.Dataset` with a `text` column (read and split
    once per process: the tokenizer and the blocks both read the training documents; a file corpus again when the
    file changed)."""
    name = task["corpus"]
    path = Path(name.partition(":")[2]) if name.startswith("file:") else None
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path is not None and path.exists() else None
    return _documents(name, task["holdout"], part, stamp)


@functools.lru_cache(maxsize=4)
def _documents(name: str, holdout: int, part: str, stamp: tuple | None = None):
    from datasets import Dataset, load_dataset

    if name.startswith("dataset:"):  # memory-mapped, never a Python list: TinyStories is 2.1M stories
        ds = load_dataset(name.partition(":")[2], split="train").select_columns(["text"])
    else:
        ds = Dataset.from_dict({"text": corpora.documents(name)})
    return ds.filter(lambda _, i: (i % holdout == 0) == (part == "test"), with_indices=True)


def tokenizer(task: dict):
    from ..models.loading import bpe_tokenizer

    train = documents(task, "train")
    return bpe_tokenizer((b["text"] for b in train.iter(batch_size=BATCH)), task["vocab"], max_length=task["context"])


def blocks(docs, tok, context: int):
    """(input_ids, target) rows of `context` tokens each from the documents, as described above."""
    size, eos = context + 1, tok.eos_token_id

    def group(batch):
        ids = [t for ids in tok(batch["text"], verbose=False).input_ids for t in (*ids, eos)]
        starts = range(0, len(ids) - size + 1, size)
        return {"input_ids": [ids[s:s + context] for s in starts], "target": [ids[s + 1:s + size] for s in starts]}

    return docs.map(group, batched=True, batch_size=BATCH, remove_columns=docs.column_names)


def splits(task: dict, tok) -> dict:
    train = blocks(documents(task, "train"), tok, task["context"])
    test = blocks(documents(task, "test"), tok, task["context"])
    if not len(train) or not len(test):
        raise ProbeError(f"corpus {task['corpus']!r} gives {len(train)} training and {len(test)} test blocks of "
                         f"{task['context'] + 1} tokens; accepted: more text, or a smaller context or holdout")
    rows = TensorRows(columns={k: torch.tensor(train[k], dtype=torch.long) for k in ("input_ids", "target")})
    return {"train": rows, "test": test.select(range(min(task["test"], len(test))))}


def icl_score(model, test, batch: int = 16) -> dict:
    """The mean loss over the WINDOW tokens up to token `early` and up to token `late` of the test blocks, and their
    difference (negative: later tokens are predicted better, from the context)."""
    context = len(test[0]["input_ids"])
    early, late = min(EARLY, context - 2), min(LATE, context - 1)  # as the icl-score probe can read them
    # position p of a block predicts token p + 1 from the p + 1 tokens before it: token t is position t - 1
    windows = [list(range(max(0, t - WINDOW), t)) for t in (early, late)]
    sums = torch.zeros(2)
    for start in range(0, len(test), batch):
        rows = test[start:start + batch]
        x, y = torch.tensor(rows["input_ids"]), torch.tensor(rows["target"])
        with torch.no_grad():
            logits = model(input_ids=x.to(model.device)).logits.float().cpu()
        for i, w in enumerate(windows):
            sums[i] += token_losses(logits[:, w], y[:, w]).mean(1).sum()
    e, l = (sums / len(test)).tolist()
    return {"loss_early": e, "loss_late": l, "icl_score": l - e}


GENERATOR = Generator(
    FIELDS, check=check, tokenizer=tokenizer, splits=splits, readout=lambda t: None, positions=lambda t: t["context"],
    run_name=lambda t, seed: f"seed{seed}", chance=lambda t: None,
    summary=lambda t: f"{t['corpus']}, {t['context']}-token blocks",
    extra_metrics=lambda model, test, task: icl_score(model, test), eval_batch=16, whole_sequences=False, milestone=None)
