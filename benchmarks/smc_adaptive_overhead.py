"""Overhead of the budget-driven SMC (issue 12): wall time of the adaptivity and time outside the target's evaluations.

Target (`--target`): `gmm`, the 2D GMM product ring8 x a two-component GMM (closed form); `mlp`, a product of two
network energies (`fkdiff.energy` students over `fkdiff.nets.MLP`, width 128 x 4 residual blocks, the toy2d recipe's
student network, initialised with seeds 0 and 1: cost, not accuracy, is measured). N = 2000 particles, 1000
evaluations per particle. The target is wrapped so that every energy / score / energy_and_score call is timed: the fraction of wall
time spent outside those calls is the engine's own overhead (weights, resampling, proposal densities, HMC bookkeeping,
validation). Three runs, timed alternately `--repeats` times after one warm-up each (median wall time):

  fixed     the hand-set run of the issue: 250 levels of the EDM rho-schedule, HMC(1, 3), one population
  planned   `smc.sample(target, N, budget=1000)`: pilot + pilot-placed levels + islands (the default)
  same      the planned run's own kernel, levels count and islands on the fixed rho-schedule with the same total
            evaluations per particle as the planned run used (the pilot's evaluations spent on levels): the cost
            of adaptivity is planned / same at equal evaluations (target <= 1.10)

    python benchmarks/smc_adaptive_overhead.py [--target gmm|mlp] [--repeats 3] [--particles 2000] [--budget 1000]
Writes benchmarks/results/smc_adaptive/overhead.{json,md} (`--target mlp`: overhead_mlp.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from fkdiff import compose, mcmc, smc
from teachers.analytic import GaussianMixture
from teachers.presets import ring8

RESULTS = Path(__file__).resolve().parent / "results" / "smc_adaptive"


class Timed:
    """The target with its energy / score / energy_and_score calls timed (seconds in `self.seconds`)."""

    def __init__(self, inner):
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def _timed(self, name, x, sigma):
        t0 = time.perf_counter()
        out = getattr(self.inner, name)(x, sigma)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out

    def energy(self, x, sigma):
        return self._timed("energy", x, sigma)

    def score(self, x, sigma):
        return self._timed("score", x, sigma)

    def energy_and_score(self, x, sigma):
        return self._timed("energy_and_score", x, sigma)


def gmm_product_2d():
    two = GaussianMixture(torch.tensor([[0.35, 0.35], [-0.35, -0.35]], dtype=torch.float64),
                          0.3**2 * torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone())
    return compose.product(ring8(), two)


def mlp_product_2d():
    from fkdiff.energy import build_student

    students = []
    for seed in (0, 1):
        torch.manual_seed(seed)  # network initialisation only; the sampler takes its own generators
        students.append(build_student((2,), sigma_data=0.5, g="l2", backbone=dict(width=128, num_blocks=4)).eval())
    return compose.product(*students)


TARGETS = {"gmm": gmm_product_2d, "mlp": mlp_product_2d}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), default="gmm")
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--budget", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    target = Timed(TARGETS[args.target]())
    n, b = args.particles, args.budget
    kw = dict(shape=(2,), sigma_max=80.0, sigma_min=0.002)
    plan = smc.sample(target, n, budget=b, generator=torch.Generator().manual_seed(0), **kw).plan
    per_level, levels_same = plan["evaluations_per_level"], int(plan["used_evaluations"] // plan["evaluations_per_level"])
    runs = {
        "fixed": lambda g: smc.sample(target, n, num_levels=b // 4, mcmc=mcmc.HMC(1, 3), generator=g, **kw),
        "planned": lambda g: smc.sample(target, n, budget=b, generator=g, **kw),
        "same": lambda g: smc.sample(target, n, num_levels=levels_same, mcmc=mcmc.HMC(1, 3), generator=g,
                                     population=smc.Islands(int(plan["estimator"][8:-1]))
                                     if plan["estimator"].startswith("islands") else None, **kw),
    }
    times = {k: [] for k in runs}
    inside = {k: [] for k in runs}
    evals = {}
    for rep in range(args.repeats + 1):  # rep 0: warm-up
        for name, fn in runs.items():
            target.seconds = 0.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t0 = time.perf_counter()
                res = fn(torch.Generator().manual_seed(rep))
                wall = time.perf_counter() - t0
            evals[name] = res.plan["used_evaluations"] if getattr(res, "plan", None) else res.nfe
            if rep:
                times[name].append(wall)
                inside[name].append(target.seconds / wall)
    rows = {k: dict(wall_s=statistics.median(times[k]), walls=times[k], evaluations=evals[k],
                    target_fraction=statistics.median(inside[k]),
                    outside_fraction=1.0 - statistics.median(inside[k])) for k in runs}
    ratio = rows["planned"]["wall_s"] / rows["same"]["wall_s"]
    what = {"gmm": "the 2D GMM product", "mlp": "a product of two 2D MLP energies (width 128 x 4 blocks)"}[args.target]
    lines = [f"SMC wall time on {what}, N = {n}, {b} evaluations per particle, median of {args.repeats}",
             "", "| run | evaluations / particle | wall s | time in target evaluations | outside |",
             "|---|---|---|---|---|"]
    for k, r in rows.items():
        lines.append(f"| {k} | {r['evaluations']:.0f} | {r['wall_s']:.2f} | {r['target_fraction']:.0%} | "
                     f"{r['outside_fraction']:.0%} |")
    lines += ["", f"adaptivity: planned / same = {ratio:.2f} (target <= 1.10); plan: {plan['num_levels']} levels, "
              f"{per_level} evaluations per level, {plan['mcmc']}, {plan['estimator']}, "
              + (f"pilot {plan['pilot']['evaluations_per_particle']:.1f} evaluations per particle" if plan.get("pilot")
               else "no pilot")]
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "overhead" if args.target == "gmm" else f"overhead_{args.target}"
    (args.out / f"{stem}.json").write_text(json.dumps(dict(config=vars(args) | {"out": str(args.out)}, rows=rows,
                                                            ratio=ratio, plan={k: v for k, v in plan.items()
                                                                               if k != "pilot"}), indent=1))
    (args.out / f"{stem}.md").write_text(table)
    return rows, ratio


if __name__ == "__main__":
    main()
