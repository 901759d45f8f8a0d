"""Entry point: distil a diffusion teacher into an energy student (DESIGN.md sections 3-4).

    python -m fkdiff.distill                                   # recipe toy2d: the analytic 2D teachers, CPU, minutes
    python -m fkdiff.distill recipe=digits teacher.path=<run>/teacher.pt
    python -m fkdiff.distill distill.target=data               # the E-DSM baseline (target x_0 instead of the teacher)
    python -m fkdiff.distill run_dir=<earlier run> distill.ckpt_path=last    # resume exactly
    python -m fkdiff.distill trainer.devices=2 trainer.strategy=ddp         # DDP (gloo on CPU, nccl on GPUs)

`distill(cfg)` is a plain function (tests call it): it wires the teacher (`teachers.load_teacher`), the data
(`fkdiff.data.build_datamodule`), the student (`fkdiff.energy.build_student`) and the Lightning module
(`fkdiff.distillation.DistillationModule`), trains, and writes into `run_dir`:
    config.yaml                     the resolved config
    <name>/checkpoints/last.ckpt    Lightning checkpoints (EMA weights in state_dict, optimizer, step, EMA state)
    <name>/student.pt               the final EMA student, for `fkdiff.load_energy`
    <name>/plots/                   validation plots (exp(-E) + ODE samples, or image grids)
    <name>/wandb/ | <name>/csv/     logger files (W&B offline by default)
    densities.png, report.json      toy2d: learnt exp(-E) beside the true densities; excess error per sigma bucket
`<name>` is the teacher's preset for analytic teachers (one student per preset), else `student`.
Only this module (and other entry points) import Hydra.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["distill", "main", "StudentRun"]


class StudentRun(dict):
    """What `distill` returns per student: name, student, teacher, paths, per-bucket errors (a dict)."""


def _container(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _datamodule(data_cfg: Mapping, **override):
    from fkdiff.data import build_datamodule

    data = dict(data_cfg)
    name = data.pop("name")
    data.update(override)
    return build_datamodule(name, **{k: v for k, v in data.items() if v is not None})


def _jobs(cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """(name, teacher, datamodule) for every student to distil."""
    from teachers import load_teacher

    tcfg = _container(cfg.teacher)
    data_cfg = _container(cfg.data)
    presets = cfg.distill.get("presets")
    if tcfg.get("kind") == "analytic":
        names = presets if presets else tcfg.get("preset")
        names = [names] if isinstance(names, str) else list(names or [])
        if not names:
            raise ValueError("teacher.kind=analytic needs teacher.preset or distill.presets (names from "
                             "teachers.presets.PRESETS)")
        jobs = []
        for name in names:
            teacher = load_teacher({**tcfg, "preset": name})
            dm = _datamodule(data_cfg, preset=teacher) if data_cfg.get("name") == "toy2d" else _datamodule(data_cfg)
            jobs.append((str(name), teacher, dm))
        return jobs
    if tcfg.get("kind") == "checkpoint" and not tcfg.get("path"):
        recipe = data_cfg.get("name", "<recipe>")
        raise FileNotFoundError(
            f"recipe {recipe!r} distils a trained teacher but teacher.path is not set. Train one with "
            f"`python -m teachers.train recipe={recipe}` (it writes <run_dir>/teacher.pt), then run "
            f"`python -m fkdiff.distill recipe={recipe} teacher.path=<that run_dir>/teacher.pt`"
            + (" data.root=<folder with cifar-10-batches-py>" if recipe == "cifar10" else ""))
    return [("student", load_teacher(tcfg), _datamodule(data_cfg))]


def _build_student(cfg: DictConfig, teacher, dm):
    from fkdiff.energy import build_student, warm_start_from

    scfg = _container(cfg.student)
    spec = getattr(teacher, "spec", None) or {}
    backbone = scfg.get("backbone")
    if backbone is None:
        backbone = dict(spec.get("backbone", {})) if spec else {}
    sigma_data = scfg.get("sigma_data") or getattr(teacher, "sigma_data", None) or dm.sigma_data
    conditional = bool(scfg.get("conditional", True)) and getattr(dm, "cond_kind", "none") != "none"
    student = build_student(
        dm.event_shape, float(sigma_data), scfg.get("g", "l2"), backbone=backbone,
        cond_kind=dm.cond_kind if conditional else "none",
        num_classes=getattr(dm, "num_classes", None) if conditional else None,
        cond_dim=getattr(dm, "cond_dim", None) if conditional else None,
        sigma_min=float(getattr(teacher, "sigma_min", 0.002)), sigma_max=float(getattr(teacher, "sigma_max", 80.0)),
        l2_init_scale=float(scfg.get("l2_init_scale", 0.1)))
    warm = scfg.get("warm_start", "auto")
    copied = False
    if warm in (True, "true", "auto"):
        copied = warm_start_from(student, teacher, strict=warm in (True, "true"))
    return student, copied


def _seed_everything(seed: int) -> None:
    import lightning.pytorch as pl

    pl.seed_everything(int(seed), workers=True, verbose=False)


def _distill_one(cfg: DictConfig, name: str, teacher, dm, run_dir: Path) -> StudentRun:
    from fkdiff.distillation import (DistillationModule, FinalCheckpoint, denoiser_error_by_bucket,
                                      energy_gap_error_by_bucket)
    from fkdiff.energy import save_student
    from fkdiff.training import build_logger, build_trainer, resolve_ckpt_path

    dcfg = cfg.distill
    _seed_everything(cfg.seed)  # the student's initial weights are a function of the seed
    student, warm = _build_student(cfg, teacher, dm)
    dm.setup("fit")
    train_loader, val_loader = dm.train_dataloader(), dm.val_dataloader()
    sub = run_dir / name
    module = DistillationModule(
        student, teacher, target=str(dcfg.target), sigma_data=student.sigma_data, p_mean=float(dcfg.p_mean),
        p_std=float(dcfg.p_std), weighting=str(dcfg.weighting), lr=float(dcfg.lr), betas=tuple(dcfg.betas),
        weight_decay=float(dcfg.weight_decay), warmup_steps=int(dcfg.warmup_steps), seed=int(cfg.seed),
        sigma_buckets=list(dcfg.sigma_buckets), diagnostics_every_n_steps=int(dcfg.diagnostics_every_n_steps or 0),
        train_data=(train_loader.dataset, train_loader.collate_fn),
        val_data=(val_loader.dataset, val_loader.collate_fn), batch_size=int(cfg.data.batch_size),
        plot=_container(dcfg.plot), plot_dir=sub / "plots", run_config=_container(cfg))
    tr = _container(cfg.trainer)
    if dcfg.get("max_steps"):
        tr["max_steps"] = int(dcfg.max_steps)
    if dcfg.get("gradient_clip_val") is not None:
        tr["gradient_clip_val"] = float(dcfg.gradient_clip_val)
    tr.setdefault("val_check_interval", int(dcfg.val_every_n_steps))
    tr.setdefault("check_val_every_n_epoch", None)
    tr.setdefault("num_sanity_val_steps", 0)
    tr.setdefault("inference_mode", False)       # validation differentiates the energy
    tr.setdefault("use_distributed_sampler", False)  # StepBatches shards the global batch itself
    if dcfg.get("checkpoint_every_n_steps"):
        tr["checkpoint_every_n_steps"] = int(dcfg.checkpoint_every_n_steps)
    logger = build_logger(cfg.logger, sub, name=f"distill-{cfg.data.name}-{name}", config=_container(cfg))
    trainer = build_trainer(tr, sub, logger=logger, ema_decay=dcfg.get("ema_decay"),
                            callbacks=[FinalCheckpoint()])
    ckpt = resolve_ckpt_path(dcfg.get("ckpt_path"), sub)
    trainer.fit(module, ckpt_path=ckpt, weights_only=True)  # resume never unpickles code (any torch version)
    _finish_wandb(logger)
    result = StudentRun(name=name, student=student, teacher=teacher, run_dir=str(sub), warm_start=warm,
                        step=int(trainer.global_step), checkpoint=str(sub / "checkpoints" / "last.ckpt"))
    if trainer.global_rank != 0:
        return result
    student.eval()
    result["student_path"] = str(save_student(student, sub / "student.pt", step=int(trainer.global_step),
                                              teacher=_container(cfg.teacher), name=name))
    ev = _container(dcfg.get("eval")) or {}
    if ev.get("enabled", True) and getattr(teacher, "sample", None) is not None:
        # analytic teacher: its denoiser is exact, so this is the student's excess error over the optimum
        g = torch.Generator().manual_seed(int(cfg.seed) + 1)
        x0 = teacher.sample(int(ev.get("num_samples", 4096)), generator=g).float()
        result["errors"] = denoiser_error_by_bucket(student, teacher, x0, list(dcfg.sigma_buckets), g)
        if callable(getattr(teacher, "energy", None)):
            result["energy_errors"] = energy_gap_error_by_bucket(student, teacher, x0, list(dcfg.sigma_buckets), g)
    return result


def _finish_wandb(logger) -> None:
    if type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()


def plot_densities(runs: list[StudentRun], path: Path, sigma: float, lim: float = 1.5, grid: int = 120) -> Path:
    """Learnt exp(-E_theta(x, sigma)) beside the true exp(-E(x, sigma)), one row per analytic teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fkdiff.distillation import energy_grid

    fig, axes = plt.subplots(len(runs), 2, figsize=(6, 3 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        for ax, model, title in ((row[0], run["teacher"], "true"), (row[1], run["student"], "student exp(-E)")):
            dens = energy_grid(model, lim, grid, sigma)
            ax.imshow(dens.T.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
            ax.set_title(f"{run['name']}: {title}, sigma={sigma:g}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def distill(cfg: DictConfig) -> list[StudentRun]:
    """Distil every student the config asks for; returns one `StudentRun` per student (see module docstring)."""
    from fkdiff.training import save_config

    torch.set_float32_matmul_precision("high")
    if cfg.distill.get("num_threads"):
        torch.set_num_threads(int(cfg.distill.num_threads))
    run_dir = Path(str(cfg.run_dir)).absolute()
    rank0 = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0
    if rank0:
        save_config(cfg, run_dir)
    runs = [_distill_one(cfg, name, teacher, dm, run_dir) for name, teacher, dm in _jobs(cfg)]
    if not rank0 or not runs or "student_path" not in runs[0]:
        return runs
    report = {"run_dir": str(run_dir), "students": {}}
    for r in runs:
        keys = ("student_path", "checkpoint", "step", "warm_start", "errors", "energy_errors")
        report["students"][r["name"]] = {k: r[k] for k in keys if k in r}
    if all(len(r["student"].event_shape) == 1 and r["student"].event_shape[0] == 2 for r in runs) and \
            all(callable(getattr(r["teacher"], "energy", None)) for r in runs):
        report["densities"] = str(plot_densities(runs, run_dir / "densities.png", float(cfg.distill.plot.sigma),
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


def _task(cfg: DictConfig):
    # under DDP Lightning relaunches this script with hydra.run.dir fixed: take the run folder from Hydra, so a
    # `${now:...}` run_dir resolves to the same folder in every process
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        OmegaConf.set_struct(cfg, False)
        cfg.run_dir = str(HydraConfig.get().run.dir)
    distill(cfg)


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(_task, task="distill")


if __name__ == "__main__":
    main()
