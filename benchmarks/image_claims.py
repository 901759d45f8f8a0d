"""The papers' image claims at a CPU scale, on a class-conditional digits energy student (recipe digits_small).

Three experiments, one sub-command each, each writing `<out>/results.json`, `<out>/results.md` and `<out>/grid.png`
(16 equally weighted samples per row, titled with the row, log Z and min ESS/N) under `benchmarks/results/image_<name>`:

    compose      Du et al. 2023 eq. 13, log p(x|y1,y2) = log p(x) + sum_i (log p(x|y_i) - log p(x)), and the plain
                 product p(x|y1) p(x|y2): SMC (sampler-mode weights) without and with HMC rejuvenation against the
                 naive summed-score reverse diffusion run with as many levels as SMC+HMC made target evaluations
                 (equal evaluations); judged by the digits classifier (fraction read as y1 / y2, mean p(y1) p(y2)).
    temperature  p(x|c)^beta (Thornton et al. 2025 fig. 3): the twisted `LowTemperature(beta)` potential on the
                 student's own reverse diffusion against the plain student (beta = 1, reverse diffusion); classifier
                 confidence / entropy and the classifier-feature Frechet distance (not FID) to the real class-c images.
    bound        a pixel-space constraint: mean intensity of the left `--cols` columns <= `--threshold` (a Polytope
                 half-space, hard at the last level) for the unconditional student: SMC with the potential against
                 reverse diffusion + projection onto the half-space ("clip") and reverse diffusion + rejection, both at
                 the evaluations SMC used; violations and fidelity (Frechet distance to the real digits that
                 satisfy it).

SMC stops at `--sigma-min` (default 0.05, then one denoising step): the distillation report of issue 9 measures the
students' relative energy levels as right from sigma 0.05 up and wrong below 0.01 (not yet fixed for the students
used here), so the weights are trusted only down to 0.05. Everything runs on the CPU with one thread, chunked
(`max_batch`); peak RSS is measured per row. Commands (the defaults are the committed results):

    python benchmarks/image_claims.py compose --student S --classifier C
    python benchmarks/image_claims.py temperature --student S --classifier C
    python benchmarks/image_claims.py bound --student S --classifier C
    python benchmarks/image_claims.py compose --quick --student S ...     # seconds: N=8, 4 levels (the test suite)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_smc_sizing import PeakRSS, bind, matched_init_std  # noqa: E402

from fkdiff import compose, load_energy, mcmc, samplers, smc  # noqa: E402
from fkdiff.smc import SMCDegeneracyWarning, SMCError  # noqa: E402

EXPERIMENTS = ("compose", "temperature", "bound")


def _kernel(name: str):
    if name == "none":
        return None
    kind, steps = name[:-1], int(name[-1])
    if kind == "hmc":
        return mcmc.HMC(num_steps=steps, num_leapfrog=3)
    if kind == "mala":
        return mcmc.MALA(num_steps=steps)
    raise ValueError(f"unknown kernel {name!r}: none | hmc<k> | mala<k>")


def run_row(label: str, fn: Callable[[torch.Generator], Any], seed: int) -> tuple[dict, torch.Tensor, Any]:
    """Run one sampler `fn(generator) -> SMCResult`; (row of diagnostics, equally weighted samples, result)."""
    gen = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings(record=True), PeakRSS() as mem:
        warnings.simplefilter("always", SMCDegeneracyWarning)
        t0 = time.perf_counter()
        try:
            res = fn(gen)
        except SMCError as e:  # e.g. every particle violates a hard constraint: a result, reported as such
            print(f"  {label}: failed: {e}", flush=True)
            return ({"row": label, "seed": seed, "error": str(e), "wall_s": time.perf_counter() - t0,
                     "peak_rss_mib": mem.peak}, None, None)
        wall = time.perf_counter() - t0
    x = res.resample(gen) if res.log_Z is not None else res.samples
    n = res.num_particles
    row = {"row": label, "seed": seed, "num_particles": n, "levels": len(res.levels["ess"]),
           "nfe": res.nfe, "wall_s": wall, "peak_rss_mib": mem.peak, "rss_before_mib": mem.start,
           "log_Z": res.log_Z, "min_ess_frac": None if res.log_Z is None else res.min_ess / n,
           "min_unique_ancestors": None if res.log_Z is None else res.summary().get("min_unique_ancestors"),
           "num_eves": None if res.log_Z is None else res.summary().get("num_eves"),
           "mean_acceptance": res.summary().get("mean_acceptance"), "warnings": list(res.warnings),
           "nan_samples": int((~torch.isfinite(x.flatten(1))).any(1).sum())}
    print(f"  {label}: nfe {row['nfe']:.0f}, {wall:.1f} s, peak RSS {mem.peak:.0f} MiB, "
          f"min ESS/N {row['min_ess_frac']}, log Z {row['log_Z']}", flush=True)
    return row, x.float(), res


def _stats(clf, x: torch.Tensor, reference: torch.Tensor | None) -> dict:
    from fkdiff.metrics import classifier_frechet_distance, classifier_scores

    s = classifier_scores(clf, x)
    out = {"mean_confidence": s.mean_confidence, "mean_entropy": s.mean_entropy,
           "class_counts": torch.bincount(s.pred, minlength=10).tolist(),
           "num_distinct": int(torch.unique(x.flatten(1), dim=0).shape[0]),
           "mean_pairwise_dist": float(torch.pdist(x.flatten(1).double()).mean()) if x.shape[0] > 1 else 0.0}
    if reference is not None and x.shape[0] > 1:
        out["classifier_frechet"] = classifier_frechet_distance(clf, x, reference)
    return out, s


def _real_digits(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from fkdiff.metrics.classifier import _digits_split

    _, _, xva, yva = _digits_split(size, 0)
    return xva.float(), yva.long()


def _save_grid(samples: dict[str, torch.Tensor], rows: list[dict], path: Path, title: str) -> None:
    from fkdiff import plotting

    plt = plotting._pyplot()
    k = len(samples)
    fig, axes = plt.subplots(1, k, figsize=(3.0 * k, 3.6), squeeze=False)
    for ax, (label, x), row in zip(axes[0], samples.items(), rows):
        ax.axis("off")
        if x is None or x.shape[0] == 0:
            ax.set_title(f"{label}\n(no sample: {'failed' if 'error' in row else 'none accepted'})", fontsize=8)
            continue
        img = plotting.image_grid(x[:16])
        ax.imshow(img.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        extra = "" if row.get("log_Z") is None else f"\nlog Z {row['log_Z']:.1f}, min ESS/N {row['min_ess_frac']:.2f}"
        ax.set_title(f"{label}{extra}\nnfe {row['nfe']:.0f}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    plotting.save(fig, path)
    torch.save({k: None if v is None else v[:16] for k, v in samples.items()}, path.with_name("grid_samples.pt"))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _write(out: Path, meta: dict, rows: list[dict], columns: list[str], samples: dict, title: str) -> dict:
    _save_grid(samples, rows, out / "grid.png", title)
    lines = [f"# {title}", "", f"Command: `{meta['command']}`", "",
             f"Machine: {meta['machine']}. {meta['note']}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    result = {"meta": meta, "rows": rows, "grid": str(out / "grid.png")}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def exp_compose(student, clf, args) -> tuple[list, dict, list[str], str]:
    y1, y2 = args.classes
    c1, c2 = bind(student, y1), bind(student, y2)
    targets = {"eq13": compose.conditional(student, [c1, c2]), "product": compose.product(c1, c2)}
    opts = dict(shape=student.event_shape, sigma_max=args.sigma_max, sigma_min=args.sigma_min,
                max_batch=args.max_batch, eval_dtype=torch.float32)
    rows, samples = [], {}
    for name in args.targets:
        t = targets[name]
        # all rows of a target start from the Gaussian closest to it at sigma_max (a product of k models is about
        # N(0, sigma_max^2 / k); from N(0, sigma_max^2) SMC loses most of its ESS at the first level)
        opts["init_std"] = matched_init_std(t, args.sigma_max, student.event_shape,
                                            torch.Generator().manual_seed(10_000 + args.seed), max_batch=args.max_batch,
                                            num=32 if args.quick else 256)
        hmc_nfe = None
        for mc in ("none", args.mcmc):
            lbl = f"{name} SMC" + ("" if mc == "none" else f"+{mc.upper()}")
            row, x, res = run_row(lbl, lambda g, mc=mc: smc.sample(t, args.num_particles, num_levels=args.levels,
                                                                   mcmc=_kernel(mc), generator=g, **opts), args.seed)
            row["init_std"] = opts["init_std"]
            hmc_nfe = res.nfe if res is not None else args.levels * 5
            rows.append(row), samples.setdefault(lbl, x)
        lv = max(2, int(round(hmc_nfe)))  # reverse diffusion: one target evaluation per level
        lbl = f"{name} reverse diffusion"
        row, x, _ = run_row(lbl, lambda g: samplers.reverse_diffusion(t, args.num_particles, num_levels=lv,
                                                                     generator=g, **opts), args.seed)
        row["init_std"] = opts["init_std"]
        rows.append(row), samples.setdefault(lbl, x)
    for row, x in zip(rows, samples.values()):
        if x is None:
            continue
        st, s = _stats(clf, x, None)
        row.update(st, frac_y1=float((s.pred == y1).double().mean()), frac_y2=float((s.pred == y2).double().mean()),
                   mean_p_y1_p_y2=float((s.probs[:, y1] * s.probs[:, y2]).mean()),
                   mean_p_y1_plus_p_y2=float((s.probs[:, y1] + s.probs[:, y2]).mean()))
    cols = ["row", "num_particles", "levels", "nfe", "min_ess_frac", "min_unique_ancestors", "num_eves",
            "mean_acceptance", "log_Z", "frac_y1", "frac_y2", "mean_p_y1_plus_p_y2", "mean_p_y1_p_y2",
            "mean_entropy", "num_distinct", "mean_pairwise_dist", "init_std", "wall_s", "peak_rss_mib"]
    return rows, samples, cols, f"digits student: compositions of classes {y1} and {y2}"


def exp_temperature(student, clf, args) -> tuple[list, dict, list[str], str]:
    c = args.temp_class
    ct = bind(student, c)
    xr, yr = _real_digits(student.event_shape[-1])
    ref = xr[yr == c]
    opts = dict(shape=student.event_shape, sigma_max=args.sigma_max, sigma_min=args.sigma_min,
                max_batch=args.max_batch, eval_dtype=torch.float32)
    rows, samples = [], {}
    row, x, _ = run_row(f"class {c}, beta 1 (reverse diffusion)", lambda g: samplers.reverse_diffusion(
        ct, args.num_particles, num_levels=args.levels, generator=g, **opts), args.seed)
    rows.append(row), samples.setdefault(row["row"], x)
    for beta in args.betas:
        mc = "" if args.mcmc == "none" else f"+{args.mcmc.upper()}"
        lbl = f"class {c}, beta {beta:g} (twisted LowTemperature{mc})"
        row, x, _ = run_row(lbl, lambda g, b=beta: smc.sample(ct, args.num_particles, num_levels=args.levels,
                                                             mode="twisted", potentials=[smc.LowTemperature(b)],
                                                             mcmc=_kernel(args.mcmc), generator=g, **opts), args.seed)
        row["beta"] = beta
        rows.append(row), samples.setdefault(lbl, x)
    for row, x in zip(rows, samples.values()):
        if x is None:
            continue
        st, s = _stats(clf, x, ref)
        row.update(st, frac_class=float((s.pred == c).double().mean()), mean_p_class=float(s.probs[:, c].mean()))
    cols = ["row", "num_particles", "levels", "nfe", "min_ess_frac", "min_unique_ancestors", "num_eves", "log_Z",
            "frac_class", "mean_p_class", "mean_confidence", "mean_entropy", "classifier_frechet", "num_distinct",
            "mean_pairwise_dist", "wall_s", "peak_rss_mib"]
    return rows, samples, cols, f"digits student: p(x|{c})^beta"


def constraint(shape, cols: int, threshold: float) -> smc.Polytope:
    """mean of the left `cols` columns of the image <= threshold, as one half-space a . x <= threshold."""
    a = torch.zeros(shape, dtype=torch.float64)
    a[..., :cols] = 1.0 / (shape[0] * shape[1] * cols)
    return smc.Polytope(a.reshape(-1), torch.tensor([threshold], dtype=torch.float64))


def clip_to_bound(x: torch.Tensor, cols: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipping baseline: pixels clamped to [-1, 1], then a sample whose left `cols` columns are brighter on average
    than `threshold` has them darkened toward the background, x_R <- -1 + s (x_R + 1),
    s = (threshold + 1) / (mean_R + 1)
    (times 1 - 1e-6, so that it lands inside). Returns (samples, `[N]` bool: which were changed)."""
    xd = x.double().clamp(-1, 1)
    region = torch.zeros(x.shape[1:], dtype=torch.bool)
    region[..., :cols] = True
    mean_r = (xd * region).flatten(1).sum(1) / region.sum()
    over = mean_r > threshold
    scale = torch.where(over, (threshold + 1) / (mean_r + 1) * (1 - 1e-6), torch.ones_like(mean_r))
    return torch.where(region, -1 + scale[:, None, None, None] * (xd + 1), xd).to(x.dtype), over


