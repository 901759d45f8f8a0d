"""Entry point: distil a diffusion teacher into an energy student (DESIGN.md sections 3-4; docs/conventions.md).

    python -m fkdiff.distill                                   # recipe toy2d: the analytic 2D teachers, CPU, minutes
    python -m fkdiff.distill recipe=digits teacher.path=runs/digits-teacher/teacher.pt
    python -m fkdiff.distill distill.target=data distill.levels.weight=0   # the E-DSM baseline (target x_0)
    python -m fkdiff.distill distill.levels.weight=0          # the projection loss alone (no level term)
    python -m fkdiff.distill run_dir=runs/toy2d distill.ckpt_path=last    # resume exactly (the run's own config)
    python -m fkdiff.distill trainer.devices=2 trainer.strategy=ddp      # DDP (gloo on CPU, nccl on GPUs)
    python -m fkdiff.distill --help                            # groups, recipes, key options

`distill(cfg)` is a plain function (tests call it): it wires the teacher (`teachers.load_teacher`), the data
(`fkdiff.training.build_datamodule_from_config`), the student (`fkdiff.energy.build_student`), the Lightning module
(`fkdiff.distillation.DistillationModule`) and the trainer (`fkdiff.training.build_trainer`), trains, and writes into
`run_dir`:
    config.yaml                     the resolved config (the base of a resume: `fkdiff.recipes.resume_config`)
    .lock                           while running: the process that owns the folder (`fkdiff.training.RunLock`)
    <name>/checkpoints/last.ckpt    Lightning checkpoints (EMA weights in state_dict, optimizer, step, EMA state)
    <name>/student.pt               the final EMA student (with a checksum of its weights), for `fkdiff.load_energy`
    <name>/result.json              written last: the student is done (its step, evaluation, student.pt's hash)
    <name>/logger.json              the W&B run id, so that a resume continues the same W&B run
    <name>/plots/                   validation plots (exp(-E) + ODE samples, or image grids)
    <name>/wandb/ | <name>/csv/     logger files (W&B offline by default)
    densities.png, report.json      toy2d: learnt exp(-E) beside the true densities; errors per sigma bucket;
                                    energy-level diagnostics (fkdiff.distillation.level_report); toy2d: the
                                    students' product at sigma_min by quadrature (fkdiff.levels.product_check_2d)
`<name>` is the teacher's preset for analytic teachers (one student per preset of `teacher.preset`), else `student`.

Resume and preemption (README "Resume and preemption"). A run that does not resume refuses a folder holding another
run, and two processes never share one (the lock). With `distill.ckpt_path=last` every student is, in order, left
alone when done (`result.json` at this max_steps, `student.pt` intact: its files never change again), finalised
from its checkpoint when that is at max_steps, resumed from its newest checkpoint, or started; the run's own saved
config is used. Every file is written atomically, so a kill -9 at any point, then the same resume command, ends
with the students and report of an uninterrupted run. SIGTERM writes a checkpoint at the end of the current step and
exits with status 143.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN
from fkdiff.files import load_torch_file, sha256_file

__all__ = ["distill", "build_loss", "main", "StudentRun", "RESULT"]

RESULT = "result.json"  # <run_dir>/<name>/result.json: written last, marks a student as done


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


def _off_condition(dcfg: DictConfig, dm, conditional: bool):
    """`distill.off_condition` (p_other, p_uncond) as `OffConditionRows`, or None (off, or an unconditional student)."""
    from fkdiff.distillation.conditions import OffConditionRows

    oc = _container(dcfg.get("off_condition")) or {}
    rows = OffConditionRows(float(oc.get("p_other", 0.0)), float(oc.get("p_uncond", 0.0)),
                            getattr(dm, "num_classes", None) if getattr(dm, "cond_kind", "none") == "class" else None)
    return rows if rows.active and conditional else None


def _sigma_range(cfg: DictConfig, teacher) -> tuple[float, float] | None:
    """The training sigma law's range: the teacher's [sigma_min, sigma_max] (distill.sigma_range=teacher, where the
    teacher declares one), or none (full)."""
    mode = str(cfg.distill.get("sigma_range", "teacher"))
    if mode not in ("teacher", "full"):
        raise ValueError(f"distill.sigma_range must be teacher or full, got {mode!r}")
    lo, hi = getattr(teacher, "sigma_min", None), getattr(teacher, "sigma_max", None)
    return (float(lo), float(hi)) if mode == "teacher" and lo is not None and hi is not None else None


def _plain(value) -> Any:
    """JSON-able copy of an evaluation result (tensors / numpy numbers to floats)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def _finished(sub: Path, max_steps: int) -> dict | None:
    """The result of a student that is done at `max_steps`: its `result.json` (written last, after `student.pt`) with
    the same step, and a `student.pt` whose bytes are the ones it records. None when the student is not done."""
    from fkdiff.training import ConfigError

    try:
        result = json.loads((sub / RESULT).read_text())
    except (OSError, ValueError):
        return None
    if int(result.get("step", -1)) > max_steps:
        raise ConfigError(f"student {sub.name} in {sub.parent} was trained to step {result['step']}, past "
                          f"distill.max_steps={max_steps}; a resumed run never trains past (or back from) its own "
                          f"max_steps. Give distill.max_steps>={result['step']} or start a new run_dir.")
    student = sub / "student.pt"
    if int(result.get("step", -1)) != max_steps or not student.is_file():
        return None
    return result if "sha256:" + sha256_file(student) == result.get("student_sha256") else None


