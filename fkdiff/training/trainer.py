"""The Trainer and logger of a training run, from the `trainer:` / `logger:` config sections and the task's own knobs.

Nothing here is home-made training logic: W&B / CSV / TensorBoard loggers, ModelCheckpoint, EMAWeightAveraging, the
tqdm bar and the Trainer come from Lightning; this module maps the config onto them.

One knob per setting: the step count and gradient clipping belong to the task (`distill.max_steps`,
`train_teacher.max_steps`, `*.gradient_clip_val`, set by the recipes); `trainer.max_steps` and
`trainer.gradient_clip_val` follow them by interpolation. Setting a `trainer.*` copy to another value is an error
naming both keys (it used to be overridden silently).

W&B runs offline by default (no account, no network; files land in `<run_dir>/wandb/offline-run-*`); `logger=wandb
logger.mode=online` syncs after `wandb login`, `logger=csv` (or `tensorboard`, `none`) skips W&B. The run's directory
is passed to W&B directly (nothing is written to the process environment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from omegaconf import DictConfig, OmegaConf

from fkdiff.training.callbacks import FinalCheckpoint, StepCheckpoint, StepProgressBar

__all__ = ["TASK_KNOBS", "LOGGERS", "ConfigError", "task_trainer_config", "positive_int", "build_logger",
           "build_trainer", "finish_logger", "resolve_ckpt_path", "save_config"]

TASK_KNOBS = ("max_steps", "gradient_clip_val")


class ConfigError(ValueError):
    """A config value that cannot be used, with the key that holds it."""


def positive_int(value: Any, key: str) -> int:
    """`value` (an int, or a string of digits) as an int >= 1, or a ConfigError naming `key`."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str) and value.strip().isdigit():
        n = int(value)
    else:
        n = 0
    if n < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return n


def task_trainer_config(cfg: DictConfig, section: str) -> dict:
    """The resolved `trainer:` section for the task whose settings live in `cfg.<section>` (distill, train_teacher).

    `trainer.max_steps` / `trainer.gradient_clip_val` must be the interpolations of the config (or equal the task's
    values); `max_steps` must be a positive integer. Raises ConfigError naming the keys otherwise.
    """
    trainer, task = cfg.trainer, cfg[section]
    for key in TASK_KNOBS:
        if key in trainer and not OmegaConf.is_interpolation(trainer, key):
            ours, theirs = trainer[key], task.get(key)
            if ours != theirs:
                raise ConfigError(
                    f"trainer.{key}={ours} disagrees with {section}.{key}={theirs}: this setting has one knob, "
                    f"{section}.{key} (trainer.{key} follows it). Set {section}.{key}=<value> instead.")
    out = OmegaConf.to_container(trainer, resolve=True)
    out["max_steps"] = positive_int(task.get("max_steps"), f"{section}.max_steps")
    if out.get("gradient_clip_val") is not None:
        out["gradient_clip_val"] = float(out["gradient_clip_val"])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# loggers


def _wandb(cfg: Mapping, run_dir: Path, name: str, config: Any):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = str(cfg.get("mode", "offline"))
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.mode must be offline, online or disabled, got {mode!r}")
    return WandbLogger(project=cfg.get("project", "fkdiff"), name=name, save_dir=str(run_dir), mode=mode,
                       config=config, entity=cfg.get("entity"), settings=wandb.Settings(silent=True))


def _csv(cfg: Mapping, run_dir: Path, name: str, config: Any):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(run_dir), name="csv", version="")


def _tensorboard(cfg: Mapping, run_dir: Path, name: str, config: Any):
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError("logger=tensorboard needs `pip install tensorboard`") from e


LOGGERS: dict[str, Callable] = {"wandb": _wandb, "csv": _csv, "tensorboard": _tensorboard,
                                "none": lambda *a: False}


def build_logger(logger_cfg: DictConfig | Mapping | None, run_dir: str | Path, name: str = "run", config: Any = None):
    """A Lightning logger for `logger.kind` (a key of `LOGGERS`); its files stay inside `run_dir`. False for none."""
    cfg = OmegaConf.to_container(logger_cfg, resolve=True) if isinstance(logger_cfg, DictConfig) else dict(
        logger_cfg or {})
    kind = str(cfg.get("kind", "wandb")).lower()
    if kind not in LOGGERS:
        raise ConfigError(f"unknown logger.kind {kind!r}; use one of {', '.join(LOGGERS)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return LOGGERS[kind](cfg, run_dir, name, config)


def finish_logger(logger) -> None:
    """Close a W&B run (its files are complete afterwards); other loggers need nothing."""
    if type(logger).__name__ == "WandbLogger":
        logger.experiment.finish()


# ---------------------------------------------------------------------------------------------------------------------
# trainer


def build_trainer(trainer_cfg: Mapping, run_dir: str | Path, logger=None, callbacks: Sequence[Callback] = (), *,
                  ema_decay: float | None = None, checkpoint_every_n_steps: int | None = None) -> pl.Trainer:
    """A Trainer for step-based training from the resolved `trainer:` kwargs (see `task_trainer_config`).

    Checkpoints go to `<run_dir>/checkpoints` (`last.ckpt` included, also at the final step: `FinalCheckpoint`),
    every `checkpoint_every_n_steps` steps (default max_steps / 10); `ema_decay` adds Lightning's EMAWeightAveraging
    (its state is in every checkpoint, so resume is exact); the progress bar counts optimizer steps. The train loader
    shards its own batches (`StepBatches`), so Lightning's distributed sampler is off; validation runs every
    `val_check_interval` steps when set as an int.
    """
    cfg = dict(trainer_cfg)
    run_dir = Path(run_dir)
    max_steps = int(cfg.get("max_steps") or 1000)
    every = checkpoint_every_n_steps or cfg.pop("checkpoint_every_n_steps", None) or max(1, max_steps // 10)
    cfg.pop("checkpoint_every_n_steps", None)
    ckpt = StepCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, every_n_train_steps=int(every),
                          save_top_k=-1 if cfg.pop("keep_all_checkpoints", False) else 1, monitor=None)
    cbs = [ckpt, *callbacks, FinalCheckpoint(ckpt)]  # before the EMA callback: its on_train_end runs first
    if ema_decay:
        cbs.append(EMAWeightAveraging(decay=float(ema_decay)))
    if cfg.get("enable_progress_bar", True):
        cbs.append(StepProgressBar())
    cfg.setdefault("default_root_dir", str(run_dir))
    cfg.setdefault("max_epochs", -1)
    cfg.setdefault("use_distributed_sampler", False)  # StepBatches shards the global batch itself
    if isinstance(cfg.get("val_check_interval"), int):
        cfg.setdefault("check_val_every_n_epoch", None)  # validate every n steps of the one endless epoch
    return pl.Trainer(logger=logger if logger is not None else False, callbacks=cbs, **cfg)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """`None` -> fresh start; `last` -> `<run_dir>/checkpoints/last.ckpt` (error if missing); else a checkpoint file."""
    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "last":
        p = Path(run_dir) / "checkpoints" / "last.ckpt"
        if not p.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last but {p} does not exist; pass run_dir=<the earlier run's folder> to resume it")
        return str(p)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    return str(ckpt_path)


def save_config(cfg: DictConfig, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config to the run folder."""
    p = Path(run_dir) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return p
