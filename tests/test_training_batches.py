"""The training split resident on the device (training/batches.py): its batches are those Trainer's own loader gave,
in the same order (per seed, per epoch, with drop_last, split over processes), a run trained on them is bit for bit
the run trained on Trainer's loader, windows that stop mid-epoch add up to the uninterrupted run, and after an
epoch's first batch nothing is copied to the device."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, SeedableRandomSampler
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Trainer

from probes.training import trainer as trainer_module
from probes.training.batches import DeviceBatches, DeviceOrder
from probes.training.config import load_training_config
from probes.training.data import GENERATORS, tokenizer_for
from probes.training.generator import collate_ids

from .conftest import ICL_TINY
from .test_training import PAPER, ROOT, TINY, Clock, assert_same_run

STANDARD = ROOT / "configs" / "training" / "nback-standard.yaml"  # GPT-2 with dropout: the global RNG matters
# 60 sequences in batches of 8: 7 full batches and a short one (or dropped) per epoch
SMALL = {"model.n_embd": 32, "model.n_layer": 1, "task.train": 60, "task.test": 16, "train.steps": 20,
         "train.batch_size": 8, "train.save_steps": 20, "train.eval_steps": 10, "train.lr": 1e-3}


def label_trainer(cfg: dict, tmp_path: Path, collate=None):
    """The run's Trainer (its arguments, split and collate) around a stand-in model, for its loaders."""
    gen = GENERATORS[cfg["task"]["generator"]]
    data = gen.splits(cfg["task"], tokenizer_for(cfg["task"]))
    args = trainer_module._arguments(tmp_path, cfg["train"], 1, False, gen)
    return trainer_module._trainer_class()(model=torch.nn.Linear(1, 1), args=args, train_dataset=data["train"],
                                           eval_dataset=data["test"], data_collator=collate or gen.collate(data))


def epochs(loader, n: int = 2) -> list[list[dict]]:
    """The batches of epochs 0 .. n-1, each after set_epoch as Trainer calls it."""
    out = []
    for e in range(n):
        loader.set_epoch(e)
        out.append(list(loader))
    return out


def same(a: list[list[dict]], b: list[list[dict]]) -> bool:
    return [[sorted(x) for x in e] for e in a] == [[sorted(y) for y in e] for e in b] and all(
        torch.equal(x[k], y[k]) for ea, eb in zip(a, b) for x, y in zip(ea, eb) for k in x)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("seed", [0, 3])
def test_the_batches_are_trainers_own_in_its_order(tmp_path, seed, drop_last):
    """Two epochs of the device path equal two of Trainer's own DataLoader (same seed): rows, order, the short last
    batch (or none with drop_last); the epochs differ, and another seed gives another order."""
    cfg = load_training_config(PAPER, {**TINY, "task.train": 60, "train.drop_last": drop_last}, seed=seed)
    trainer = label_trainer(cfg, tmp_path)
    new = trainer.get_train_dataloader()
    assert isinstance(new, DeviceBatches)
    got, old = epochs(new), epochs(Trainer.get_train_dataloader(trainer))
    assert same(got, old)
    assert [len(b["input_ids"]) for b in got[0]] == [8] * 7 + ([] if drop_last else [4])
    assert len(new) == len(got[0]) and not same(got[:1], got[1:])
    other = label_trainer(load_training_config(PAPER, {**TINY, "task.train": 60}, seed=seed + 1), tmp_path)
    assert not same(epochs(other.get_train_dataloader(), 1), got[:1])
    assert same(epochs(label_trainer(cfg, tmp_path).get_train_dataloader()), got)  # the same seed: the same


