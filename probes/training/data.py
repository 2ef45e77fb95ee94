"""A synthetic task's data and vocabulary for training.

N-back: the letters come from the same generator as the prompted N-back task (tasks/nback.py: exactly `matches`
targets at positions >= N, no accidental match anywhere), training sequences and test sequences from disjoint
indices. The model reads the letters alone; at each position from N on, its answer is its choice between the two
label tokens "m" (match) and "-". The vocabulary is a `tokenizers` word-level tokenizer saved with the model, so
the project's `nback` task files for trained models (tasks/nback-trained*.yaml) run on a checkpoint unchanged.
"""

from __future__ import annotations

from ..errors import ProbeError
from ..tasks.nback import NBack

LABELS = ("-", "m")  # target 0: no match, 1: match
IGNORE = -100  # positions before N are not scored


def nback_generator(task: dict, n: int | None = None) -> NBack:
    """The N-back sequence generator of the training task (letters joined by spaces, no feedback)."""
    if set(task["letters"]) & set("".join(LABELS)) or len(set(task["letters"])) != len(task["letters"]):
        raise ProbeError(f"task letters {task['letters']!r}; accepted: distinct letters other than {LABELS}")
    return NBack(name="nback-train", version=1, kind="nback", seed=task["seed"], n=[n or task["n"]],
                 sequences=task["train"] + task["test"], length=task["length"], matches=task["matches"],
                 letters=task["letters"], instruction="", trial="{letter}", separator=" ", feedback=False)


def tokenizer_for(task: dict):
    """A word-level tokenizer over the task's letters and the two labels (ids: pad, unk, letters..., -, m)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *task["letters"], *LABELS])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no model_max_length: the model's positions bound its inputs (checked before a probe runs), and a probe
    # tokenizes a prompt with its answer, one token past the sequence, which is never fed to the model
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>")


def nback_splits(task: dict, tokenizer) -> dict:
    """{'train': Dataset, 'test': Dataset} of (input_ids, target) per sequence."""
    from datasets import Dataset

    gen = nback_generator(task)
    n = task["n"]
    ids = tokenizer.convert_tokens_to_ids
    rows = []
    for s in range(task["train"] + task["test"]):
        letters, labels = gen.sequence(n, s)
        rows.append({"input_ids": ids(letters),
                     "target": [IGNORE if t < n else int(m) for t, m in enumerate(labels)]})
    return {"train": Dataset.from_list(rows[: task["train"]]), "test": Dataset.from_list(rows[task["train"]:])}
