"""Entry point: distil a diffusion teacher into an energy student (DESIGN.md sections 3-4; docs/conventions.md).

    python -m fkdiff.distill                                   # recipe toy2d: the analytic 2D teachers, CPU, minutes
    python -m fkdiff.distill recipe=digits teacher.path=runs/digits-teacher/teacher.pt
    python -m fkdiff.distill distill.target=data               # the E-DSM baseline (target x_0 instead of the teacher)
    python -m fkdiff.distill run_dir=runs/toy2d distill.ckpt_path=last    # resume exactly
    python -m fkdiff.distill trainer.devices=2 trainer.strategy=ddp      # DDP (gloo on CPU, nccl on GPUs)
    python -m fkdiff.distill --help                            # groups, recipes, key options

`distill(cfg)` is a plain function (tests call it): it wires the teacher (`teachers.load_teacher`), the data
(`fkdiff.training.build_datamodule_from_config`), the student (`fkdiff.energy.build_student`), the Lightning module
(`fkdiff.distillation.DistillationModule`) and the trainer (`fkdiff.training.build_trainer`), trains, and writes into
`run_dir`:
    config.yaml                     the resolved config
    <name>/checkpoints/last.ckpt    Lightning checkpoints (EMA weights in state_dict, optimizer, step, EMA state)
    <name>/student.pt               the final EMA student, for `fkdiff.load_energy`
    <name>/plots/                   validation plots (exp(-E) + ODE samples, or image grids)
    <name>/wandb/ | <name>/csv/     logger files (W&B offline by default)
    densities.png, report.json      toy2d: learnt exp(-E) beside the true densities; errors per sigma bucket
`<name>` is the teacher's preset for analytic teachers (one student per preset of `teacher.preset`), else `student`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN

__all__ = ["distill", "main", "StudentRun"]


class StudentRun(dict):
    """What `distill` returns per student: name, student, teacher, paths, per-bucket errors (a dict)."""


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _jobs(cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(name, teacher, datamodule) for every student to distil."""
    from fkdiff.training import build_datamodule_from_config
    from teachers import load_teacher

    tcfg = _container(cfg.teacher)
    val_batch = int(cfg.distill.plot.val_examples)  # validation: one batch of the first val_examples examples
    if tcfg.get("kind") == "analytic":
        teachers = load_teacher(tcfg)
        names = [tcfg["preset"]] if isinstance(tcfg["preset"], str) else list(tcfg["preset"])
        teachers = [teachers] if isinstance(tcfg["preset"], str) else teachers
        toy = cfg.data.name == "toy2d"  # its data are samples of the teacher being distilled
        return [(str(name), t, build_datamodule_from_config(cfg.data, preset=t if toy else None,
                                                            val_batch_size=val_batch))
                for name, t in zip(names, teachers)]
    if tcfg.get("kind") == "checkpoint" and not tcfg.get("path"):
        recipe = cfg.data.name
        raise FileNotFoundError(
            f"recipe {recipe!r} distils a trained teacher but teacher.path is not set. Train one with "
            f"`python -m teachers.train recipe={recipe} run_dir=runs/{recipe}-teacher` (it writes <run_dir>/teacher.pt),"
            f" then run `python -m fkdiff.distill recipe={recipe} teacher.path=runs/{recipe}-teacher/teacher.pt`"
            + (" data.root=<folder with cifar-10-batches-py>" if recipe == "cifar10" else ""))
    return [("student", load_teacher(tcfg), build_datamodule_from_config(cfg.data, val_batch_size=val_batch))]


def _conditional(cfg: DictConfig, teacher, dm) -> bool:
    """Whether the student is conditioned on the data's condition: asked for (student.conditional), present in the
    data, and taken by the teacher (a teacher that declares none is distilled unconditionally)."""
    from teachers.load import conditioning

    data_kind = getattr(dm, "cond_kind", "none")
    if not bool(cfg.student.get("conditional", True)) or data_kind == "none":
        return False
    kind, num_classes = conditioning(teacher)
    if kind is None:  # a network given as code declares nothing: it takes the data's condition
        return True
    if kind == "none":
        return False
    if kind != data_kind or (kind == "class" and num_classes not in (None, getattr(dm, "num_classes", None))):
        raise ValueError(f"the teacher is conditioned on {kind} ({num_classes} classes) but data={cfg.data.name} gives "
                         f"{data_kind} conditions ({getattr(dm, 'num_classes', None)} classes); pick matching data or "
                         "student.conditional=false")
    return True


