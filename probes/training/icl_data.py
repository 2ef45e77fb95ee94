"""Training on Reddy's in-context classification task (generator `icl`; the sequences and test sets:
tasks/icl_sequences.py): fresh sequences at every step, the four fixed test sets, and the query's attention on the
matching items logged at every evaluation."""

from __future__ import annotations

import numpy as np
import torch

from ..tasks import icl_sequences
from ..tasks.icl_sequences import Classes, length, query_mass, test_set
from .generator import IGNORE, Generator, word_tokenizer


def targets(label: np.ndarray, T: int) -> np.ndarray:
    """(n, T) training targets: the label at the query (the last position), IGNORE elsewhere."""
    out = np.full((len(label), T), IGNORE, dtype=np.int64)
    out[:, -1] = label
    return out


class Fresh(torch.utils.data.Dataset):
    """Training data: `size` indices; `collate` turns a batch of indices into fresh sequences, seeded by the
    indices (so a run resumed from a checkpoint sees the batches an uninterrupted one sees)."""

    def __init__(self, task: dict, size: int):
        self.classes, self.size = Classes(task), size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, indices: list[int]) -> dict:
        rng = np.random.default_rng([self.classes.task["seed"], 1, *indices])
        s = self.classes.sample(len(indices), rng, "train")
        return {"inputs_embeds": torch.from_numpy(s["inputs_embeds"]),
                "target": torch.from_numpy(targets(s["target"], length(self.classes.task)))}


class Fixed(torch.utils.data.Dataset):
    """A test set: `n` sequences of one kind, drawn once from the task's seed."""

    def __init__(self, task: dict, kind: str, n: int):
        s = test_set(task, kind, n)
        self.x, self.y = torch.from_numpy(s["inputs_embeds"]), torch.from_numpy(targets(s["target"], length(task)))
        self.classes, self.labels, self.match = s["classes"], s["labels"], torch.from_numpy(s["match"])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"inputs_embeds": self.x[i], "target": self.y[i]}


def collate(fresh: Fresh):
    """Batches of fresh training sequences (from indices) and of a test set's rows (dicts), alike."""
    def batch(rows: list) -> dict:
        if isinstance(rows[0], int):
            return fresh.collate(rows)
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    return batch


@torch.no_grad()
def query_attention(model, data: Fixed, batch: int = 1000) -> dict:
    """Per layer, the attention of the query (the last position; mean over heads and sequences) on the context
    items of its class and on their labels, and what uniform attention would give them: the circuit the task is
    known for reads the matching item's label at the query."""
    layers = model.model.layers
    mass = {f"query_{part}_L{i}": 0.0 for i in range(len(layers)) for part in ("item", "label")}
    uniform = 0.0
    for start in range(0, len(data), batch):
        x, match = data.x[start:start + batch], data.match[start:start + batch].float()
        seen = []
        hooks = [layer.attn.register_forward_hook(lambda m, i, o: seen.append(o[1])) for layer in layers]
        try:
            model(inputs_embeds=x.to(model.device), logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        for i, probs in enumerate(seen):
            item, label = query_mass(probs[:, :, -1, :].mean(1).cpu(), match)  # the query's row, mean over heads
            mass[f"query_item_L{i}"] += float(item.sum())
            mass[f"query_label_L{i}"] += float(label.sum())
        uniform += float(match.sum()) / x.shape[1]
    return {**{k: v / len(data) for k, v in mass.items()}, "query_uniform": uniform / len(data)}


def labels(task: dict) -> tuple:
    return tuple(str(i) for i in range(task["labels"]))


def splits(task: dict, tokenizer) -> dict:
    """{'train': fresh sequences (task.train of them per epoch), 'test': {in, ic, ic2, iw}: task.test each}."""
    return {"train": Fresh(task, task["train"]), "test": {k: Fixed(task, k, task["test"]) for k in icl_sequences.TESTS}}


GENERATOR = Generator(
    {**icl_sequences.FIELDS, "train": (int, 9_600_000)}, check=icl_sequences.check,
    tokenizer=lambda t: word_tokenizer([*labels(t), "<pad>", "<unk>"], pad="<pad>"), splits=splits, readout=labels,
    positions=icl_sequences.length, run_name=lambda t, seed: f"seed{seed}", chance=lambda t: 1 / t["labels"],
    summary=lambda t: f"in-context classification, {t['pairs']} pairs", collate=lambda splits: collate(splits["train"]),
    eval_on_start=True, eval_batch=1000, milestone="eval_ic_accuracy",
    extra_metrics=lambda model, test, task: {f"ic_{k}": v for k, v in query_attention(model, test["ic"]).items()})
