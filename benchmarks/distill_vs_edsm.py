"""Benchmark: distillation (projection loss, target D_teacher) vs E-DSM (target x_0) for an energy student.

Thornton et al. 2025 (fig. 2) report that distilling a trained diffusion teacher converges faster than training the
same energy parameterisation by denoising score matching. This script measures it on `digits` (sklearn's bundled
8x8 digits, class-conditional): one EDM teacher is trained (or loaded), then two students with the SAME initial
weights, the same batches and the same (sigma, eps) draws are trained, differing only in `DenoiserMatchingLoss.target`
(DESIGN.md section 4). Every `--eval-every` steps, on a fixed held-out set with fixed noise (sigma from the training
distribution):
    dsm     E lambda(sigma) |D_theta - x_0|^2 / dim   (the objective of both; = excess error + irreducible error)
    teacher E lambda(sigma) |D_theta - D_teacher|^2 / dim
Result: the first step at which distillation's error reaches E-DSM's final error, as a fraction of the steps, for
both metrics (target of the issue: <= 1/3). Writes JSON + a plot to benchmarks/results/ (git-ignored).

    python benchmarks/distill_vs_edsm.py                      # reduced CPU setting (a few minutes)
    python benchmarks/distill_vs_edsm.py --size 16 --steps 5000 --teacher-steps 20000 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from fkdiff.data import build_datamodule
from fkdiff.diffusion import append_dims, edm_loss_weight, sample_training_sigma
from fkdiff.distillation import DenoiserMatchingLoss
from fkdiff.energy import build_student, warm_start_from
from fkdiff.seeding import derive_seed
from teachers import EDMDenoiser, EDMLoss, load_teacher, save_teacher


def batches(x: torch.Tensor, cond: torch.Tensor, batch: int, seed: int, step: int):
    g = torch.Generator().manual_seed(derive_seed(seed, step, 0, "bench-data"))
    idx = torch.randint(0, x.shape[0], (batch,), generator=g)
    return x[idx], cond[idx]


def train_teacher(x, cond, spec_kw, steps, batch, lr, seed, device):
    torch.manual_seed(seed)
    teacher = EDMDenoiser.build(**spec_kw).to(device)
    ema = copy.deepcopy(teacher).requires_grad_(False)
    opt = torch.optim.Adam(teacher.parameters(), lr=lr)
    loss_fn = EDMLoss(teacher.sigma_data, p_uncond=0.1)
    for k in range(steps):
        xb, cb = batches(x, cond, batch, seed, k)
        g = torch.Generator().manual_seed(derive_seed(seed, k, 0, "bench-teacher"))
        loss = loss_fn(teacher, xb.to(device), cb.to(device), g if device == "cpu" else None).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + k) / (10 + k))
            for pe, p in zip(ema.parameters(), teacher.parameters()):
                pe.lerp_(p, 1 - d)
    return ema.eval()


@torch.no_grad()
def _noisy_eval_set(x, cond, sigma_data, seed, n):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=g)[:n]
    x0, c = x[idx], cond[idx]
    sigma = sample_training_sigma(n, generator=g)
    xn = x0 + append_dims(sigma, x0.ndim) * torch.randn(x0.shape, generator=g)
    return x0, c, sigma, xn, edm_loss_weight(sigma, sigma_data)


def evaluate(student, teacher, ev, device, chunk=256):
    x0, c, sigma, xn, w = ev
    dsm, tch = [], []
    student.eval()
    for i in range(0, x0.shape[0], chunk):
        sl = slice(i, i + chunk)
        d = student(xn[sl].to(device), sigma[sl].to(device), c[sl].to(device)).cpu()
        with torch.no_grad():
            dt = teacher(xn[sl].to(device), sigma[sl].to(device), c[sl].to(device)).cpu()
        dim = d[0].numel()
        dsm.append(w[sl] * (d - x0[sl]).flatten(1).pow(2).sum(1) / dim)
        tch.append(w[sl] * (d - dt).flatten(1).pow(2).sum(1) / dim)
    student.train()
    return torch.cat(dsm).mean().item(), torch.cat(tch).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--teacher", default=None, help="a teacher.pt to reuse (else one is trained and saved)")
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--g", default="l2")
    ap.add_argument("--warm-start", action="store_true", help="init f_theta from the teacher's backbone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dm = build_datamodule("digits", size=args.size, seed=args.seed)
    dm.setup("fit")
    tr, va = dm.train_set.__getitems__(list(range(len(dm.train_set)))), dm.val_set.__getitems__(
        list(range(len(dm.val_set))))
    x, cond, xv, cv = tr["x"], tr["cond"], va["x"], va["cond"]
    backbone = {"kind": "unet", "channels": list(args.channels), "emb_dim": 64}
    t0 = time.time()
    if args.teacher:
        teacher = load_teacher(args.teacher, device=args.device)
    else:
        spec = dict(event_shape=dm.event_shape, sigma_data=dm.sigma_data, cond_kind=dm.cond_kind,
                    num_classes=dm.num_classes, backbone=backbone)
        teacher = train_teacher(x, cond, spec, args.teacher_steps, args.batch, 2e-3, args.seed, args.device)
        save_teacher(teacher, out / f"digits{args.size}_teacher.pt", step=args.teacher_steps)
    teacher.requires_grad_(False)
    t_teacher = time.time() - t0
    ev = _noisy_eval_set(xv, cv, dm.sigma_data, args.seed + 1, min(args.eval_size, xv.shape[0]))

    torch.manual_seed(args.seed)
    init = build_student(dm.event_shape, teacher.sigma_data, args.g, backbone=teacher.spec["backbone"],
                         cond_kind=dm.cond_kind, num_classes=dm.num_classes)
    if args.warm_start:
        warm_start_from(init, teacher, strict=True)
    curves, times = {}, {}
    for target in ("teacher", "data"):
        student = copy.deepcopy(init).to(args.device).train()
        opt = torch.optim.Adam(student.parameters(), lr=args.lr)
        loss_fn = DenoiserMatchingLoss(student.sigma_data, target=target)
        curve = {"step": [0], "dsm": [], "teacher": []}
        d, t = evaluate(student, teacher, ev, args.device)
        curve["dsm"].append(d), curve["teacher"].append(t)
        t1 = time.time()
        for k in range(args.steps):
            xb, cb = batches(x, cond, args.batch, args.seed, k)
            g = torch.Generator().manual_seed(derive_seed(args.seed, k, 0, "noise"))
            loss = loss_fn(student, teacher, xb.to(args.device), cb.to(args.device), g).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
                d, t = evaluate(student, teacher, ev, args.device)
                curve["step"].append(k + 1), curve["dsm"].append(d), curve["teacher"].append(t)
                print(f"{target:8s} step {k + 1:6d}  dsm {d:.4f}  vs-teacher {t:.4f}", flush=True)
        times[target] = time.time() - t1
        curves["distill" if target == "teacher" else "edsm"] = curve

    final_edsm = curves["edsm"]["dsm"][-1]
    reach = next((s for s, v in zip(curves["distill"]["step"], curves["distill"]["dsm"]) if v <= final_edsm), None)
    final_edsm_t = curves["edsm"]["teacher"][-1]
    reach_t = next((s for s, v in zip(curves["distill"]["step"], curves["distill"]["teacher"]) if v <= final_edsm_t),
                   None)
    teacher_dsm = evaluate(_TeacherAsStudent(teacher), teacher, ev, args.device)[0]
    result = {
        "setting": vars(args), "event_shape": list(dm.event_shape), "teacher_train_seconds": t_teacher,
        "teacher_dsm": teacher_dsm, "curves": curves, "train_seconds": times, "edsm_final_dsm": final_edsm,
        "distill_final_dsm": curves["distill"]["dsm"][-1],
        "distill_steps_to_edsm_final": reach,
        "fraction_of_steps": None if reach is None else reach / args.steps,
        "distill_steps_to_edsm_final_vs_teacher": reach_t,
        "fraction_of_steps_vs_teacher": None if reach_t is None else reach_t / args.steps,
        "target_fraction": 1 / 3,
    }
    stem = out / f"distill_vs_edsm_digits{args.size}_{args.g}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    _plot(curves, final_edsm, teacher_dsm, stem.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("teacher_dsm", "edsm_final_dsm", "distill_final_dsm",
                                             "distill_steps_to_edsm_final", "fraction_of_steps",
                                             "fraction_of_steps_vs_teacher")}, indent=2))
    print(f"wrote {stem}.json and {stem}.png")


class _TeacherAsStudent:
    def __init__(self, teacher):
        self.teacher = teacher

    def __call__(self, x, s, c=None):
        with torch.no_grad():
            return self.teacher(x, s, c)

    def eval(self):
        return self

    def train(self):
        return self


def _plot(curves, final_edsm, teacher_dsm, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, c in curves.items():
        ax[0].plot(c["step"], c["dsm"], label=name)
        ax[1].plot(c["step"], c["teacher"], label=name)
    ax[0].axhline(final_edsm, ls="--", c="gray", lw=0.8, label="E-DSM final")
    ax[0].axhline(teacher_dsm, ls=":", c="k", lw=0.8, label="teacher")
    ax[0].set_title("held-out DSM error (lambda-weighted, per dim)")
    ax[1].set_title("error vs teacher denoiser")
    for a in ax:
        a.set_yscale("log"), a.set_xlabel("step"), a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