@pytest.mark.parametrize("n, batch, processes", [(60, 8, 2), (60, 4, 3), (20, 8, 2), (5, 4, 2)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_each_process_takes_accelerates_share_of_the_global_batch(n, batch, processes, drop_last):
    """Process p of K gets what accelerate's sharded sampler gives it in Trainer's loader (a global batch of K x
    batch, its p-th part; without drop_last the last global batch filled from the epoch's start), and the K parts of
    a global batch are one process's global batch."""
    for epoch in (0, 1):
        parts = []
        for p in range(processes):
            ours = DeviceOrder(n, batch, drop_last, 7, "cpu", processes, p)
            sampler = SeedableRandomSampler(range(n), data_seed=7)
            theirs = BatchSamplerShard(torch.utils.data.BatchSampler(sampler, batch, drop_last), processes, p)
            ours.set_epoch(epoch)
            sampler.set_epoch(epoch)
            mine = [b.tolist() for b in ours]
            assert mine == list(theirs) and len(ours) == len(theirs) == len(mine)
            assert all(len(b) == batch for b in mine)  # several processes: never a short batch
            parts.append(mine)
        one = DeviceOrder(n, batch * processes, drop_last, 7, "cpu")
        one.set_epoch(epoch)
        whole = [b.tolist() for b in one]
        joined, full = [sum(ps, []) for ps in zip(*parts)], n // (batch * processes)
        assert joined[:full] == whole[:full]
        if not drop_last and n % (batch * processes):  # the last global batch: the epoch's end, then its start
            assert joined[-1] == whole[-1] + (whole[0] * processes)[:batch * processes - len(whole[-1])]


class DeviceCopies(TorchDispatchMode):
    """Copies of a tensor from one device to another, counted."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (args[1], args[0]) if func is torch.ops.aten.copy_.default else (args[0], out)
            self.count += src.device != dst.device
        return out


def test_batches_are_drawn_on_the_device_with_one_copy_an_epoch(tmp_path):
    """On another device (meta: no data, but every operation dispatched as on a GPU), the rows are copied there once;
    each epoch then copies its order there with its first batch and nothing after: every batch is indexed there.
    (A batch made on the host and sent over, as Trainer's loader does at every step, counts a copy per column.)"""
    cfg = load_training_config(PAPER, {**TINY, "task.train": 60}, seed=0)
    rows = label_trainer(cfg, tmp_path).train_dataset
    with DeviceCopies() as copies:
        loader = DeviceBatches(rows, 8, False, 0, "meta")
    assert copies.count == 2  # input_ids and target, once
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches, counts = iter(loader), []
        while True:
            with DeviceCopies() as copies:
                batch = next(batches, None)
            if batch is None:
                break
            counts.append(copies.count)
            assert all(v.device.type == "meta" and v.shape == (8 if len(counts) < 8 else 4, 24) for v in batch.values())
        assert counts == [1] + [0] * 7
    with DeviceCopies() as copies:
        {k: v.to("meta") for k, v in rows.__getitems__(list(range(8))).items()}
    assert copies.count == 2


def test_other_collates_keep_trainers_loader(tmp_path):
    """Fresh sequences made per batch (icl) and a split given another collate have nothing to keep on the device."""
    icl = load_training_config(ROOT / "configs" / "training" / "icl-cpu.yaml", ICL_TINY, seed=0)
    assert not isinstance(label_trainer(icl, tmp_path).get_train_dataloader(), DeviceBatches)
    cfg = load_training_config(PAPER, TINY, seed=0)
    assert not isinstance(label_trainer(cfg, tmp_path, collate=lambda rows: collate_ids(rows)).get_train_dataloader(),
                          DeviceBatches)


def trainers_loader():
    """_trainer_class with Trainer's own train loader (the path before batches.py)."""
    make = trainer_module._trainer_class

    def old():
        class Old(make()):
            def get_train_dataloader(self):
                return Trainer.get_train_dataloader(self)
        return Old
    return old


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_run_on_device_batches_is_the_run_on_trainers_loader(tmp_path, monkeypatch, drop_last):
    """GPT-2 with dropout, 20 steps over 3 epochs: the weights and the log of a run equal, bit for bit, those of the
    same run on Trainer's own loader (the same batches, and the same draws of the global RNG that dropout reads)."""
    cfg = load_training_config(STANDARD, {**SMALL, "train.drop_last": drop_last}, seed=0)
    new = trainer_module.train(cfg, tmp_path / "new", progress=False)
    monkeypatch.setattr(trainer_module, "_trainer_class", trainers_loader())
    old = trainer_module.train(cfg, tmp_path / "old", progress=False)
    a, b = load_file(new / "model.safetensors"), load_file(old / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (new / "log.csv").read_text() == (old / "log.csv").read_text()


def test_windows_that_stop_mid_epoch_end_as_an_uninterrupted_run(tmp_path, monkeypatch):
    """Windows stopping at steps 6, 12 and 18 (8 batches an epoch: mid-epoch each time, the resumed run skipping
    the batches trained) end with the uninterrupted run's weights, optimizer state and log, bit for bit."""
    cfg = load_training_config(STANDARD, {**SMALL, "train.steps": 24, "train.log_steps": 6, "train.eval_steps": 12,
                                          "train.save_steps": 24}, seed=0)
    whole = trainer_module.train(cfg, tmp_path / "whole", progress=False)
    monkeypatch.setattr(trainer_module, "time", Clock())
    out, paused = tmp_path / "windows", []
    for window in range(6):
        trainer_module.train(cfg, out, resume=window > 0, progress=False, minutes=1 / 60)
        meta = json.loads((out / "meta.json").read_text())
        if meta["status"] == "complete":
            break
        paused.append(meta["steps"])
    assert paused == [6, 12, 18] and meta["status"] == "complete"
    assert_same_run(whole, out, 24)
