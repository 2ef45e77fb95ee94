"""What training needs of a synthetic task (`task.generator` of a training config): one `Generator` each, with what
their data shares: targets IGNOREd where nothing is scored, word-level vocabularies and batches of equal-length rows.
The generators are in data.py (N-back, trees), icl_data.py (in-context classification) and lm_data.py (language
modelling); data.GENERATORS names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

IGNORE = -100  # the target of a position that is not scored


def word_tokenizer(words: list[str], pad: str):
    """A word-level tokenizer over `words` (their order is their ids) split on whitespace, with `pad` padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no model_max_length: the model's positions bound its inputs (checked before a probe runs), and a probe
    # tokenizes a prompt with its answer, one token past the sequence, which is never fed to the model
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, unk_token="<unk>")


class TensorRows(torch.utils.data.Dataset):
    """A split's equal-length rows as tensors, built once ({column: (rows, length)}). The data loader takes a batch
    as one index into each column (`__getitems__`), so a training step costs no Python per row; a row read alone
    (`data[i]`, iteration) is plain lists, as a `datasets.Dataset` row is."""

    def __init__(self, rows: list[dict] | None = None, columns: dict | None = None):
        self.columns = columns if columns is not None else {
            k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in (rows[0] if rows else ())}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, i: int) -> dict:
        return {k: v[i].tolist() for k, v in self.columns.items()}

    def __getitems__(self, indices: list[int]) -> dict:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: v[index] for k, v in self.columns.items()}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def select(self, indices) -> "TensorRows":
        return TensorRows(columns=self.__getitems__(list(indices)))


def collate_ids(rows) -> dict:
    """A batch: what `TensorRows.__getitems__` gives, as it is; or rows of equal-length token sequences (never
    padded: every generator's sequences have one length)."""
    if isinstance(rows, dict):
        return rows
    return {"input_ids": torch.tensor([r["input_ids"] for r in rows]), "target": torch.tensor([r["target"] for r in rows])}


@dataclass(frozen=True)
class Generator:
    """What training needs of a synthetic task: its config fields (type, default), checks, vocabulary, data,
    readout and names."""

    fields: dict  # name -> (type, default)
    check: Callable  # (task, where) -> None: raises ProbeError on values the fields' types cannot say
    tokenizer: Callable  # task -> its vocabulary as a tokenizer (saved with the model)
    splits: Callable  # (task, tokenizer) -> {'train': Dataset, 'test': Dataset}
    readout: Callable  # task -> the tokens the loss chooses among at each scored position; None: the whole vocabulary
    positions: Callable  # task -> input positions of a sequence
    run_name: Callable  # (task, seed) -> the run's folder name
    chance: Callable  # task -> the test accuracy of a model that always gives the commonest answer (None: unknown)
    summary: Callable  # task -> what a run trained on, in a few words
    collate: Callable = lambda splits: collate_ids  # the train split -> its batches' collate function
    eval_on_start: bool = False  # evaluate before the first step too (curves from step 0)
    extra_metrics: Callable | None = None  # (model, test splits, task) -> {name: value}, logged at every evaluation
    # (model, the epoch's first training batch, task) -> {name: value}, logged as train_<name> before that step
    epoch_metrics: Callable | None = None
    eval_batch: int = 64  # sequences per evaluation batch
    whole_sequences: bool = True  # also the accuracy of whole sequences (every scored position right)
    milestone: str | None = "eval_accuracy"  # the logged metric whose steps to 50% and 95% runs are compared on