def _checkpoint_to_resume(ckpt_path: str | None, sub: Path) -> tuple[str, int] | None:
    from fkdiff.training import explicit_checkpoint_step, newest_checkpoint

    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "last":
        found = newest_checkpoint(sub)
        return (str(found[0]), found[1]) if found else None
    return str(ckpt_path), explicit_checkpoint_step(ckpt_path, "distill.ckpt_path")


def _distill_one(cfg: DictConfig, trainer_cfg: dict, name: str, teacher, dm, run_dir: Path) -> StudentRun:
    """One student: left alone when done, finalised from its checkpoint when that is at max_steps, else trained
    (resumed from its newest checkpoint when resuming and one exists, started otherwise)."""
    import lightning.pytorch as pl

    from fkdiff.distillation import DistillationModule, SamplePlots
    from fkdiff.training import ConfigError, build_logger, build_trainer, fit
    from fkdiff.training.rundir import is_main_process

    dcfg = cfg.distill
    sub = run_dir / name
    max_steps = int(trainer_cfg["max_steps"])
    done = _finished(sub, max_steps)
    if done is not None:  # a finished student is never touched again
        return _run_from_result(done, name, teacher, sub)
    resume = _checkpoint_to_resume(dcfg.get("ckpt_path"), sub)
    if resume is not None and resume[1] > max_steps:
        raise ConfigError(f"student {name}: its checkpoint {resume[0]} is at step {resume[1]}, past "
                          f"distill.max_steps={max_steps}; give distill.max_steps>={resume[1]} or start a new run_dir.")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # the student's initial weights
    dm.setup("fit")
    student, warm, conditional = _build_student(cfg, teacher, dm)
    if resume is not None and resume[1] == max_steps:
        # trained to the end but not finalised (killed in between): the checkpoint's state_dict holds the final EMA
        # weights, which is exactly what the end of training puts into the student
        ckpt = load_torch_file(resume[0], "Lightning checkpoint")
        student.load_state_dict({k[len("student."):]: v for k, v in ckpt["state_dict"].items()
                                 if k.startswith("student.")})
        return _finalise(cfg, name, student, teacher, warm, resume[1], sub, dm) if is_main_process() else StudentRun(
            name=name, student=student, teacher=teacher, run_dir=str(sub), step=resume[1])
    loss = build_loss(dcfg, student.sigma_data, sigma_range=_sigma_range(cfg, teacher))
    module = DistillationModule(
        student, teacher, loss, lr=float(dcfg.lr), betas=tuple(dcfg.betas), weight_decay=float(dcfg.weight_decay),
        warmup_steps=int(dcfg.warmup_steps), seed=int(cfg.seed), sigma_buckets=list(dcfg.sigma_buckets),
        diagnostics_every_n_steps=int(dcfg.diagnostics_every_n_steps or 0), run_config=_container(cfg),
        conditional=conditional, off_condition=_off_condition(dcfg, dm, conditional))
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
    timeout = cfg.get("timeout")
    trainer = build_trainer(tr, sub, logger=logger, callbacks=callbacks, ema_decay=dcfg.get("ema_decay"),
                            checkpoint_every_n_steps=dcfg.get("checkpoint_every_n_steps"), timeout=timeout)
    fit(trainer, module, dm, resume[0] if resume else None, timeout=timeout,
        resume_hint=f"python -m fkdiff.distill run_dir={run_dir} distill.ckpt_path=last", logger=logger)
    student = _full_student(trainer, student, lambda: _build_student(cfg, teacher, dm)[0])
    if not trainer.is_global_zero:
        return StudentRun(name=name, student=student, teacher=teacher, run_dir=str(sub), warm_start=warm,
                          step=int(trainer.global_step))
    return _finalise(cfg, name, student, teacher, warm, int(trainer.global_step), sub, dm)


