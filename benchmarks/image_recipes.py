"""Evaluate a CPU-sized image recipe's teacher and distilled energy student (issue 10, phase 1).

For a `digits_small` or `shapes_small` teacher (`python -m teachers.train recipe=...`) and its student
(`python -m fkdiff.distill recipe=... teacher.path=...`), on the recipe's held-out split:

- denoiser error per sigma bucket: the teacher's own error E|D_T(x0 + sigma eps) - x0|^2 and the student's excess
  over the teacher E|D_S - D_T|^2, summed over pixels, with the ratio excess / teacher error
  (`fkdiff.distillation.denoiser_error_by_bucket`); the student is usable at sigma where the ratio is small;
- samples of both by the probability-flow ODE (Heun, EDM's 2nd-order sampler, `--steps` levels, the *same* noise
  and conditions for teacher and student), scored by the recipe's metric: digits -> the digits classifier's accuracy
  for the requested class, confidence, entropy and the classifier Fréchet distance to the training digits (not FID);
  shapes -> the fraction of samples with an object at the requested position (exact detector), and the mean number
  of objects per image;
- PNG grids of those samples (digits: one row per class; shapes: the requested position marked).

    python benchmarks/image_recipes.py --teacher /work/artifacts/images/digits_small/teacher.pt \
        --student /work/artifacts/images/digits_small/student.pt --out /work/artifacts/images/digits_small/eval

Writes `<out>/eval.json`, `<out>/eval.md`, `<out>/samples_teacher.png`, `<out>/samples_student.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fkdiff.diffusion import sigma_schedule

EDGES = [0.002, 0.01, 0.05, 0.2, 1.0, 5.0, 80.0]


def heun_sample(denoiser, noise: torch.Tensor, cond, *, num_steps: int, sigma_min: float = 0.002,
                sigma_max: float = 80.0, max_batch: int = 256) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (Karras et al. 2022, alg. 1) from x = sigma_max * noise. `[N, *event]`."""
    sig = sigma_schedule(num_steps, sigma_min, sigma_max, append_zero=True).tolist()
    out = []
    for i in range(0, noise.shape[0], max_batch):
        x = noise[i:i + max_batch].double() * sig[0]
        c = None if cond is None else cond[i:i + max_batch]

        def d(x, s):
            st = torch.full((x.shape[0],), s, dtype=torch.float32)
            return ((x - denoiser(x.float(), st, c).detach().double()) / s)

        for s, s_next in zip(sig[:-1], sig[1:]):
            dx = d(x, s)
            x_next = x + (s_next - s) * dx
            if s_next > 0:
                x_next = x + (s_next - s) * 0.5 * (dx + d(x_next, s_next))
            x = x_next
        out.append(x.float())
    return torch.cat(out)


def _datamodule(kind: str, size: int):
    from fkdiff.data import build_datamodule

    dm = build_datamodule("digits", size=size) if kind == "digits" else build_datamodule("shapes", canvas=size)
    dm.setup("fit")
    return dm


