"""Callbacks of a distillation run: validation plots of the student (exp(-E) and ODE samples, or image grids).

`SamplePlots` keeps the first validation batch (through the public `on_validation_batch_end` hook), draws the
student's figure at the end of the validation epoch (with the EMA weights, which EMAWeightAveraging swaps in for
validation), writes `plot_dir/samples_step<k>.png` and hands it to the logger when it takes images (W&B).
Rank 0 only; nothing during the sanity check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from fkdiff.distillation.loss import split_batch
from fkdiff.distillation.plotting import sample_figure
from fkdiff.seeding import seeded_generator

__all__ = ["SamplePlots"]


class SamplePlots(pl.Callback):
    """Validation plots of `pl_module.student` into `plot_dir` (module docstring); `options` go to `sample_figure`
    (num_steps, num_samples, lim, sigma, grid); the plot's noise comes from `seeded_generator(seed, 0, 0, "plot")`."""

    def __init__(self, plot_dir: str | Path, seed: int = 0, **options: Any):
        self.plot_dir, self.seed = Path(plot_dir), int(seed)
        self.options = {k: v for k, v in options.items() if v is not None}
        self._batch = None

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            x0, cond = split_batch(batch)
            self._batch = (x0.detach().cpu(), cond if getattr(pl_module, "conditional", True) else None)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        batch, self._batch = self._batch, None
        if batch is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        import matplotlib.pyplot as plt

        fig = sample_figure(pl_module.student, *batch, seeded_generator(self.seed, 0, 0, "plot"),
                            device=pl_module.device, **self.options)
        if fig is None:
            return
        self.plot_dir.mkdir(parents=True, exist_ok=True)
        path = self.plot_dir / f"samples_step{trainer.global_step:07d}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        log_image = getattr(pl_module.logger, "log_image", None)
        if callable(log_image):
            log_image(key="val/samples", images=[str(path)], step=trainer.global_step)
