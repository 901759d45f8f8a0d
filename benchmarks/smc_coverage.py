"""Coverage of the reported 95% log Z interval on closed-form targets (issue 12): over many seeds, the fraction of
runs whose exact log Z lies inside `result.log_Z_ci(0.95)`, for two variance estimators of the same sampler

  islands  the budget-driven default, `fkdiff.smc.sample(target, N, budget=B)`: N particles as R = 4 independent
           islands (fkdiff.smc.Islands; --islands R for another R), variance from the islands' spread, Student t
           interval with R - 1 dof; each row keeps the islands' own log Z_r (island_log_Z)
  lw       the same plan with all N particles in one population: the Lee & Whiteley (2018) genealogy estimator,
           normal interval

Targets (exact log Z from teachers.analytic.gmm_product):
  gauss2d    product of two correlated 2-D Gaussians
  gmm2d      ring8 x a two-component GMM (2-D)
  gmm8d      product of two 4-component isotropic GMMs in 8-D (means drawn once from a fixed seed)
  temp2d     low temperature p^2, `compose.tempered(g, 2)`, of a 3-component 2-D GMM with modes of std 0.08 / 0.3 /
             0.15 and weights 0.2 / 0.5 / 0.3 (`widths3`): at sigma_min the narrow minor mode holds most of p^2's
             mass; exact log Z = log ∫ p_sigma_min^2 = log sum_ij w_i w_j N(mu_i; mu_j, S_i + S_j)
             (gmm_product(g, g, sigma_min); checked by quadrature in tests/test_analytic.py)

    python benchmarks/smc_coverage.py                       # N = 1000, B = 300, 50 seeds, all targets
    python benchmarks/smc_coverage.py --seeds 20 --targets gauss2d
    python benchmarks/smc_coverage.py --particles 1024 --seeds 50 --first-seed 50 --targets gauss2d gmm2d \
        --estimators islands --out benchmarks/results/smc_adaptive --name coverage_islands4
Writes benchmarks/results/<name>.{json,md} (default smc_coverage); also reports the spread of log Z over seeds (sd) against the median
reported standard error, and |log Z error|.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

from fkdiff import compose, smc
from teachers.analytic import GaussianMixture, gmm_product
from teachers.presets import gaussian, ring8

SIGMA_MIN = 0.002
RESULTS = Path(__file__).resolve().parent / "results"


def iso(means, std, weights=None) -> GaussianMixture:
    means = torch.as_tensor(means, dtype=torch.float64)
    d = means.shape[1]
    return GaussianMixture(means, std**2 * torch.eye(d, dtype=torch.float64).expand(means.shape[0], d, d).clone(),
                           weights)


def widths3() -> GaussianMixture:
    """3 isotropic 2-D Gaussians of different widths (std 0.08, 0.3, 0.15; weights 0.2, 0.5, 0.3)."""
    std = torch.tensor([0.08, 0.3, 0.15], dtype=torch.float64)
    return GaussianMixture(torch.tensor([[-0.6, 0.0], [0.5, 0.3], [0.1, -0.6]], dtype=torch.float64),
                           std[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64), [0.2, 0.5, 0.3])


def make_targets() -> dict:
    g = torch.Generator().manual_seed(1234)
    a8 = iso(0.6 * torch.randn(4, 8, generator=g, dtype=torch.float64), 0.3)
    b8 = iso(0.6 * torch.randn(4, 8, generator=g, dtype=torch.float64), 0.35)
    pairs = {
        "gauss2d": (gaussian([1.0, 0.0], [[0.5, 0.2], [0.2, 0.3]]), gaussian([0.0, 1.0], 0.4)),
        "gmm2d": (ring8(), iso([[0.35, 0.35], [-0.35, -0.35]], 0.3)),
        "gmm8d": (a8, b8),
    }
    out = {k: (compose.product(a, b), a.dim, gmm_product(a, b, SIGMA_MIN)[1]) for k, (a, b) in pairs.items()}
    g = widths3()  # p^2 = p p: the same closed form with both factors g
    out["temp2d"] = (compose.tempered(g, 2.0), 2, gmm_product(g, g, SIGMA_MIN)[1])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=1000)
    p.add_argument("--budget", type=int, default=300)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + seeds - 1")
    p.add_argument("--islands", type=int, default=None, help="islands R for the islands estimator (default: the plan's)")
    p.add_argument("--targets", nargs="+", default=None, help="default: all of them")
    p.add_argument("--estimators", nargs="+", default=["islands", "lw"])
    p.add_argument("--proposal-variance", default=None, choices=["ancestral", "euler"],
                   help="the proposal variance passed to smc.sample (default: the plan's)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="smc_coverage", help="file stem of the results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    targets = make_targets()
    rows = []
    for name in args.targets or list(targets):
        target, dim, log_z = targets[name]
        for est in args.estimators:
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                pop = (smc.Islands(args.islands) if args.islands else None) if est == "islands" else smc.core.LOCAL
                kw = {"proposal_variance": args.proposal_variance} if args.proposal_variance else {}
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = smc.sample(target, args.particles, shape=(dim,), budget=args.budget, population=pop,
                                     generator=torch.Generator().manual_seed(seed), **kw)
                lo, hi = res.log_Z_ci(0.95)
                isl = None
                if est == "islands":  # each island's own log Z_r = log Z_hat + log(R p_r), p_r its final weight
                    r = int(res.plan["estimator"].split("(")[1].rstrip(")"))
                    isl = (res.log_Z + math.log(r) + torch.logsumexp(res.log_weights.view(r, -1), 1)).tolist()
                rows.append(dict(target=name, estimator=est, seed=seed, log_Z=res.log_Z, exact=log_z,
                                 err=res.log_Z - log_z, se=res.log_Z_se, lo=lo, hi=hi, covered=lo <= log_z <= hi,
                                 island_log_Z=isl, used=res.plan["used_evaluations"],
                                 num_levels=res.plan["num_levels"], formulation=res.plan.get("formulation"),
                                 wall=time.perf_counter() - t0))
            rs = [r for r in rows if r["target"] == name and r["estimator"] == est]
            print(f"[{name} {est}] covers {sum(r['covered'] for r in rs)}/{len(rs)}", flush=True)
    table = markdown(rows, args)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(config=vars(args) | {"out": str(args.out)},
                                                                rows=rows), indent=1))
    (args.out / f"{args.name}.md").write_text(table)
    return rows


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def markdown(rows, args) -> str:
    lines = [f"Coverage of the reported 95% log Z interval, N = {args.particles}, budget = {args.budget} evaluations "
             f"per particle, {args.seeds} seeds", "",
             "| target | estimator | coverage | sd of log Z over seeds | median reported se | sd / se | "
             "median abs(log Z error) | mean signed error |", "|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["target"] for r in rows):
        for est in dict.fromkeys(r["estimator"] for r in rows):
            rs = [r for r in rows if r["target"] == name and r["estimator"] == est]
            if not rs:
                continue
            errs = torch.tensor([r["err"] for r in rs], dtype=torch.float64)
            sd = float(errs.std()) if len(rs) > 1 else math.nan
            se = _median([r["se"] for r in rs])
            cov = sum(r["covered"] for r in rs)
            lines.append(f"| {name} | {est} | {cov}/{len(rs)} = {cov / len(rs):.0%} | {sd:.4f} | {se:.4f} | "
                         f"{sd / se if se else math.nan:.2f} | {_median([abs(r['err']) for r in rs]):.4f} | "
                         f"{float(errs.mean()):+.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