def _conditions(kind: str, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "digits":
        return torch.arange(10).repeat_interleave(math.ceil(n / 10))[:n]
    from fkdiff.data.shapes import default_radius, pixel_to_position

    r = default_radius(size)
    rc = torch.randint(r, size - r, (n, 2), generator=generator)
    return pixel_to_position(rc, size)


def _score(kind: str, x: torch.Tensor, cond: torch.Tensor, clf, train_x: torch.Tensor | None) -> dict:
    from fkdiff import metrics as M

    if kind == "digits":
        s = M.classifier_scores(clf, x, cond)
        return {"class_accuracy": s.accuracy, "mean_confidence": s.mean_confidence, "mean_entropy": s.mean_entropy,
                "classifier_frechet_distance": M.classifier_frechet_distance(clf, x, train_x)}
    sc = M.composition_accuracy(x, cond[:, None])
    return {"position_accuracy": sc.accuracy, "position_accuracy_se": sc.se,
            "mean_num_objects": float(sc.num_objects.float().mean())}


def _grid(x: torch.Tensor, cond: torch.Tensor, kind: str, path: Path, title: str, cols: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fkdiff.data.shapes import position_to_pixel

    n = min(x.shape[0], 100)
    if kind == "digits":  # one row per class
        per = min(cols, n // 10)
        idx = torch.cat([torch.nonzero(cond[:x.shape[0]] == k)[:per, 0] for k in range(10)])
        rows, cols = 10, per
    else:
        idx = torch.arange(n)
        rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx.tolist()):
        img = ((x[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                  vmin=0, vmax=1, interpolation="nearest")
        if kind == "shapes":
            r, c = position_to_pixel(cond[i], x.shape[-1]).tolist()
            ax.plot([c], [r], "+", color="cyan", ms=7, mew=1.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--steps", type=int, default=18, help="Heun levels (2 steps - 1 evaluations each)")
    p.add_argument("--num-eval", type=int, default=512, help="held-out images for the per-bucket errors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default=None, help="digits: a saved classifier (else trained from seed 0)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from fkdiff import load_energy
    from fkdiff.distillation import denoiser_error_by_bucket
    from fkdiff.metrics import load_classifier, save_classifier, train_digits_classifier
    from teachers import load_teacher

    teacher = load_teacher({"kind": "checkpoint", "path": args.teacher})
    student = load_energy(args.student)
    kind = "digits" if teacher.cond_kind == "class" else "shapes"
    size = student.event_shape[-1]
    dm = _datamodule(kind, size)
    val = dm.val_set
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(val), generator=g)[: args.num_eval]
    batch = val.__getitems__(idx)
    t0 = time.perf_counter()
    err = denoiser_error_by_bucket(student, teacher, batch["x"], EDGES, g, cond=batch["cond"], max_batch=128)
    t_err = time.perf_counter() - t0
    # also the student's own error vs the data, per bucket (teacher error + excess + cross term)
    clf, train_x = None, None
    if kind == "digits":
        clf_path = Path(args.classifier) if args.classifier else out / f"classifier_digits{size}.pt"
        if clf_path.is_file():
            clf = load_classifier(clf_path)
        else:
            clf = train_digits_classifier(size, seed=0)
            save_classifier(clf, clf_path)
        train_x = dm.train_set.x
    cond = _conditions(kind, args.num_samples, size, g)
    noise = torch.randn((args.num_samples, *student.event_shape), generator=g)
    res = {"teacher": args.teacher, "student": args.student, "kind": kind, "event_shape": list(student.event_shape),
           "denoiser_error": err, "denoiser_error_seconds": t_err, "heun_steps": args.steps, "samples": {}}
    for name, model in (("teacher", teacher), ("student", student)):
        t0 = time.perf_counter()
        x = heun_sample(model, noise, cond, num_steps=args.steps)
        res["samples"][name] = {"seconds": time.perf_counter() - t0, **_score(kind, x, cond, clf, train_x)}
        torch.save({"x": x, "cond": cond}, out / f"samples_{name}.pt")
        _grid(x, cond, kind, out / f"samples_{name}.png", f"{name}: Heun {args.steps} levels, {Path(args.student).parent.name}")
    if kind == "digits":
        res["samples"]["real_val"] = _score(kind, dm.val_set.x, dm.val_set.cond, clf, train_x)
    else:
        pos = dm.scenes.positions[dm.num_train_images:, 0]
        res["samples"]["real_val"] = _score(kind, dm.scenes.images[dm.num_train_images:], pos, None, None)
    (out / "eval.json").write_text(json.dumps(res, indent=1))
    lines = ["| sigma bucket | teacher error | student excess | ratio |", "|---|---|---|---|"]
    for b, o, e, r in zip(err["bucket"], err["optimal"], err["excess"], err["ratio"]):
        lines.append(f"| {b} | {o:.4g} | {e:.4g} | {r:.3f} |")
    lines += ["", "| samples | " + " | ".join(res["samples"]["teacher"]) + " |",
              "|---|" + "---|" * len(res["samples"]["teacher"])]
    for name, s in res["samples"].items():
        lines.append(f"| {name} | " + " | ".join(f"{s.get(k, float('nan')):.4g}" for k in res["samples"]["teacher"]) + " |")
    (out / "eval.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return res


if __name__ == "__main__":
    main()
