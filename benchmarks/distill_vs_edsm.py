"""Benchmark: distillation (projection loss, target D_teacher) vs E-DSM (target x_0) for an energy student.

Thornton et al. 2025 (fig. 2) report that distilling a trained diffusion teacher converges faster than training the
same energy parameterisation by denoising score matching (E-DSM). This script measures it on a recipe's data with a
trained teacher of that recipe (`digits_small`: sklearn's 8x8 digits, class-conditional; `shapes_small`: 16x16 scenes
conditioned on one object's position). Everything comes from the recipe through the real builders, as
`python -m fkdiff.distill recipe=<recipe>` wires it: the config (`fkdiff.recipes.compose`), the teacher
(`teachers.load_teacher`), the datamodule and its step-indexed batches (`train_dataloader`), the student network
(`fkdiff.distill`'s student builder: the teacher's backbone, warm-started from it when the recipe's `student.warm_start`
says so; `--init scratch` turns the warm start off), the loss (`fkdiff.distill.build_loss`: the recipe's sigma law,
weighting and the teacher's sigma range) and Adam with the recipe's lr / warmup / gradient clipping
(`fkdiff.training.adam_with_warmup`). The two students start from the SAME initial weights, see the same batches and
the same (sigma, eps) draws, and differ only in `distill.target` (teacher | data). Not used: the EMA (the raw weights
are evaluated) and the Lightning loop around the step.

Every `--eval-every` steps, on held-out examples (the datamodule's validation set or a fixed `--eval-size` subset of
it, `--eval-noise` noise draws each, sigma from the training law, all fixed):
    dsm     E lambda(sigma) |D_theta - x_0|^2 / dim        (E-DSM's objective; = excess error + irreducible error)
    teacher E lambda(sigma) |D_theta - D_teacher|^2 / dim  (distillation's objective)
Result: the first evaluated step at which distillation's error reaches E-DSM's final error, as a fraction of the
steps, and E-DSM's best (lowest evaluated) error with the step distillation reaches it, for both metrics. Writes
<out>/<name>.json, <name>.md and <name>.png (held-out error vs step, both objectives; name: `--name`, default the
recipe); `--save-students DIR` also writes both final students (student.pt format) there; `--replot JSON` redraws.
Measured here (README "Benchmarks"): digits_small 400 steps in 17 min, shapes_small 200 steps in 9 min.

    python benchmarks/distill_vs_edsm.py --recipe digits_small --teacher runs/digits_small-teacher/teacher.pt \
        --steps 400 --eval-every 25
    python benchmarks/distill_vs_edsm.py --recipe shapes_small --teacher runs/shapes_small-teacher/teacher.pt \
        --steps 200 --eval-every 20 --eval-size 128
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fkdiff.diffusion import append_dims
from fkdiff.distillation.loss import denoise, split_batch
from fkdiff.seeding import seeded_generator

RESULTS = Path(__file__).resolve().parent / "results" / "distill_vs_edsm"


def build(recipe: str, teacher_path: str, init: str, seed: int, device: str, extra: list[str] = ()):
    """(cfg, teacher, datamodule, initial student) exactly as `python -m fkdiff.distill recipe=<recipe> <extra>`
    builds them."""
    from fkdiff.distill import _build_student, _jobs
    from fkdiff.recipes import compose

    overrides = [f"recipe={recipe}", f"teacher.path={teacher_path}", f"seed={seed}", "logger=none", *extra]
    if init == "scratch":
        overrides.append("student.warm_start=false")
    cfg = compose(overrides)
    ((_, teacher, dm),) = _jobs(cfg)
    dm.setup("fit")
    torch.manual_seed(seed)  # the student's random init (the distill entry point seeds Lightning the same way)
    student, warm, conditional = _build_student(cfg, teacher, dm)
    if not conditional:
        raise ValueError(f"recipe {recipe}: the student is unconditional; this benchmark compares conditional students")
    return cfg, teacher.to(device).requires_grad_(False).eval(), dm, student.to(device), warm


@torch.no_grad()
def eval_set(dm, loss_fn, seed: int, repeats: int, size: int | None) -> dict:
    """`size` held-out examples (a fixed random subset; all when None), each with `repeats` fixed (sigma, eps) draws
    from the training law."""
    n = len(dm.val_set)
    rows = torch.randperm(n, generator=seeded_generator(seed, 0, 0, "bench-eval-rows"))[:size or n].sort().values
    batch = dm.val_set.__getitems__(rows.tolist())
    x0, cond = split_batch(batch)
    x0 = x0.repeat(repeats, *([1] * (x0.ndim - 1)))
    cond = cond.repeat(repeats, *([1] * (cond.ndim - 1)))
    sigma, eps = loss_fn.draw(x0, seeded_generator(seed, 0, 0, "bench-eval"))
    return {"x0": x0, "cond": cond, "sigma": sigma, "x": x0 + append_dims(sigma, x0.ndim) * eps,
            "weight": loss_fn.weight(sigma)}


def evaluate(student, teacher_out: torch.Tensor, ev: dict, device: str, chunk: int = 256) -> tuple[float, float]:
    """(dsm, teacher) errors of `student` on the eval set, lambda-weighted, per dimension."""
    dsm, tch = [], []
    student.eval()
    for i in range(0, ev["x0"].shape[0], chunk):
        sl = slice(i, i + chunk)
        d = denoise(student, ev["x"][sl].to(device), ev["sigma"][sl].to(device), ev["cond"][sl].to(device))
        d = d.detach().cpu()
        dim = d[0].numel()
        dsm.append(ev["weight"][sl] * (d - ev["x0"][sl]).flatten(1).pow(2).sum(1) / dim)
        tch.append(ev["weight"][sl] * (d - teacher_out[sl]).flatten(1).pow(2).sum(1) / dim)
    student.train()
    return torch.cat(dsm).mean().item(), torch.cat(tch).mean().item()


@torch.no_grad()
def teacher_outputs(teacher, ev: dict, device: str, chunk: int = 256) -> torch.Tensor:
    return torch.cat([denoise(teacher, ev["x"][i:i + chunk].to(device), ev["sigma"][i:i + chunk].to(device),
                              ev["cond"][i:i + chunk].to(device)).cpu() for i in range(0, ev["x"].shape[0], chunk)])


def train(target: str, init, teacher, cfg, dm, ev, t_out, args) -> tuple[dict, float, torch.nn.Module]:
    """One student trained with `distill.target=target` from `init`; its held-out curve, seconds and the student."""
    from fkdiff.distill import _sigma_range, build_loss
    from fkdiff.training import adam_with_warmup

    dcfg = {**OmegaConf.to_container(cfg.distill, resolve=True), "target": target}
    loss_fn = build_loss(dcfg, init.sigma_data, _sigma_range(cfg, teacher))
    student = copy.deepcopy(init).train()
    opt = adam_with_warmup(student.parameters(), dcfg["lr"], tuple(dcfg["betas"]), dcfg["weight_decay"],
                           dcfg["warmup_steps"])
    opt, sched = (opt["optimizer"], opt["lr_scheduler"]["scheduler"]) if isinstance(opt, dict) else (opt, None)
    clip = dcfg["gradient_clip_val"]
    curve = {"step": [0], "dsm": [], "teacher": []}
    d, t = evaluate(student, t_out, ev, args.device)
    curve["dsm"].append(d), curve["teacher"].append(t)
    batches = iter(dm.train_dataloader())  # batch k a pure function of (data seed, k): the same for both targets
    t1 = time.time()
    for k in range(args.steps):
        x0, cond = split_batch(next(batches))
        out = loss_fn(student, teacher, x0.to(args.device), cond.to(args.device),
                      seeded_generator(args.seed, k, 0, "noise"))
        opt.zero_grad(set_to_none=True)
        out.loss.mean().backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(student.parameters(), float(clip))
        opt.step()
        if sched is not None:
            sched.step()
        if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
            d, t = evaluate(student, t_out, ev, args.device)
            curve["step"].append(k + 1), curve["dsm"].append(d), curve["teacher"].append(t)
            print(f"{target:8s} step {k + 1:6d}  dsm {d:.4f}  vs-teacher {t:.4f}  ({time.time() - t1:.0f} s)",
                  flush=True)
    return curve, time.time() - t1, student


def first_reach(curve: dict, key: str, level: float):
    return next((s for s, v in zip(curve["step"], curve[key]) if v <= level), None)


def summary(curves: dict, steps: int) -> dict:
    """Per metric: E-DSM's final and best (lowest evaluated) error, distillation's final, and the first evaluated step
    at which distillation reaches each (the final value is one noisy evaluation; the best is E-DSM at its luckiest)."""
    out = {}
    for key in ("dsm", "teacher"):
        e, d = curves["edsm"], curves["distill"]
        final, best = e[key][-1], min(e[key])
        reach, reach_best = first_reach(d, key, final), first_reach(d, key, best)
        out[key] = {"edsm_final": final, "distill_final": d[key][-1], "distill_steps_to_edsm_final": reach,
                    "fraction_of_steps": None if reach is None else reach / steps,
                    "edsm_best": best, "edsm_best_step": e["step"][e[key].index(best)],
                    "distill_steps_to_edsm_best": reach_best}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="digits_small",
                    help="a recipe with a trained teacher: digits_small, shapes_small")
    ap.add_argument("--teacher", required=True, help="the recipe's teacher.pt (python -m teachers.train recipe=...)")
    ap.add_argument("--init", choices=("recipe", "scratch"), default="recipe",
                    help="recipe: the recipe's student.warm_start (auto: from the teacher's backbone); scratch: random")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of the recipe (as for fkdiff.distill), e.g. data.batch_size=32; repeatable")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-size", type=int, default=None, help="held-out examples (default: the validation set)")
    ap.add_argument("--eval-noise", type=int, default=2, help="noise draws per held-out example")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default=None, help="file stem of the outputs (default: the recipe, + _scratch)")
    ap.add_argument("--save-students", default=None, help="a folder for the two final students (not in git)")
    ap.add_argument("--replot", default=None, help="only redraw the figure (and table) of a result JSON")
    args = ap.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        result.update(summary(result["curves"], result["setting"]["steps"]))
        Path(args.replot).write_text(json.dumps(result, indent=2))
        Path(args.replot).with_suffix(".md").write_text(_table(result))
        _plot(result, Path(args.replot).with_suffix(".png"))
        return result
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    cfg, teacher, dm, init, warm = build(args.recipe, args.teacher, args.init, args.seed, args.device,
                                       args.override)
    from fkdiff.distill import _sigma_range, build_loss
    ev = eval_set(dm, build_loss(cfg.distill, init.sigma_data, _sigma_range(cfg, teacher)), args.seed, args.eval_noise,
                 args.eval_size)
    t_out = teacher_outputs(teacher, ev, args.device)
    dim = ev["x0"][0].numel()
    teacher_dsm = (ev["weight"] * (t_out - ev["x0"]).flatten(1).pow(2).sum(1) / dim).mean().item()
    print(f"{args.recipe}: event {tuple(dm.event_shape)}, warm start {warm}, {ev['x0'].shape[0]} held-out rows, "
          f"teacher dsm {teacher_dsm:.4f} ({time.time() - t0:.0f} s setup)", flush=True)

    curves, times = {}, {}
    for target, name in (("teacher", "distill"), ("data", "edsm")):
        curves[name], times[name], student = train(target, init, teacher, cfg, dm, ev, t_out, args)
        if args.save_students:
            from fkdiff.energy import save_student
            save_student(student.eval().cpu(), Path(args.save_students) / f"{name}.pt", step=args.steps,
                         recipe=args.recipe, target=target)

    result = {"recipe": args.recipe, "setting": vars(args), "event_shape": list(dm.event_shape), "warm_start": warm,
              "distill": {k: cfg.distill[k] for k in ("p_mean", "p_std", "lr", "warmup_steps", "gradient_clip_val",
                                                     "weighting")},
              "batch_size": int(cfg.data.batch_size), "eval_rows": int(ev["x0"].shape[0]),
              "teacher_dsm": teacher_dsm, "curves": curves, "train_seconds": times}
    result.update(summary(curves, args.steps))
    stem = out / (args.name or args.recipe + ("" if args.init == "recipe" else "_scratch"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_table(result))
    _plot(result, stem.with_suffix(".png"))
    print(_table(result))
    print(f"wrote {stem}.json, .md and .png")
    return result


def _fmt(v, f="{:.4f}"):
    return "–" if v is None else f.format(v)


def _table(r: dict) -> str:
    s = r["setting"]
    lines = [f"# Distillation vs E-DSM: {r['recipe']}", "",
             f"Teacher `{s['teacher']}`; student init: {'warm start from the teacher' if r['warm_start'] else 'random'}"
             f" (seed {s['seed']}); {s['steps']} steps of batch {r['batch_size']}; held-out rows {r['eval_rows']} "
             f"(validation examples x {s['eval_noise']} noise draws); teacher's own held-out DSM error "
             f"{r['teacher_dsm']:.4f}. Seconds of training: distill {r['train_seconds']['distill']:.0f}, "
             f"E-DSM {r['train_seconds']['edsm']:.0f}.", "",
             "| held-out metric (lambda-weighted, per dim) | E-DSM final | distillation final | distillation reaches "
             "E-DSM's final at step (fraction of steps) | E-DSM best (at step) | distillation reaches it at step |",
             "|---|---|---|---|---|---|"]
    for key, label in (("dsm", "DSM error, D_theta vs x_0"), ("teacher", "error vs teacher, D_theta vs D_teacher")):
        m = r[key]
        lines.append(f"| {label} | {m['edsm_final']:.4f} | {m['distill_final']:.4f} | "
                     f"{_fmt(m['distill_steps_to_edsm_final'], '{}')} ({_fmt(m['fraction_of_steps'], '{:.2f}')}) | "
                     f"{m['edsm_best']:.4f} ({m['edsm_best_step']}) | {_fmt(m['distill_steps_to_edsm_best'], '{}')} |")
    return "\n".join(lines) + "\n"


def _plot(r: dict, path: Path) -> None:
    """Held-out error vs step, both objectives; the steps before `cut` (1/8 of the run) are cut, as in fig. 2, so that
    the scale shows the end of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"distill": "distillation (target D_teacher)", "edsm": "E-DSM (target x_0)"}
    cut = max(r["setting"]["eval_every"], r["setting"]["steps"] // 8)
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in r["curves"].items():
        keep = [i for i, s in enumerate(c["step"]) if s >= cut]
        for a, key in zip(ax, ("dsm", "teacher")):
            a.plot([c["step"][i] for i in keep], [c[key][i] for i in keep], label=labels[name], marker=".")
    ax[0].axhline(r["dsm"]["edsm_final"], ls="--", c="gray", lw=0.8, label="E-DSM final")
    ax[0].axhline(r["teacher_dsm"], ls=":", c="k", lw=0.8, label="the teacher's own")
    ax[1].axhline(r["teacher"]["edsm_final"], ls="--", c="gray", lw=0.8, label="E-DSM final")
    ax[0].set_title("held-out DSM error  E lambda |D - x_0|^2 / dim")
    ax[1].set_title("held-out error vs teacher  E lambda |D - D_teacher|^2 / dim")
    gap = r["dsm"]["edsm_final"] - r["teacher_dsm"]  # zoom on the end of training: the teacher's level to E-DSM's + gap
    if gap > 0:
        ax[0].set_ylim(r["teacher_dsm"] - 0.2 * gap, r["dsm"]["edsm_final"] + 1.2 * gap)
    ax[1].set_yscale("log")
    for a in ax:
        a.set_xlabel(f"training step (steps < {cut} cut)"), a.legend(fontsize=8)
    init = "warm start from the teacher" if r["warm_start"] else "random init"
    fig.suptitle(f"{r['recipe']}: distillation vs E-DSM, same init ({init}), same batches and noise")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