_WRAPPER_PREFIXES = ("_forward_module.", "_fsdp_wrapped_module.", "module.")


def _full_student(trainer, student, rebuild):
    """The trained student with all its weights on the main process. Under FSDP (`trainer.strategy=fsdp`) each
    process holds a shard: every process takes part in gathering the full state dict (Lightning's
    `strategy.lightning_module_state_dict()`, a collective; the full dict lands on the main process), which is loaded
    into a freshly built student there. Other strategies keep the whole student in every process: returned as is."""
    from lightning.pytorch.strategies import FSDPStrategy

    if not isinstance(trainer.strategy, FSDPStrategy):
        return student
    state = trainer.strategy.lightning_module_state_dict()
    if not trainer.is_global_zero:
        return student
    weights = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key.startswith("student."):
            weights[key[len("student."):]] = value
    fresh = rebuild()
    fresh.load_state_dict(weights)
    return fresh


def _finalise(cfg: DictConfig, name: str, student, teacher, warm: bool, step: int, sub: Path, dm) -> StudentRun:
    """Write `student.pt`, evaluate the student against an analytic teacher, then write `result.json` (the mark that
    the student is done). Every file is written atomically, in this order, so a kill at any point is harmless."""
    from fkdiff.distillation import denoiser_error_by_bucket, energy_gap_error_by_bucket
    from fkdiff.energy import load_energy, save_student
    from fkdiff.files import atomic_write_json
    from fkdiff.seeding import seeded_generator

    dcfg = cfg.distill
    student.eval()
    path = save_student(student, sub / "student.pt", step=step, teacher=_container(cfg.teacher), name=name)
    # evaluate the student as written (the in-memory one can differ in non-persistent buffers: EMAWeightAveraging
    # averages buffers too, so a constant such as the noise embedding's frequencies drifts by an ulp)
    student = load_energy(path, teacher=_module_or_none(teacher))
    result = {"name": name, "step": step, "warm_start": warm, "student_sha256": "sha256:" + sha256_file(path)}
    ev = _container(dcfg.get("eval")) or {}
    if ev.get("enabled", True) and getattr(teacher, "sample", None) is not None:
        # analytic teacher: its denoiser is exact, so this is the student's excess error over the optimum
        g = seeded_generator(int(cfg.seed), stream="eval")
        x0 = teacher.sample(int(ev.get("num_samples", 4096)), generator=g).float()
        result["errors"] = _plain(denoiser_error_by_bucket(student, teacher, x0, list(dcfg.sigma_buckets), g))
        if callable(getattr(teacher, "energy", None)):
            result["energy_errors"] = _plain(
                energy_gap_error_by_bucket(student, teacher, x0, list(dcfg.sigma_buckets), g))
    if ev.get("enabled", True) and teacher is not None and int(ev.get("level_samples") or 0) > 0:
        edges = _edges_within(list(dcfg.sigma_buckets), _sigma_range(cfg, teacher))  # the teacher is asked there
        result["levels"] = _plain(_level_report(student, teacher, ev, edges, dm, int(cfg.seed)))
    atomic_write_json(sub / RESULT, result)
    return _run_from_result(result, name, teacher, sub, student)


def _edges_within(edges: list, sigma_range: tuple[float, float] | None) -> list:
    """Bucket edges cut to the teacher's sigma range (None: unchanged): the outer edges move inside, edges outside
    are dropped."""
    if sigma_range is None:
        return edges
    lo, hi = max(float(edges[0]), sigma_range[0]), min(float(edges[-1]), sigma_range[1])
    if not lo < hi:
        raise ValueError(f"distill.sigma_buckets {edges} do not overlap the teacher's sigma range {sigma_range}")
    return [lo, *[float(e) for e in edges if lo < e < hi], hi]


