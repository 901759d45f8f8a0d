"""Lightning wiring shared by the training entry points (teachers.train, fkdiff.distill): loggers, callbacks, trainer.

Nothing here is home-made training logic: W&B / CSV / TensorBoard loggers, ModelCheckpoint, EMAWeightAveraging and
the Trainer come from Lightning; this module only maps the `trainer:` and `logger:` sections of a recipe onto them.

W&B runs offline by default (no account, no network; files land in `<run_dir>/wandb/offline-run-*`); set
`logger.mode=online` after `wandb login` to sync, `logger.kind=csv` (or `tensorboard`, `none`) to skip W&B.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

__all__ = ["build_logger", "build_trainer", "resolve_ckpt_path", "save_config"]


def build_logger(logger_cfg: DictConfig | dict | None, run_dir: str | Path, name: str = "run", config: Any = None):
    """Lightning logger from `logger.kind` in {wandb, csv, tensorboard, none}; W&B files stay inside run_dir."""
    cfg = dict(logger_cfg or {})
    kind = str(cfg.get("kind", "wandb")).lower()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if kind in ("none", "null", "false"):
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    if kind == "tensorboard":
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
        except ModuleNotFoundError as e:  # pragma: no cover - depends on the environment
            raise ModuleNotFoundError("logger.kind=tensorboard needs `pip install tensorboard`") from e
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        mode = str(cfg.get("mode", "offline"))
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
        os.environ.setdefault("WANDB_DIR", str(run_dir))
        os.environ.setdefault("WANDB_CACHE_DIR", str(run_dir / "wandb_cache"))
        os.environ.setdefault("WANDB_CONFIG_DIR", str(run_dir / "wandb_config"))
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(project=cfg.get("project", "fkdiff"), name=name, save_dir=str(run_dir), mode=mode,
                           config=config, entity=cfg.get("entity"))
    raise ValueError(f"unknown logger.kind {kind!r}; use wandb, csv, tensorboard or none")


def build_trainer(trainer_cfg: DictConfig | dict, run_dir: str | Path, logger=None, callbacks: Sequence[Callback] = (),
                  *, ema_decay: float | None = None, checkpoint_every_n_steps: int | None = None) -> pl.Trainer:
    """A Trainer from the recipe's `trainer:` section, checkpointing to `<run_dir>/checkpoints` (with `last.ckpt`).

    `ema_decay` adds Lightning's EMAWeightAveraging (its state is in every checkpoint, so resume is exact).
    """
    cfg = OmegaConf.to_container(trainer_cfg, resolve=True) if isinstance(trainer_cfg, DictConfig) else dict(trainer_cfg)
    run_dir = Path(run_dir)
    every = checkpoint_every_n_steps or cfg.pop("checkpoint_every_n_steps", None) or max(1, int(cfg.get("max_steps", 1000)) // 10)
    cfg.pop("checkpoint_every_n_steps", None)
    ckpt = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, every_n_train_steps=every,
                           save_top_k=-1 if cfg.pop("keep_all_checkpoints", False) else 1, monitor=None)
    cbs = [ckpt, *callbacks]
    if ema_decay:
        cbs.append(EMAWeightAveraging(decay=float(ema_decay)))
    cfg.setdefault("default_root_dir", str(run_dir))
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
