"""The LightningModule base of fkdiff's step-based training: randomness from (seed, step), optimizer with warm-up.

A training step draws its noise from `seeded_generator(seed, global_step, 0, "noise")` for the *global* batch and keeps
this rank's rows (`shard`), and the batch itself comes from `fkdiff.data.StepBatches` (a pure function of the seed and
the step, sliced per rank). So a step's work does not depend on the number of processes or on a resume: 1 and k DDP
processes, and a run resumed from `last.ckpt`, train identically to one uninterrupted process.
"""

from __future__ import annotations

from typing import Iterable

import lightning.pytorch as pl
import torch

from fkdiff.seeding import seeded_generator

__all__ = ["StepModule", "adam_with_warmup"]


def adam_with_warmup(params: Iterable[torch.nn.Parameter], lr: float, betas=(0.9, 0.999), weight_decay: float = 0.0,
                     warmup_steps: int = 0):
    """Adam with the learning rate ramped linearly over the first `warmup_steps` steps (Lightning's optimizer config)."""
    opt = torch.optim.Adam(params, lr=float(lr), betas=tuple(betas), weight_decay=float(weight_decay))
    warm = int(warmup_steps)
    if warm <= 0:
        return opt
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StepModule(pl.LightningModule):
    """Base of `TeacherModule` and `DistillationModule`: `seed`, per-step generators, this rank's share of the batch."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)

    def step_generator(self, stream: str = "noise", step: int | None = None, per_rank: bool = False) -> torch.Generator:
        """CPU generator of `stream` at `step` (default: the global step); `per_rank` gives each rank its own."""
        step = self.global_step if step is None else step
        return seeded_generator(self.seed, step, self.global_rank if per_rank else 0, stream)

    @property
    def shard(self) -> tuple[int, int]:
        """(rank, world size): this process holds rows rank, rank + w, ... of the global batch."""
        return self.global_rank, self.trainer.world_size
