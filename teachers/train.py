"""Entry point: train an EDM-preconditioned teacher by denoising score matching (`fkdiff.training.TeacherModule`).

    python -m teachers.train recipe=digits run_dir=runs/digits-teacher      # then teacher.path=<run_dir>/teacher.pt
    python -m teachers.train recipe=digits run_dir=runs/digits-teacher train_teacher.ckpt_path=last   # resume
    python -m teachers.train --help

`train(cfg) -> Path` is a plain function (the tests call it); it only wires the datamodule of `data:`, the module of
`train_teacher:` and the trainer, and writes into `cfg.run_dir`: `config.yaml` (resolved), `checkpoints/` (Lightning,
`last.ckpt` included) and `teacher.pt` (EMA weights + the spec to rebuild the net), which `teachers.load_teacher(path)`
reads. The step's batch and noise are functions of (seed, step): 1 and k DDP processes, and a resumed run, train
identically to one uninterrupted process.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["train", "main"]


def train(cfg: DictConfig) -> Path:
    """Train a teacher as `cfg` says; return the path of the written `teacher.pt`."""
    import lightning.pytorch as pl

    from fkdiff.training import (TeacherModule, build_datamodule_from_config, build_logger, build_trainer,
                                 finish_logger, resolve_ckpt_path, save_config, task_trainer_config, teacher_spec)
    from teachers.load import save_teacher

    tcfg = OmegaConf.to_container(cfg.train_teacher, resolve=True)
    trainer_cfg = task_trainer_config(cfg, "train_teacher")
    dm = build_datamodule_from_config(cfg.data)
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # network initialisation only
    dm.setup("fit")
    conditional = bool(tcfg["conditional"]) and dm.cond_kind != "none"
    spec = teacher_spec(dm, backbone=tcfg["backbone"], conditional=conditional, sigma_data=tcfg["sigma_data"],
                        sigma_min=tcfg["sigma_min"], sigma_max=tcfg["sigma_max"])
    module = TeacherModule(spec, lr=float(tcfg["lr"]), warmup_steps=int(tcfg["warmup_steps"]),
                           betas=tuple(tcfg["betas"]), p_mean=float(tcfg["p_mean"]), p_std=float(tcfg["p_std"]),
                           p_uncond=float(tcfg["p_uncond"]) if conditional else 0.0, seed=int(cfg.seed))
    trainer_cfg.setdefault("val_check_interval", int(tcfg["val_every_n_steps"]))
    logger = build_logger(cfg.logger, run_dir, name=f"teacher-{cfg.data.name}",
                          config=OmegaConf.to_container(cfg, resolve=True))
    trainer = build_trainer(trainer_cfg, run_dir, logger, ema_decay=tcfg.get("ema_decay"),
                            checkpoint_every_n_steps=tcfg.get("checkpoint_every_n_steps"))
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(tcfg.get("ckpt_path"), run_dir),
                weights_only=True)  # resume never unpickles code (any torch version)
    finish_logger(logger)
    out = run_dir / str(tcfg.get("output", "teacher.pt"))
    if trainer.is_global_zero:  # after fit, EMAWeightAveraging has copied the averaged weights into the module
        save_teacher(module.denoiser, out, step=int(trainer.global_step), data=str(cfg.data.name),
                     config=OmegaConf.to_container(cfg, resolve=True))
    return out


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(lambda cfg: print(f"teacher written to {train(cfg)}"), task="train_teacher")


if __name__ == "__main__":
    main()
