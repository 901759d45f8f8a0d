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

The level term (`distill.levels`, on in the toy2d recipe) is off for both students: it would make the two objectives
differ by more than the target. Besides the means, the final students' per-row errors are compared paired over the
held-out rows: `paired[metric]` = mean and standard error of (E-DSM's row error - distillation's row error) and
z = mean / se.

`--quick` (the default test suite runs it; about 6 s of CPU here): the toy2d recipe with an analytic teacher
(`--teacher` is a `teachers.presets` name there, default ring8; its denoiser is exact, so "error vs the teacher" is
exact), a small MLP student, 200 steps, 2048 held-out rows with one noise draw each (iid rows: exact teacher samples,
own sigma and eps), no figure (JSON and markdown only). It checks the direction of the claim: distillation's final
held-out error against the teacher is below E-DSM's by more than QUICK_K standard errors of the paired per-row
difference, and exits with status 1 when not.

    python benchmarks/distill_vs_edsm.py --recipe digits_small --teacher runs/digits_small-teacher/teacher.pt \
        --steps 400 --eval-every 25
    python benchmarks/distill_vs_edsm.py --recipe shapes_small --teacher runs/shapes_small-teacher/teacher.pt \
        --steps 200 --eval-every 20 --eval-size 128
    python benchmarks/distill_vs_edsm.py --quick --out /tmp/distill_vs_edsm_quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fkdiff.diffusion import append_dims
from fkdiff.distillation.loss import denoise, split_batch
from fkdiff.seeding import seeded_generator

RESULTS = Path(__file__).resolve().parent / "results" / "distill_vs_edsm"
# --quick's margin, in standard errors of the paired per-row difference. The rows are iid (one noise draw per held-out
# example), so by the CLT z = mean / se is ~N(0, 1) when the two students are equally good: z > 4 has one-sided
# probability 3e-5 there; 4 rather than 2-3 leaves room for the heavy tail of lambda-weighted errors (lambda ~ 1/sigma^2
# at small sigma) at 2048 rows. The se is over held-out rows only, for these two trained students (one training seed).
QUICK_K = 4.0
QUICK = {"recipe": "toy2d", "teacher": "ring8", "steps": 200, "eval_every": 200, "eval_size": None, "eval_noise": 1,
         "override": ["student.backbone.width=32", "student.backbone.num_blocks=2", "data.batch_size=128",
                      "data.num_samples=20480"]}  # validation: the last 10%, 2048 exact teacher samples


def build(recipe: str, teacher: str, init: str, seed: int, device: str, extra: list[str] = ()):
    """(cfg, teacher, datamodule, initial student) exactly as `python -m fkdiff.distill recipe=<recipe> <extra>`
    builds them. `teacher`: the teacher.pt path, or a preset name for a recipe with an analytic teacher (toy2d)."""
    from fkdiff.distill import _build_student, _jobs
    from fkdiff.recipes import compose

    overrides = [f"recipe={recipe}", f"seed={seed}", "logger=none", *extra]
    if init == "scratch":
        overrides.append("student.warm_start=false")
    cfg = compose(overrides)
    if cfg.teacher.kind == "analytic":  # = the override teacher.preset=<teacher> (one compose: a second costs ~1 s)
        cfg.teacher.preset = teacher
    else:
        cfg.teacher.path = teacher
    ((_, teacher, dm),) = _jobs(cfg)
    dm.setup("fit")
    torch.manual_seed(seed)  # the student's random init (the distill entry point seeds Lightning the same way)
    student, warm, conditional = _build_student(cfg, teacher, dm)
    if not conditional and getattr(dm, "cond_kind", "none") != "none":
        raise ValueError(f"recipe {recipe}: the data are conditioned on {dm.cond_kind} but the student is not; this "
                         f"benchmark compares students of the data's conditionals")
    if isinstance(teacher, torch.nn.Module):
        teacher = teacher.to(device).requires_grad_(False).eval()
    return cfg, teacher, dm, student.to(device), warm


@torch.no_grad()
def eval_set(dm, loss_fn, seed: int, repeats: int, size: int | None) -> dict:
    """`size` held-out examples (a fixed random subset; all when None), each with `repeats` fixed (sigma, eps) draws
    from the training law."""
    n = len(dm.val_set)
    rows = torch.randperm(n, generator=seeded_generator(seed, 0, 0, "bench-eval-rows"))[:size or n].sort().values
    batch = dm.val_set.__getitems__(rows.tolist())
    x0, cond = split_batch(batch)
    x0 = x0.repeat(repeats, *([1] * (x0.ndim - 1)))
    if cond is not None:
        cond = cond.repeat(repeats, *([1] * (cond.ndim - 1)))
    sigma, eps = loss_fn.draw(x0, seeded_generator(seed, 0, 0, "bench-eval"))
    return {"x0": x0, "cond": cond, "sigma": sigma, "x": x0 + append_dims(sigma, x0.ndim) * eps,
            "weight": loss_fn.weight(sigma)}


def _cond(ev: dict, sl: slice, device: str):
    return None if ev["cond"] is None else ev["cond"][sl].to(device)


def row_errors(student, teacher_out: torch.Tensor, ev: dict, device: str, chunk: int = 256) -> dict:
    """Per held-out row: {"dsm": lambda |D_theta - x_0|^2 / dim, "teacher": lambda |D_theta - D_teacher|^2 / dim}."""
    dsm, tch = [], []
    student.eval()
    for i in range(0, ev["x0"].shape[0], chunk):
        sl = slice(i, i + chunk)
        d = denoise(student, ev["x"][sl].to(device), ev["sigma"][sl].to(device), _cond(ev, sl, device))
        d = d.detach().cpu()
        dim = d[0].numel()
        dsm.append(ev["weight"][sl] * (d - ev["x0"][sl]).flatten(1).pow(2).sum(1) / dim)
        tch.append(ev["weight"][sl] * (d - teacher_out[sl]).flatten(1).pow(2).sum(1) / dim)
    student.train()
    return {"dsm": torch.cat(dsm), "teacher": torch.cat(tch)}


