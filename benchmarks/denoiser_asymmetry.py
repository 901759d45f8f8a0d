"""Benchmark: the asymmetry of the denoiser's Jacobian across sigma (Thornton et al. 2025, fig. 4), teacher vs student.

A teacher trained by denoising score matching is an unconstrained vector field: nothing makes its Jacobian
J = dD(x, sigma)/dx symmetric, i.e. its score (D - x) / sigma^2 a gradient. A distilled energy student's denoiser is
x - sigma^2 grad E, whose Jacobian I - sigma^2 Hess E is symmetric by construction: there the estimate is float
round-off, a check of the estimator. Per sigma of a log grid, on held-out examples of the recipe's data (a fixed
subset of the datamodule's validation set, noised once per sigma, with their conditions),
`fkdiff.distillation.denoiser_asymmetry_by_sigma` estimates (Hutchinson, Gaussian probes, one vjp + one double-vjp
jvp per probe)
    rel = |J - J^T|_F / |J|_F            (pooled over rows: sqrt(sum |J - J^T|_F^2 / sum |J|_F^2)), with a delta-method
                                          standard error over the rows;
    |J_s - J_s^T|_F^2 / dim               of the score's Jacobian J_s = (J - I) / sigma^2 (what fig. 4 plots).
Writes <out>/<recipe>.json and <recipe>.png.

    python benchmarks/denoiser_asymmetry.py --recipe digits_small --teacher T.pt --student distilled=S.pt
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fkdiff.distillation import denoiser_asymmetry_by_sigma, split_batch
from fkdiff.seeding import seeded_generator

RESULTS = Path(__file__).resolve().parent / "results" / "denoiser_asymmetry"


def held_out(recipe: str, seed: int, rows: int):
    """`rows` validation examples (a fixed random subset) of the recipe's datamodule, built as the entry points do."""
    from fkdiff.recipes import compose
    from fkdiff.training import build_datamodule_from_config

    cfg = compose([f"recipe={recipe}", f"seed={seed}", "logger=none"])
    dm = build_datamodule_from_config(cfg.data)
    dm.setup("fit")
    n = len(dm.val_set)
    idx = torch.randperm(n, generator=seeded_generator(seed, 0, 0, "asym-rows"))[:rows].sort().values
    return split_batch(dm.val_set.__getitems__(idx.tolist()))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True, help="the data: digits_small, shapes_small, ...")
    ap.add_argument("--teacher", required=True, help="the DSM teacher's teacher.pt")
    ap.add_argument("--student", action="append", default=[], metavar="NAME=PATH",
                    help="energy students (student.pt), repeatable")
    ap.add_argument("--sigmas", type=float, nargs="+", default=None,
                    help="sigma grid (default: 13 log-spaced from 0.002 to 80)")
    ap.add_argument("--rows", type=int, default=128, help="held-out examples per sigma")
    ap.add_argument("--probes", type=int, default=2, help="Hutchinson probes per example")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from fkdiff import load_energy
    from teachers import load_teacher

    sigmas = args.sigmas or [float(s) for s in torch.logspace(math.log10(0.002), math.log10(80.0), 13)]
    x0, cond = held_out(args.recipe, args.seed, args.rows)
    models = {"teacher (DSM)": load_teacher(args.teacher).requires_grad_(False).eval()}
    for spec in args.student:
        name, _, path = spec.partition("=")
        if not path:
            raise ValueError(f"--student takes NAME=PATH, got {spec!r}")
        models[f"student: {name}"] = load_energy(path).requires_grad_(False)
    dim = x0[0].numel()
    result = {"recipe": args.recipe, "setting": vars(args), "sigmas": sigmas, "rows": int(x0.shape[0]),
              "dim": dim, "models": {}}
    for name, model in models.items():
        t0 = time.time()
        res = denoiser_asymmetry_by_sigma(model, x0, sigmas, seeded_generator(args.seed, 0, 0, "asym-probes"),
                                          cond=cond, num_probes=args.probes, max_batch=args.max_batch)
        res["score_asym_per_dim"] = [a / s**4 / dim for a, s in zip(res["asym_fro2"], sigmas)]
        res["seconds"] = time.time() - t0
        result["models"][name] = res
        print(f"{name} ({res['seconds']:.0f} s)")
        for s, r, se in zip(sigmas, res["rel"], res["rel_se"]):
            print(f"  sigma {s:8.4f}  |J - J^T|_F / |J|_F = {r:.3e} +- {se:.1e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / args.recipe
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    _plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")
    return result


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, m in r["models"].items():
        ax[0].errorbar(r["sigmas"], m["rel"], yerr=m["rel_se"], marker="o", ms=3, capsize=2, label=name)
        ax[1].plot(r["sigmas"], m["score_asym_per_dim"], marker="o", ms=3, label=name)
    ax[0].set_title("denoiser Jacobian: |J - J^T|_F / |J|_F")
    ax[1].set_title("score Jacobian J_s = (J - I)/sigma^2: |J_s - J_s^T|_F^2 / dim")
    for a in ax:
        a.set_xscale("log"), a.set_yscale("log"), a.set_xlabel("sigma"), a.legend(fontsize=8)
    fig.suptitle(f"{r['recipe']}: Jacobian asymmetry on {r['rows']} held-out examples "
                 f"({r['setting']['probes']} Hutchinson probes each)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
