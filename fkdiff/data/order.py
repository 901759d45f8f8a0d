"""The order of training batches as a pure function of (seed, step): `StepBatches`, shared by every training run.

Step k lies in epoch e = k // steps_per_epoch; epoch e visits the dataset in the order of a permutation drawn from
`seeded_generator(seed, e, 0, "data")` (fkdiff.seeding); step k takes the next `batch_size` indices of it (the partial
last batch of an epoch is dropped). Under DDP, rank r of w takes rows r, r + w, ... of the global batch, so the global
batch does not depend on the number of processes. Iteration starts at `start_step_fn()` (read when the iterator is
created, i.e. after a checkpoint was restored), so a resumed run continues the exact sequence. With DataLoader
workers, worker i of m yields the steps start + i, start + i + m, ... and the loader interleaves them in order.

Lightning-free: the datamodules (`fkdiff.data.modules`) wrap it, reading the step, rank and world size from their
trainer.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from fkdiff.seeding import seeded_generator

__all__ = ["StepBatches"]


class StepBatches(IterableDataset):
    """Endless global batches where the batch of step k is a pure function of (seed, k) (module docstring).

    `dataset`: a map-style dataset (with `__getitems__` for one-index batch gathering, or `__getitem__`);
    `batch_size`: the global batch; `collate_fn`: applied to the gathered examples (default: default_collate).
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate_fn: Callable | None = None,
                 start_step_fn: Callable[[], int] = lambda: 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.collate_fn = collate_fn or default_collate
        self.start_step_fn, self.rank, self.world_size = start_step_fn, int(rank), int(world_size)
        self.n = len(dataset)
        if self.batch_size > self.n:
            raise ValueError(f"batch size {self.batch_size} exceeds the {self.n} training examples")
        if self.batch_size % self.world_size:
            raise ValueError(f"global batch size {self.batch_size} is not divisible by the {self.world_size} processes")
        self.steps_per_epoch = self.n // self.batch_size

    def indices(self, step: int) -> Tensor:
        """Global batch indices of step `step`. `[batch_size]`."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch, 0, "data"))
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size]

    def fetch(self, idx: Tensor):
        """This rank's rows of the examples `idx`, collated."""
        if hasattr(self.dataset, "__getitems__"):
            return self.collate_fn(self.dataset.__getitems__(idx.tolist()))
        return self.collate_fn([self.dataset[int(i)] for i in idx])

    def __iter__(self) -> Iterator:
        worker = get_worker_info()
        offset, stride = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        step = int(self.start_step_fn()) + offset
        while True:
            yield self.fetch(self.indices(step)[self.rank::self.world_size])
            step += stride
