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

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from omegaconf import DictConfig, OmegaConf

from fkdiff.training.callbacks import FinalCheckpoint, StepCheckpoint, StepProgressBar

__all__ = ["TASK_KNOBS", "LOGGERS", "ConfigError", "task_trainer_config", "positive_int", "build_logger",
           "build_trainer", "finish_logger", "resolve_ckpt_path", "save_config", "default_checkpoint_interval",
           "strategy_with_timeout", "fit", "Preempted", "DistributedTimeout", "checkpoint_step", "newest_checkpoint",
           "explicit_checkpoint_step"]

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
    """W&B through Lightning's WandbLogger. The run's id is kept in `<run_dir>/logger.json`, so a resumed run continues
    the same W&B run (its history goes on at the restored step) instead of opening a new one."""
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    mode = str(cfg.get("mode", "offline"))
    if mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.mode must be offline, online or disabled, got {mode!r}")
    return WandbLogger(project=cfg.get("project", "fkdiff"), name=name, save_dir=str(run_dir), mode=mode,
                       config=config, entity=cfg.get("entity"), id=_wandb_id(run_dir), resume="allow",
                       settings=wandb.Settings(silent=True))


def _wandb_id(run_dir: Path) -> str:
    """The W&B run id of the run in `run_dir`: read from `logger.json`, or made and stored there (main process)."""
    import secrets
    import string

    from fkdiff.files import atomic_write_json
    from fkdiff.training.rundir import is_main_process

    path = run_dir / "logger.json"
    try:
        run_id = json.loads(path.read_text()).get("wandb_id")
    except (OSError, ValueError):
        run_id = None
    if not run_id:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's id form
        if is_main_process():
            atomic_write_json(path, {"wandb_id": run_id})
    return str(run_id)


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


def finish_logger(logger, exit_code: int = 0) -> None:
    """Close a W&B run (its files are complete afterwards; a non-zero `exit_code` marks it failed or preempted);
    other loggers need nothing."""
    if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
        logger.experiment.finish(exit_code=int(exit_code))


# ---------------------------------------------------------------------------------------------------------------------
# trainer


def build_trainer(trainer_cfg: Mapping, run_dir: str | Path, logger=None, callbacks: Sequence[Callback] = (), *,
                  ema_decay: float | None = None, checkpoint_every_n_steps: int | None = None,
                  timeout: float | None = None) -> pl.Trainer:
    """A Trainer for step-based training from the resolved `trainer:` kwargs (see `task_trainer_config`).

    Checkpoints go to `<run_dir>/checkpoints` (`last.ckpt` included, also at the final step: `FinalCheckpoint`, and on
    SIGTERM), every `checkpoint_every_n_steps` steps (default max_steps / 10), each file replaced atomically
    (`AtomicCheckpointIO`) and `last.ckpt` always overwritten in place (no `last-v1.ckpt`); `ema_decay` adds
    Lightning's EMAWeightAveraging (its state is in every checkpoint, so resume is exact); the progress bar counts
    optimizer steps. The train loader shards its own batches (`StepBatches`), so Lightning's distributed sampler is
    off; validation runs every `val_check_interval` steps when set as an int. `timeout` (seconds): how long a
    collective of a distributed strategy waits for the other processes (the process group's timeout). Under SLURM,
    Lightning's own requeue handler (a checkpoint written from inside a SIGUSR1 handler, mid-step) is off: preemption
    is SIGTERM, answered with a checkpoint at the end of the current step (README "Resume and preemption").
    """
    from fkdiff.training.rundir import AtomicCheckpointIO

    cfg = dict(trainer_cfg)
    run_dir = Path(run_dir)
    max_steps = int(cfg.get("max_steps") or 1000)
    every = checkpoint_every_n_steps or cfg.pop("checkpoint_every_n_steps", None) or default_checkpoint_interval(
        max_steps)
    cfg.pop("checkpoint_every_n_steps", None)
    ckpt = StepCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, every_n_train_steps=int(every),
                          save_top_k=-1 if cfg.pop("keep_all_checkpoints", False) else 1, monitor=None,
                          enable_version_counter=False)
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
    plugins = list(cfg.pop("plugins", None) or [])
    plugins.append(AtomicCheckpointIO())
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    cfg["strategy"] = strategy_with_timeout(cfg.get("strategy", "auto"), timeout)
    return pl.Trainer(logger=logger if logger is not None else False, callbacks=cbs, plugins=plugins, **cfg)


def default_checkpoint_interval(max_steps: int) -> int:
    """`checkpoint_every_n_steps: null` means max_steps / 10 (fixed when a run starts, kept on resume)."""
    return max(1, int(max_steps) // 10)


def strategy_with_timeout(strategy: Any, timeout: float | None):
    """A registered strategy name (`ddp`, `ddp_spawn`, `fsdp`, ...) as the strategy object with the process group's
    `timeout` (seconds); other values (auto, single_device, an object) unchanged."""
    if timeout is None or not isinstance(strategy, str):
        return strategy
    import inspect
    from datetime import timedelta

    from lightning.pytorch.strategies import StrategyRegistry

    if strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    if "timeout" not in inspect.signature(entry["strategy"]).parameters:
        return strategy
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=float(timeout)))


class Preempted(SystemExit):
    """The run stopped on SIGTERM after writing a checkpoint; the process exits with status 143 (128 + SIGTERM)."""

    code = 143

    def __init__(self, message: str):
        super().__init__(143)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DistributedTimeout(RuntimeError):
    """A collective waited longer than the process group's timeout: another process froze or died."""


_TIMEOUT_WORDS = ("timed out", "timeout", "wait timeout")


def fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None, *,
        timeout: float | None = None, resume_hint: str = "", logger=None) -> None:
    """`_fit` (below), then `finish_logger(logger)` with the run's exit code: 143 when preempted, 1 on an error."""
    try:
        _fit(trainer, module, datamodule, ckpt_path, timeout=timeout, resume_hint=resume_hint)
    except Preempted:
        finish_logger(logger, exit_code=Preempted.code)
        raise
    except BaseException:
        finish_logger(logger, exit_code=1)
        raise
    finish_logger(logger)


def _fit(trainer: pl.Trainer, module: pl.LightningModule, datamodule, ckpt_path: str | None, *,
         timeout: float | None = None, resume_hint: str = "") -> None:
    """`trainer.fit`, loading a checkpoint weights-only (any torch version), with the endings a cluster needs:

    - SIGTERM (scheduler preemption): Lightning stops at the end of the current step, `StepCheckpoint` writes
      `last.ckpt`, and this raises `Preempted` (exit status 143, never 0), whose message says how to resume;
    - a collective that timed out (a frozen or dead rank): `DistributedTimeout` naming the `timeout` option.
    """
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        raise _preempted(trainer, resume_hint) from None
    except Exception as e:  # noqa: BLE001 - only re-labelled when it is a distributed timeout
        text = str(e).lower()
        if trainer.world_size > 1 and any(w in text for w in _TIMEOUT_WORDS):
            launcher = trainer.strategy.launcher  # processes Lightning started itself: end them, leave no orphan
            if launcher is not None and hasattr(launcher, "kill"):
                import signal

                launcher.kill(signal.SIGKILL)
            raise DistributedTimeout(
                f"rank {trainer.global_rank}: a collective waited longer than the process-group timeout "
                f"({'timeout=' + format(timeout, 'g') + ' s' if timeout else 'the default'}) for another process at "
                f"step {trainer.global_step}: a rank is frozen or died. Look at the other ranks' logs; if steps are "
                f"legitimately slower, raise the `timeout` option (seconds). Cause: {str(e).splitlines()[0][:300]}"
            ) from e
        raise
    if trainer.received_sigterm:  # arrived after the last step: training is complete, the next run finalises it
        raise _preempted(trainer, resume_hint)


def _preempted(trainer: pl.Trainer, resume_hint: str) -> Preempted:
    """The `Preempted` exit, its message printed (SystemExit itself prints nothing)."""
    import sys

    ckpt = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, StepCheckpoint)), None)
    where = f" ({ckpt.format_checkpoint_name({}, ckpt.CHECKPOINT_NAME_LAST)})" if ckpt is not None else ""
    message = (f"SIGTERM at step {trainer.global_step}: checkpoint written{where}; exiting with status 143 so that a "
               f"scheduler counts the job as unfinished. Resume: "
               f"{resume_hint or 'the same command with ckpt_path=last'}")
    if trainer.is_global_zero:
        print(message, file=sys.stderr, flush=True)
    return Preempted(message)


def checkpoint_step(path: str | Path) -> int | None:
    """The global step stored in a Lightning checkpoint, or None when the file cannot be read (torn, not a
    checkpoint). Loads weights-only, memory-mapped (cheap for large files)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(data["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable file is "no checkpoint"
        return None


def explicit_checkpoint_step(path: str | Path, key: str) -> int:
    """The global step of a checkpoint the user named (`<task>.ckpt_path=<file>`): errors name the file and the key
    (missing, damaged, refused by the weights-only loader, not a Lightning checkpoint)."""
    from fkdiff.files import CorruptFileError, load_torch_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path}: no such checkpoint file")
    data = load_torch_file(path, "Lightning checkpoint")
    if not isinstance(data, Mapping) or "global_step" not in data:
        raise CorruptFileError(f"{key}={path} is not a Lightning checkpoint (no global_step)")
    return int(data["global_step"])


def newest_checkpoint(run_dir: str | Path) -> tuple[Path, int] | None:
    """The checkpoint of `<run_dir>/checkpoints` with the highest global step (`last.ckpt`, and any `last-v*.ckpt`
    an older Lightning run left beside it), with that step; None when there is none. Unreadable files are skipped."""
    folder = Path(run_dir) / "checkpoints"
    best = None
    for p in sorted(folder.glob("last*.ckpt")):
        step = checkpoint_step(p)
        if step is not None and (best is None or step > best[1]):
            best = (p, step)
    return best


def resolve_ckpt_path(ckpt_path: str | None, run_dir: str | Path) -> str | None:
    """`None` -> fresh start; `last` -> the newest checkpoint of `<run_dir>/checkpoints` (`newest_checkpoint`), None
    when there is none yet (a run that never got to its first checkpoint starts); else a checkpoint file."""
    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "last":
        found = newest_checkpoint(run_dir)
        return str(found[0]) if found else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_path} not found")
    return str(ckpt_path)


def save_config(cfg: DictConfig, run_dir: str | Path, name: str = "config.yaml", ckpt_key: str | None = None) -> Path:
    """Write the resolved config to the run folder (atomically). `ckpt_key` (e.g. `distill.ckpt_path`) is stored as
    null: resuming is a property of one invocation, not of the run."""
    from fkdiff.files import atomic_write_text

    data = OmegaConf.to_container(cfg, resolve=True)
    if ckpt_key:
        section, key = ckpt_key.split(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section][key] = None
    header = ("# The resolved config of this run (fkdiff). Resume the run with run_dir=<this folder> "
              f"{ckpt_key or '<task>.ckpt_path'}=last: this file is its config, the command line's overrides go on top.\n")
    return atomic_write_text(Path(run_dir) / name, header + OmegaConf.to_yaml(OmegaConf.create(data)))