def exp_bound(student, clf, args) -> tuple[list, dict, list[str], str]:
    shape = student.event_shape
    poly = constraint(shape, args.cols, args.threshold)
    xr, _ = _real_digits(shape[-1])
    ok = poly.contains(xr.double())
    ref = xr[ok]
    opts = dict(shape=shape, sigma_max=args.sigma_max, sigma_min=args.sigma_min, max_batch=args.max_batch,
                eval_dtype=torch.float32)
    rows, samples = [], {}
    lbl = "SMC + Polytope" + ("" if args.mcmc == "none" else f"+{args.mcmc.upper()}")
    row, x, res = run_row(lbl, lambda g: smc.sample(student, args.num_particles, num_levels=args.levels,
                                                    potentials=[poly], mcmc=_kernel(args.mcmc), generator=g, **opts),
                          args.seed)
    rows.append(row), samples.setdefault(lbl, x)
    # the target evaluations SMC used, all particles together
    budget = (res.nfe if res is not None else 5 * args.levels) * args.num_particles
    lv = args.levels
    n_rej = max(1, int(budget // lv))
    row, x, _ = run_row("reverse diffusion + rejection", lambda g: samplers.reverse_diffusion(
        student, n_rej, num_levels=lv, generator=g, **opts), args.seed)
    keep = poly.contains(x.double())
    row.update(num_proposed=n_rej, num_accepted=int(keep.sum()))
    rows.append(row), samples.setdefault(row["row"], x[keep])
    row, x, _ = run_row("reverse diffusion + clip", lambda g: samplers.reverse_diffusion(
        student, args.num_particles, num_levels=lv, generator=g, **opts), args.seed)
    xc, clipped = clip_to_bound(x, args.cols, args.threshold)
    row["num_clipped"] = int(clipped.sum())
    rows.append(row), samples.setdefault(row["row"], xc)
    for row, x in zip(rows, samples.values()):
        if x is None:
            continue
        row["violations"] = int((~poly.contains(x.double())).sum()) if x.shape[0] else 0
        row["num_returned"] = int(x.shape[0])
        if x.shape[0] > 1:
            st, _ = _stats(clf, x, ref if ref.shape[0] > 1 else None)
            row.update(st)
    meta_extra = {"real_fraction_satisfying": float(ok.double().mean()), "num_real_satisfying": int(ok.sum())}
    rows[0]["real_fraction_satisfying"] = meta_extra["real_fraction_satisfying"]
    cols = ["row", "error", "num_particles", "num_returned", "levels", "nfe", "min_ess_frac", "min_unique_ancestors",
            "violations", "mean_confidence", "mean_entropy", "classifier_frechet", "num_distinct", "wall_s",
            "peak_rss_mib"]
    return rows, samples, cols, (f"digits student: mean of the left {args.cols} columns <= {args.threshold} "
                                 f"({100 * meta_extra['real_fraction_satisfying']:.0f}% of real digits satisfy it)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=EXPERIMENTS)
    p.add_argument("--student", required=True, help="a class-conditional digits energy student (student.pt)")
    p.add_argument("--classifier", required=True, help="a digits classifier (fkdiff.metrics.save_classifier)")
    p.add_argument("--num-particles", type=int, default=64)
    p.add_argument("--levels", type=int, default=40)
    p.add_argument("--mcmc", default="hmc1", help="rejuvenation: none | hmc<k> (k steps x 3 leapfrog) | mala<k>")
    p.add_argument("--sigma-max", type=float, default=10.0)
    p.add_argument("--sigma-min", type=float, default=0.05)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", nargs=2, type=int, default=[1, 7])
    p.add_argument("--targets", nargs="+", default=["eq13", "product"], choices=["eq13", "product"])
    p.add_argument("--temp-class", type=int, default=3)
    p.add_argument("--betas", nargs="+", type=float, default=[2.0, 4.0])
    p.add_argument("--cols", type=int, default=3)
    p.add_argument("--threshold", type=float, default=-0.8)
    p.add_argument("--out", default=None, help="default benchmarks/results/image_<experiment>")
    p.add_argument("--quick", action="store_true", help="N=8, 4 levels, compose: eq13 only (seconds; the test suite)")
    args = p.parse_args(argv)
    if args.quick:
        args.num_particles, args.levels = 8, 4
        args.targets = args.targets[:1]
    torch.set_num_threads(1)
    out = Path(args.out or f"benchmarks/results/image_{args.experiment}")
    out.mkdir(parents=True, exist_ok=True)
    from fkdiff.metrics import load_classifier

    student, clf = load_energy(args.student), load_classifier(args.classifier)
    print(f"[image_claims] {args.experiment}: N={args.num_particles}, {args.levels} levels, {args.mcmc}", flush=True)
    fn = {"compose": exp_compose, "temperature": exp_temperature, "bound": exp_bound}[args.experiment]
    rows, samples, cols, title = fn(student, clf, args)
    meta = {"command": "python benchmarks/image_claims.py " + " ".join(shlex.quote(a) for a in
                                                                         (argv if argv is not None else sys.argv[1:])),
            "machine": f"{platform.machine()} {os.cpu_count()}-core CPU (shared with other jobs), torch "
                       f"{torch.__version__}, 1 thread",
            "note": f"sigma {args.sigma_max} -> {args.sigma_min} (EDM rho = 7 levels, then one denoising step), "
                    f"max_batch {args.max_batch}, seed {args.seed}; nfe = target evaluations per particle; peak RSS "
                    "of the whole process while the row ran.",
            **{k: v for k, v in vars(args).items() if k not in ("experiment",)}}
    return _write(out, meta, rows, cols, samples, title)


if __name__ == "__main__":
    main()
