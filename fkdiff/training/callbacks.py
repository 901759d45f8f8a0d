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

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

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
    """tqdm bar over optimizer steps, `step: k/max_steps [elapsed<ETA, rate]`, starting at the restored step.

    One bar for the whole run (the endless loader makes one epoch): created at train start, when a resumed run's
    global step is already restored, with `initial` = that step, so tqdm's rate and ETA count this session's steps.
    Without `max_steps` it is Lightning's bar.
    """

    def _counts_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    def init_train_tqdm(self) -> Tqdm:
        if not self._counts_steps():
            return super().init_train_tqdm()
        return Tqdm(desc="step", total=self.trainer.max_steps, initial=self.trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self._counts_steps():
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._counts_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, n = self.train_progress_bar, trainer.global_step
        if self.is_enabled and (n % self.refresh_rate == 0 or n == bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar
        return None
