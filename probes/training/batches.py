"""The training split resident on the model's device, each batch drawn from it there by index: a training step
collates and copies nothing on the host (transformers' own loader indexes the host split, collates and copies every
batch to the device, which a GPU step then waits on).

The order is the one Trainer's own loader gives (accelerate's seedable sampler over a BatchSampler, sharded over the
processes), so runs reproduce: epoch e is `torch.randperm(n)` from a generator seeded `data_seed + e`, drawn on the
host once per epoch and copied to the device once; global batch j is its positions j*B .. (j+1)*B, of which process p
of K takes the p-th B/K; with several processes and no drop_last, the permutation continues from its start to fill
the last global batch (accelerate's even_batches); with one, the last batch is short.

`DeviceBatches` is a torch DataLoader over the resident rows with that order as its batch sampler, which keeps two
things of Trainer's loader: a run resumed mid-epoch skips the batches already trained with accelerate's
skip_first_batches (which rebuilds a DataLoader over `dataset` and `batch_sampler`), and every pass draws the
DataLoader's base seed from the global RNG, which dropout reads after it."""

from __future__ import annotations

import torch

from .generator import TensorRows, collate_ids


class DeviceOrder:
    """The batch sampler: this process's index tensors (on `device`) into the resident rows, epoch by epoch."""

    def __init__(self, n: int, batch: int, drop_last: bool, seed: int | None, device, processes: int = 1,
                 index: int = 0):
        self.n, self.batch, self.drop_last, self.device = n, batch, drop_last, torch.device(device)
        self.processes, self.index = processes, index
        self.seed = seed if seed is not None else torch.random.initial_seed()  # accelerate's, without a data_seed
        self.epoch = 0

    def __len__(self) -> int:
        """Batches per epoch for each process (the global batch is batch x processes)."""
        size = self.batch * self.processes
        return self.n // size if self.drop_last else -(-self.n // size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self) -> torch.Tensor:
        """This epoch's order on the host, continued from its start where the processes need full last batches."""
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.processes > 1 and not self.drop_last:
            order = order.repeat(-(-len(self) * self.batch * self.processes // self.n))
        return order

    def __iter__(self):
        order = self.permutation().to(self.device)  # the epoch's one copy to the device
        for j in range(len(self)):
            start = (j * self.processes + self.index) * self.batch
            yield order[start:start + self.batch]


class DeviceBatches(torch.utils.data.DataLoader):
    """Dict batches of device tensors: `rows` (a TensorRows split, whose batches are its columns indexed as they
    are: collate_ids) copied to `device` once, then indexed there. Generators with another collate (fresh sequences
    made per batch, icl_data.py) have no split to keep on the device: they keep Trainer's loader."""

    def __init__(self, rows: TensorRows, batch: int, drop_last: bool, seed: int | None, device, processes: int = 1,
                 index: int = 0):
        resident = TensorRows(columns={k: v.to(device) for k, v in rows.columns.items()})
        super().__init__(resident, batch_sampler=DeviceOrder(len(rows), batch, drop_last, seed, device, processes,
                                                             index), collate_fn=collate_ids)

    def set_epoch(self, epoch: int) -> None:
        """Called by Trainer before each epoch (after a resume, its sampler is reached through the skipping one)."""
        self.batch_sampler.set_epoch(epoch)
