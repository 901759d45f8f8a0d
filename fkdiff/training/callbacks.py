"""Lightning callbacks of fkdiff's step-based training (teachers and students): checkpoints and the progress bar.

Training runs for `max_steps` optimizer steps over an endless loader (`fkdiff.data.StepBatches`), so what matters is
the global step, not the epoch:
- `StepCheckpoint` is Lightning's ModelCheckpoint (`last.ckpt` and every `every_n_train_steps` steps), except at the
  end of training: ModelCheckpoint would write `last.ckpt` in its own `on_train_end`, which runs after
  EMAWeightAveraging's `on_train_end` has copied the averaged weights into the model, so that file's "raw" weights would
  be the EMA weights and `ckpt_path=last` would not continue the run exactly. `FinalCheckpoint` (placed before the EMA
  callback, whose hooks therefore run first) writes `last.ckpt` through the public `Trainer.save_checkpoint` while the
  model still holds its raw weights, and `StepCheckpoint.on_train_end` writes nothing.
- `StepProgressBar` is Lightning's tqdm bar counting optimizer steps: `step k/max_steps` with rate and ETA, starting at
  the restored step after a resume (Lightning's own bar counts the batches of the current epoch).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar

__all__ = ["StepCheckpoint", "FinalCheckpoint", "StepProgressBar"]


class StepCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose end-of-training `last.ckpt` is written by `FinalCheckpoint` (module docstring)."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        return None


class FinalCheckpoint(Callback):
    """Write `checkpoint`'s `last.ckpt` when training ends, before EMAWeightAveraging swaps in the average.

    Place it before the EMA callback in the trainer's callback list (Lightning keeps the user's order for non-checkpoint
    callbacks and moves checkpoint callbacks to the end).
    """

    def __init__(self, checkpoint: ModelCheckpoint):
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        cb = self.checkpoint
        if cb.save_last:
            trainer.save_checkpoint(cb.format_checkpoint_name({}, cb.CHECKPOINT_NAME_LAST), cb.save_weights_only)


class StepProgressBar(TQDMProgressBar):
    """tqdm bar over optimizer steps, `step k/max_steps [elapsed<ETA, rate]`, continuing at the restored step."""

    def _counts_steps(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self._counts_steps(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = bar.n = bar.last_print_n = trainer.global_step  # rate and ETA from this session's steps
            bar.set_description("step")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if self.is_enabled and bar is not None and (n % self.refresh_rate == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        return None
