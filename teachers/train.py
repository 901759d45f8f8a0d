"""Entry point: train an EDM-preconditioned teacher by denoising score matching (`fkdiff.training.TeacherModule`).

    python -m teachers.train recipe=digits run_dir=runs/digits-teacher      # then teacher.path=<run_dir>/teacher.pt
    python -m teachers.train run_dir=runs/digits-teacher train_teacher.ckpt_path=last   # resume (its own config)
    python -m teachers.train --help

`train(cfg) -> Path` is a plain function (the tests call it); it only wires the datamodule of `data:`, the module of
`train_teacher:` and the trainer, and writes into `cfg.run_dir`: `config.yaml` (resolved), `checkpoints/` (Lightning,
`last.ckpt` included) and `teacher.pt` (EMA weights + the spec to rebuild the net), which `teachers.load_teacher(path)`
reads. The step's batch and noise are functions of (seed, step): 1 and k DDP processes, and a resumed run, train
identically to one uninterrupted process.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["train", "main"]


def train(cfg: DictConfig) -> Path:
    """Train a teacher as `cfg` says; return the path of the written `teacher.pt`.

    Like `fkdiff.distill`: a run that does not resume refuses a folder holding another run; one process owns the folder
    (`fkdiff.training.open_run`); with `train_teacher.ckpt_path=last` a finished teacher (`teacher.pt` at max_steps)
    is left alone, a checkpoint at max_steps is finalised, a newer one resumed, none started; SIGTERM checkpoints and
    exits with status 143; files are written atomically.
    """
    import lightning.pytorch as pl

    from fkdiff.files import load_torch_file
    from fkdiff.training import (ConfigError, TeacherModule, build_datamodule_from_config, build_logger,
                                 build_trainer, default_checkpoint_interval, fit, open_run,
                                 resolve_ckpt_path, save_config, task_trainer_config, teacher_spec)
    from fkdiff.training.rundir import is_main_process
    from fkdiff.training.trainer import explicit_checkpoint_step
    from teachers.load import load_teacher_checkpoint, save_teacher

    trainer_cfg = task_trainer_config(cfg, "train_teacher")
    max_steps = int(trainer_cfg["max_steps"])
    if cfg.train_teacher.get("checkpoint_every_n_steps") is None:  # fixed now, saved with the config, kept on resume
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.train_teacher.checkpoint_every_n_steps = default_checkpoint_interval(max_steps)
    tcfg = OmegaConf.to_container(cfg.train_teacher, resolve=True)
    dm = build_datamodule_from_config(cfg.data)
    run_dir = Path(cfg.run_dir)
    out = run_dir / str(tcfg.get("output", "teacher.pt"))
    resume = tcfg.get("ckpt_path") not in (None, "", "null", "none")
    with open_run(run_dir, resume=str(tcfg["ckpt_path"]) if resume else None, resume_key="train_teacher.ckpt_path",
                  what="teachers.train run"):
        if is_main_process():
            save_config(cfg, run_dir, ckpt_key="train_teacher.ckpt_path")
        if resume and out.is_file():
            step = int(load_torch_file(out, "teacher checkpoint").get("step", -1))
            if step > max_steps:
                raise ConfigError(f"{out} was trained to step {step}, past train_teacher.max_steps={max_steps}")
            if step == max_steps:
                return out  # finished: never touched again
        ckpt = resolve_ckpt_path(tcfg.get("ckpt_path"), run_dir)
        step0 = explicit_checkpoint_step(ckpt, "train_teacher.ckpt_path") if ckpt else 0
        if step0 > max_steps:
            raise ConfigError(f"{ckpt} is at step {step0}, past train_teacher.max_steps={max_steps}; give "
                              f"train_teacher.max_steps>={step0} or start a new run_dir")
        config = OmegaConf.to_container(cfg, resolve=True)
        if ckpt and step0 == max_steps:  # trained to the end, not finalised: the checkpoint holds the EMA weights
            if is_main_process():
                save_teacher(load_teacher_checkpoint(ckpt), out, step=step0, data=str(cfg.data.name), config=config)
            return out
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # network initialisation only
        dm.setup("fit")
        conditional = bool(tcfg["conditional"]) and dm.cond_kind != "none"
        spec = teacher_spec(dm, backbone=tcfg["backbone"], conditional=conditional, sigma_data=tcfg["sigma_data"],
                            sigma_min=tcfg["sigma_min"], sigma_max=tcfg["sigma_max"])
        module = TeacherModule(spec, lr=float(tcfg["lr"]), warmup_steps=int(tcfg["warmup_steps"]),
                               betas=tuple(tcfg["betas"]), p_mean=float(tcfg["p_mean"]), p_std=float(tcfg["p_std"]),
                               p_uncond=float(tcfg["p_uncond"]) if conditional else 0.0, seed=int(cfg.seed))
        trainer_cfg.setdefault("val_check_interval", int(tcfg["val_every_n_steps"]))
        logger = build_logger(cfg.logger, run_dir, name=f"teacher-{cfg.data.name}", config=config)
        timeout = cfg.get("timeout")
        trainer = build_trainer(trainer_cfg, run_dir, logger, ema_decay=tcfg.get("ema_decay"),
                                checkpoint_every_n_steps=tcfg.get("checkpoint_every_n_steps"), timeout=timeout)
        fit(trainer, module, dm, ckpt, timeout=timeout,
            resume_hint=f"python -m teachers.train run_dir={run_dir} train_teacher.ckpt_path=last", logger=logger)
        if trainer.is_global_zero:  # after fit, EMAWeightAveraging has copied the averaged weights into the module
            save_teacher(module.denoiser, out, step=int(trainer.global_step), data=str(cfg.data.name), config=config)
    return out


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(lambda cfg: print(f"teacher written to {train(cfg)}"), task="train_teacher")


if __name__ == "__main__":
    main()