def _build_student(cfg: DictConfig, teacher, dm):
    from fkdiff.energy import build_student, student_from_teacher, warm_start_from

    scfg = _container(cfg.student)
    conditional = _conditional(cfg, teacher, dm)
    backbone = scfg.get("backbone")
    if backbone == "teacher":  # an energy over a copy of the teacher's own network, warm-started from its weights
        student = student_from_teacher(teacher, scfg.get("g", "ip"), event_shape=dm.event_shape,
                                       sigma_data=scfg.get("sigma_data"), teacher_config=_container(cfg.teacher))
        return student, True, conditional
    spec = getattr(teacher, "spec", None) or {}
    if backbone is None:
        backbone = dict(spec.get("backbone", {})) if spec else {}
    sigma_data = scfg.get("sigma_data") or getattr(teacher, "sigma_data", None) or dm.sigma_data
    student = build_student(
        dm.event_shape, float(sigma_data), scfg.get("g", "l2"), backbone=backbone,
        cond_kind=dm.cond_kind if conditional else "none",
        num_classes=getattr(dm, "num_classes", None) if conditional else None,
        cond_dim=getattr(dm, "cond_dim", None) if conditional else None,
        sigma_min=float(getattr(teacher, "sigma_min", SIGMA_MIN)),
        sigma_max=float(getattr(teacher, "sigma_max", SIGMA_MAX)),
        l2_init_scale=float(scfg.get("l2_init_scale", 0.1)))
    warm = scfg.get("warm_start", "auto")
    copied = False
    if warm in (True, "true", "auto"):
        copied = warm_start_from(student, teacher, strict=warm in (True, "true"))
    return student, copied, conditional


def _sigma_range(cfg: DictConfig, teacher) -> tuple[float, float] | None:
    """The training sigma law's range: the teacher's [sigma_min, sigma_max] (distill.sigma_range=teacher, where the
    teacher declares one), or none (full)."""
    mode = str(cfg.distill.get("sigma_range", "teacher"))
    if mode not in ("teacher", "full"):
        raise ValueError(f"distill.sigma_range must be teacher or full, got {mode!r}")
    lo, hi = getattr(teacher, "sigma_min", None), getattr(teacher, "sigma_max", None)
    return (float(lo), float(hi)) if mode == "teacher" and lo is not None and hi is not None else None


def _distill_one(cfg: DictConfig, trainer_cfg: dict, name: str, teacher, dm, run_dir: Path) -> StudentRun:
    import lightning.pytorch as pl

    from fkdiff.distillation import (DenoiserMatchingLoss, DistillationModule, SamplePlots, denoiser_error_by_bucket,
                                      energy_gap_error_by_bucket)
    from fkdiff.energy import save_student
    from fkdiff.seeding import seeded_generator
    from fkdiff.training import build_logger, build_trainer, finish_logger, resolve_ckpt_path

    dcfg = cfg.distill
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the student's initial weights
    dm.setup("fit")
    student, warm, conditional = _build_student(cfg, teacher, dm)
    sub = run_dir / name
    loss = DenoiserMatchingLoss(student.sigma_data, str(dcfg.target), float(dcfg.p_mean), float(dcfg.p_std),
                                str(dcfg.weighting), sigma_range=_sigma_range(cfg, teacher))
    module = DistillationModule(
        student, teacher, loss, lr=float(dcfg.lr), betas=tuple(dcfg.betas), weight_decay=float(dcfg.weight_decay),
        warmup_steps=int(dcfg.warmup_steps), seed=int(cfg.seed), sigma_buckets=list(dcfg.sigma_buckets),
        diagnostics_every_n_steps=int(dcfg.diagnostics_every_n_steps or 0), run_config=_container(cfg),
        conditional=conditional)
    tr = dict(trainer_cfg)
    tr.setdefault("val_check_interval", int(dcfg.val_every_n_steps))
    tr.setdefault("limit_val_batches", 1)        # one batch of val_examples examples
    tr.setdefault("num_sanity_val_steps", 0)
    tr.setdefault("inference_mode", False)       # validation differentiates the energy
    plot = _container(dcfg.plot)
    callbacks = [SamplePlots(sub / "plots", int(cfg.seed), num_steps=plot.get("num_steps"),
                             num_samples=plot.get("num_samples"), lim=plot.get("lim"), sigma=plot.get("sigma"),
                             grid=plot.get("grid"))] if plot.get("enabled", True) else []
    logger = build_logger(cfg.logger, sub, name=f"distill-{cfg.data.name}-{name}", config=_container(cfg))
    trainer = build_trainer(tr, sub, logger=logger, callbacks=callbacks, ema_decay=dcfg.get("ema_decay"),
                            checkpoint_every_n_steps=dcfg.get("checkpoint_every_n_steps"))
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(dcfg.get("ckpt_path"), sub),
                weights_only=True)  # resume never unpickles code (any torch version)
    finish_logger(logger)
    result = StudentRun(name=name, student=student, teacher=teacher, run_dir=str(sub), warm_start=warm,
                        step=int(trainer.global_step), checkpoint=str(sub / "checkpoints" / "last.ckpt"))
    if not trainer.is_global_zero:
        return result
    student.eval()
    result["student_path"] = str(save_student(student, sub / "student.pt", step=int(trainer.global_step),
                                              teacher=_container(cfg.teacher), name=name))
    ev = _container(dcfg.get("eval")) or {}
    if ev.get("enabled", True) and getattr(teacher, "sample", None) is not None:
        # analytic teacher: its denoiser is exact, so this is the student's excess error over the optimum
        g = seeded_generator(int(cfg.seed), stream="eval")
        x0 = teacher.sample(int(ev.get("num_samples", 4096)), generator=g).float()
        result["errors"] = denoiser_error_by_bucket(student, teacher, x0, list(dcfg.sigma_buckets), g)
        if callable(getattr(teacher, "energy", None)):
            result["energy_errors"] = energy_gap_error_by_bucket(student, teacher, x0, list(dcfg.sigma_buckets), g)
    return result


