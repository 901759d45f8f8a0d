"""Step-based training with Lightning, shared by `python -m teachers.train` and `python -m fkdiff.distill`.

- `module`: `StepModule` (randomness of a step from (seed, step), drawn for the global batch and sliced per rank) and
  `adam_with_warmup`;
- `teacher`: `TeacherModule` (EDM denoising score matching) and `teacher_spec`;
- `callbacks`: `StepCheckpoint` / `FinalCheckpoint` (exact `last.ckpt` with EMA) and `StepProgressBar`;
- `trainer`: the Trainer and logger from the config (`task_trainer_config`, `build_trainer`, `build_logger`);
- `wiring`: the datamodule of the `data:` section (`build_datamodule_from_config`).
The distillation LightningModule is `fkdiff.distillation.DistillationModule`; batches come from `fkdiff.data`.
"""

from fkdiff.training.callbacks import FinalCheckpoint, StepCheckpoint, StepProgressBar
from fkdiff.training.module import StepModule, adam_with_warmup
from fkdiff.training.trainer import (LOGGERS, TASK_KNOBS, ConfigError, build_logger, build_trainer, finish_logger,
                                     positive_int, resolve_ckpt_path, save_config, task_trainer_config)
from fkdiff.training.wiring import build_datamodule_from_config

__all__ = ["StepModule", "adam_with_warmup", "StepCheckpoint", "FinalCheckpoint", "StepProgressBar", "LOGGERS",
           "TASK_KNOBS", "ConfigError", "build_logger", "build_trainer", "finish_logger", "positive_int",
           "resolve_ckpt_path", "save_config", "task_trainer_config", "build_datamodule_from_config",
           "TeacherModule", "teacher_spec"]


def __getattr__(name: str):
    if name in ("TeacherModule", "teacher_spec"):  # imports teachers; loaded on first use
        from fkdiff.training import teacher

        return getattr(teacher, name)
    raise AttributeError(f"module 'fkdiff.training' has no attribute {name!r}")