def _module_or_none(teacher):
    """The teacher as `load_energy(teacher=...)` takes it: a student over a copy of an unregistered teacher network
    ("external", `fkdiff.energy.student_from_teacher`) is rebuilt from that module; others ignore it."""
    return teacher if isinstance(teacher, torch.nn.Module) else None


def _run_from_result(result: dict, name: str, teacher, sub: Path, student=None) -> StudentRun:
    from fkdiff.energy import load_energy

    run = StudentRun(name=name, teacher=teacher, run_dir=str(sub), student_path=str(sub / "student.pt"),
                     checkpoint=str(sub / "checkpoints" / "last.ckpt"),
                     student=student if student is not None else load_energy(
                         sub / "student.pt", teacher=_module_or_none(teacher)))
    run.update({k: result[k] for k in ("step", "warm_start", "errors", "energy_errors", "levels") if k in result})
    return run


def build_loss(dcfg: Mapping, sigma_data: float, sigma_range: tuple[float, float] | None = None):
    """The distillation loss from `distill`: the projection loss (`DenoiserMatchingLoss`), with the level term on the
    same forward pass (`LevelMatchingLoss`) when `distill.levels.weight` > 0 and the target is the teacher.
    `sigma_range`: the teacher's range the sigma laws are truncated to (see `_sigma_range`)."""
    from fkdiff.distillation import DenoiserMatchingLoss, LevelMatchingLoss

    args = (float(sigma_data), str(dcfg["target"]), float(dcfg["p_mean"]), float(dcfg["p_std"]), str(dcfg["weighting"]))
    levels = dict(_container(dcfg.get("levels")) or {})
    if float(levels.get("weight") or 0.0) > 0 and args[1] == "teacher":
        return LevelMatchingLoss(*args, sigma_range=sigma_range, **levels)
    return DenoiserMatchingLoss(*args, sigma_range=sigma_range)


def _level_report(student, teacher, ev: Mapping, edges: list, dm, seed: int) -> dict:
    """fkdiff.distillation.level_report on exact teacher samples (analytic teachers) or validation examples (others)."""
    from fkdiff.distillation import level_report, split_batch
    from fkdiff.seeding import seeded_generator

    g = seeded_generator(seed, stream="levels")
    n = int(ev["level_samples"])
    if getattr(teacher, "sample", None) is not None:
        x0, cond = teacher.sample(n, generator=g).float(), None
    else:
        x0, cond = split_batch(next(iter(dm.val_dataloader())))
        conditional = getattr(student, "cond_kind", "none") not in (None, "none")  # else the labels are dropped
        x0, cond = x0[:n], (cond[:n] if conditional and cond is not None else None)
    x0 = x0.to(next(student.parameters()).device)
    integrated = ev.get("integrated", "auto")
    integrated = not callable(getattr(teacher, "energy", None)) if integrated == "auto" else bool(integrated)
    return level_report(student, teacher, x0, edges, g, cond=cond, num_probes=int(ev.get("num_probes", 2)),
                        integrated=integrated, integrated_samples=int(ev.get("integrated_samples", 64)))