def distill(cfg: DictConfig) -> list[StudentRun]:
    """Distil every student the config asks for; returns one `StudentRun` per student (see module docstring)."""
    from fkdiff.distillation import plot_densities
    from fkdiff.training import save_config, task_trainer_config

    torch.set_float32_matmul_precision("high")
    trainer_cfg = task_trainer_config(cfg, "distill")  # one knob per setting: fails before anything runs
    if cfg.distill.get("num_threads"):
        torch.set_num_threads(int(cfg.distill.num_threads))
    run_dir = Path(str(cfg.run_dir)).absolute()
    jobs = _jobs(cfg)  # loads the teachers: a missing one fails before the run folder is written
    rank0 = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0
    if rank0:
        save_config(cfg, run_dir)
    runs = [_distill_one(cfg, trainer_cfg, name, teacher, dm, run_dir) for name, teacher, dm in jobs]
    if not rank0 or not runs or "student_path" not in runs[0]:
        return runs
    report = {"run_dir": str(run_dir), "students": {}}
    for r in runs:
        keys = ("student_path", "checkpoint", "step", "warm_start", "errors", "energy_errors")
        report["students"][r["name"]] = {k: r[k] for k in keys if k in r}
    if all(tuple(r["student"].event_shape) == (2,) and callable(getattr(r["teacher"], "energy", None)) for r in runs):
        rows = [(r["name"], r["teacher"], r["student"]) for r in runs]
        report["densities"] = str(plot_densities(rows, run_dir / "densities.png", float(cfg.distill.plot.sigma),
                                                 float(cfg.distill.plot.lim)))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    _print_report(report)
    return runs


def _print_report(report: dict) -> None:
    print(f"\nfkdiff.distill: run folder {report['run_dir']}")
    for name, r in report["students"].items():
        print(f"  {name}: student {r['student_path']} (step {r['step']}), checkpoint {r['checkpoint']}")
        if "errors" in r:
            e = r["errors"]
            cells = ", ".join(f"{b}: {100 * q:.2f}%" for b, q in zip(e["bucket"], e["ratio"]))
            print(f"    excess denoiser error / optimal, per sigma bucket: {cells}")
        if "energy_errors" in r:
            e = r["energy_errors"]
            cells = ", ".join(f"{b}: {q:.3f}" for b, q in zip(e["bucket"], e["rms_nats"]))
            print(f"    relative-energy error (rms nats between samples; sets SMC mode masses): {cells}")
    if "densities" in report:
        print(f"  learnt vs true densities: {report['densities']}")
    print(f"  report: {report['run_dir']}/report.json; load a student with fkdiff.load_energy(<student.pt>)")


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(distill, task="distill")


if __name__ == "__main__":
    main()