def evaluate(student, teacher_out: torch.Tensor, ev: dict, device: str, chunk: int = 256) -> tuple[float, float]:
    """(dsm, teacher) errors of `student` on the eval set, lambda-weighted, per dimension."""
    rows = row_errors(student, teacher_out, ev, device, chunk)
    return rows["dsm"].mean().item(), rows["teacher"].mean().item()


def paired(better: torch.Tensor, worse: torch.Tensor) -> dict:
    """Paired comparison over held-out rows: mean and standard error of (worse - better) per row, z = mean / se
    (> 0: `better` is lower)."""
    diff = worse.double() - better.double()
    mean, se = diff.mean().item(), (diff.std() / math.sqrt(diff.numel())).item()
    z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))  # se 0: identical rows
    return {"mean_diff": mean, "se": se, "z": z, "rows": diff.numel()}


@torch.no_grad()
def teacher_outputs(teacher, ev: dict, device: str, chunk: int = 256) -> torch.Tensor:
    return torch.cat([denoise(teacher, ev["x"][i:i + chunk].to(device), ev["sigma"][i:i + chunk].to(device),
                              _cond(ev, slice(i, i + chunk), device)).cpu() for i in range(0, ev["x"].shape[0], chunk)])


def train(target: str, init, teacher, cfg, dm, ev, t_out, args) -> tuple[dict, float, torch.nn.Module]:
    """One student trained with `distill.target=target` from `init`; its held-out curve, seconds and the student."""
    from fkdiff.distill import _sigma_range, build_loss
    from fkdiff.training import adam_with_warmup

    dcfg = {**OmegaConf.to_container(cfg.distill, resolve=True), "target": target}
    dcfg["levels"] = {**(dcfg.get("levels") or {}), "weight": 0.0}  # the projection loss alone (module docstring)
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
        out = loss_fn(student, teacher, x0.to(args.device), None if cond is None else cond.to(args.device),
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
                    "fraction_of_steps": None if reach is None or steps == 0 else reach / steps,
                    "edsm_best": best, "edsm_best_step": e["step"][e[key].index(best)],
                    "distill_steps_to_edsm_best": reach_best}
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="digits_small",
                    help="a recipe with a trained teacher (digits_small, shapes_small) or an analytic one (toy2d)")
    ap.add_argument("--teacher", default=None, help="the recipe's teacher.pt (python -m teachers.train recipe=...); "
                    "toy2d: a teachers.presets name")
    ap.add_argument("--quick", action="store_true",
                    help=f"the test suite's check (module docstring): defaults {QUICK}; exit status 1 when "
                         f"distillation is not below E-DSM vs the teacher by > {QUICK_K:g} standard errors")
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
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(**QUICK, name="toy2d_quick")
    args = ap.parse_args(argv)
    if args.teacher is None and not args.replot:
        ap.error("--teacher is required (a teacher.pt; for toy2d a preset name) unless --quick or --replot")
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

    curves, times, rows = {}, {}, {}
    for target, name in (("teacher", "distill"), ("data", "edsm")):
        curves[name], times[name], student = train(target, init, teacher, cfg, dm, ev, t_out, args)
        rows[name] = row_errors(student, t_out, ev, args.device)
        if args.save_students:
            from fkdiff.energy import save_student
            save_student(student.eval().cpu(), Path(args.save_students) / f"{name}.pt", step=args.steps,
                         recipe=args.recipe, target=target)

    result = {"recipe": args.recipe, "setting": vars(args), "event_shape": list(dm.event_shape), "warm_start": warm,
              "distill": {k: cfg.distill[k] for k in ("p_mean", "p_std", "lr", "warmup_steps", "gradient_clip_val",
                                                     "weighting")},
              "batch_size": int(cfg.data.batch_size), "eval_rows": int(ev["x0"].shape[0]),
              "teacher_dsm": teacher_dsm, "curves": curves, "train_seconds": times,
              "paired": {key: paired(rows["distill"][key], rows["edsm"][key]) for key in ("dsm", "teacher")}}
    result.update(summary(curves, args.steps))
    if args.quick:
        result["quick"] = {"k": QUICK_K, "metric": "teacher", "z": result["paired"]["teacher"]["z"],
                           "holds": result["paired"]["teacher"]["z"] > QUICK_K}
    stem = out / (args.name or args.recipe + ("" if args.init == "recipe" else "_scratch"))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    stem.with_suffix(".md").write_text(_table(result))
    print(_table(result))
    if args.quick:
        q = result["quick"]
        print(f"wrote {stem}.json and .md")
        print(f"quick: distillation below E-DSM vs the teacher by z = {q['z']:.1f} standard errors of the paired "
              f"difference (needs > {QUICK_K:g}): {'holds' if q['holds'] else 'DOES NOT HOLD'}")
    else:
        _plot(result, stem.with_suffix(".png"))
        print(f"wrote {stem}.json, .md and .png")
    result["rows"] = rows  # the final students' per-row errors (tensors; returned, not written)
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
    if "paired" in r:
        lines += ["", "Final students, paired over the held-out rows (E-DSM's row error - distillation's):", ""]
        lines += [f"- {key}: mean {m['mean_diff']:.4g} +- {m['se']:.2g} (se, {m['rows']} rows), z = {m['z']:.1f}"
                  for key, m in r["paired"].items()]
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
    res = main()
    sys.exit(0 if res.get("quick", {}).get("holds", True) else 1)