def distill(cfg: DictConfig) -> list[StudentRun]:
    """Distil every student the config asks for; returns one `StudentRun` per student (see module docstring)."""
    from fkdiff.distillation import plot_densities
    from fkdiff.files import atomic_write_json
    from fkdiff.training import ConfigError, default_checkpoint_interval, open_run, save_config, task_trainer_config
    from fkdiff.training.rundir import is_main_process

    torch.set_float32_matmul_precision("high")
    trainer_cfg = task_trainer_config(cfg, "distill")  # one knob per setting: fails before anything runs
    if cfg.distill.get("checkpoint_every_n_steps") is None:  # fixed now, saved with the config, kept on resume
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.distill.checkpoint_every_n_steps = default_checkpoint_interval(trainer_cfg["max_steps"])
    if cfg.distill.get("num_threads"):
        torch.set_num_threads(int(cfg.distill.num_threads))
    run_dir = Path(str(cfg.run_dir)).absolute()
    ckpt_path = cfg.distill.get("ckpt_path")
    resume = ckpt_path not in (None, "", "null", "none")
    jobs = _jobs(cfg)  # loads the teachers: a missing one fails before the run folder is written
    if resume and ckpt_path != "last" and len(jobs) > 1:
        raise ConfigError(f"distill.ckpt_path={ckpt_path}: this run distils {len(jobs)} students "
                          f"({', '.join(j[0] for j in jobs)}), each with its own checkpoints; resume them all with "
                          f"distill.ckpt_path=last")
    with open_run(run_dir, resume=str(ckpt_path) if resume else None, resume_key="distill.ckpt_path",
                  what="fkdiff.distill run"):
        if is_main_process():
            save_config(cfg, run_dir, ckpt_key="distill.ckpt_path")
        runs = [_distill_one(cfg, trainer_cfg, name, teacher, dm, run_dir) for name, teacher, dm in jobs]
        if not is_main_process() or not runs or "student_path" not in runs[0]:
            return runs
        report = {"run_dir": str(run_dir), "students": {}}
        for r in runs:
            keys = ("student_path", "checkpoint", "step", "warm_start", "errors", "energy_errors", "levels")
            report["students"][r["name"]] = {k: r[k] for k in keys if k in r}
        comp = (_container(cfg.distill.get("eval")) or {}).get("composition")
        if comp and len(runs) == 2 and all(_analytic_2d(r) for r in runs):
            from fkdiff.levels import product_check_2d

            report["composition"] = product_check_2d([r["student"] for r in runs], [r["teacher"] for r in runs],
                                                     float(comp.get("sigma", SIGMA_MIN)),
                                                     h=float(comp.get("h", 0.005)))
        if all(tuple(r["student"].event_shape) == (2,) and callable(getattr(r["teacher"], "energy", None))
               for r in runs):
            rows = [(r["name"], r["teacher"], r["student"]) for r in runs]
            report["densities"] = str(plot_densities(rows, run_dir / "densities.png", float(cfg.distill.plot.sigma),
                                                     float(cfg.distill.plot.lim)))
        atomic_write_json(run_dir / "report.json", report)
    _print_report(report)
    return runs


def _analytic_2d(run: StudentRun) -> bool:
    from teachers.analytic import Box, GaussianMixture

    return tuple(run["student"].event_shape) == (2,) and isinstance(run["teacher"], (Box, GaussianMixture))


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
        for line in _level_lines(r.get("levels", {})):
            print("    " + line)
    if "composition" in report:
        c = report["composition"]
        print(f"  students' product at sigma {c['sigma']:g} (quadrature): mass in y > 0 {c['region_mass']:.3f} "
              f"(exact {c['exact_region_mass']:.3f}), log-overlap {c['log_overlap']:.3f} (exact "
              f"{c['exact_log_overlap']:.3f}, error {c['log_overlap_error']:+.3f} nats)")
    if "densities" in report:
        print(f"  learnt vs true densities: {report['densities']}")
    print(f"  report: {report['run_dir']}/report.json; load a student with fkdiff.load_energy(<student.pt>)")


def _level_lines(levels: Mapping) -> list[str]:
    def cells(d: Mapping, key: str, fmt: str = "{:.3f}") -> str:
        return ", ".join(f"{b}: {fmt.format(v)}" for b, v in zip(d["bucket"], d[key]))

    lines = []
    if "mode_offsets" in levels:
        lines.append(f"energy-level offsets between modes (rms nats): {cells(levels['mode_offsets'], 'offset_rms')}")
    if "integrated" in levels:
        lines.append(f"relative-energy error vs the teacher's heat equation (rms nats): {cells(levels['integrated'], 'rms')}")
    if "time_score" in levels:
        lines.append("time-score error vs the teacher (rms nats per unit ln sigma): "
                     f"{cells(levels['time_score'], 'rms')}")
    if "residual" in levels:
        lines.append(f"residual |D - D_teacher|^2/d: {cells(levels['residual'], 'residual', '{:.2e}')}; teacher "
                     f"asymmetry: {cells(levels['residual'], 'asymmetry_rel', '{:.2e}')}")
    return lines


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(distill, task="distill")


if __name__ == "__main__":
    main()
