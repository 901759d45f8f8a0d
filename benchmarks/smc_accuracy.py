"""Accuracy of SMC against the baselines on 2D compositions with exact answers (DESIGN.md section 5).

Targets (analytic teachers, energies normalised at every sigma), truth at sigma_min on a fine grid
(log Z by quadrature; exact samples = grid cells drawn by mass, uniformly jittered inside the cell):

  product_ring_strip  ring8 x strip (Du et al. appendix G product: GMM x uniform box teacher)
  product_gmm         ring8 x a two-component GMM (also closed form: teachers.gmm_product, used as a check)
  mixture             columns_left OR columns_right, weights 0.3 / 0.7 (Du et al. appendix G mixture)
  negation            ring8 NOT a Gaussian at (0.5, 0) (E_b - 0.5 E_o, Du et al. eq. 10)
  low_temperature     a 3-mode GMM at beta = 3 (target exp(-beta E(x, sigma)), exact SMC-sampler weights)
  bounds              ring8 restricted to the box [-0.6, 0.6] x [0, 0.6]: SMC uses the hard `fkdiff.smc.Box`
                      potential; the baselines (which take no potentials) the product with a Box teacher
  p4_minor            p^4 of a 2-mode GMM whose narrow minor mode takes 94% of the mass of p^4
  product8d/16d       product of two 4-component isotropic GMMs in 8-D / 16-D (means 0.6 N(0, I), stds 0.3 / 0.35,
                      drawn once from a fixed seed); truth in closed form (teachers.analytic.gmm_product: log Z and
                      exact samples of the 16-component product); modes = the product's components, MMD bandwidths
                      scaled by sqrt(d / 2)

Methods at a budget B of target evaluations per particle (energy+score):
  reverse    naive reverse diffusion with the composed score (B levels)             fkdiff.samplers.reverse_diffusion
  annealed   annealed HMC, 1 HMC step x 3 leapfrog per level (B/4 levels)           fkdiff.samplers.annealed_mcmc
  smc        SMC with the reverse-diffusion proposal, no MCMC (B levels)             fkdiff.smc.sample
  smc_hmc    SMC + 1 HMC step x 3 leapfrog per level (B/4 levels)                   fkdiff.smc.sample(mcmc=HMC())
  smc_hmc1   SMC + 1 HMC step x 1 leapfrog per level (B/2 levels): the same budget spent on more levels
             (at 1000 evaluations the log Z error of SMC+HMC is variance of the weights, which falls like 1/levels)
  budget     `fkdiff.smc.sample(target, N, budget=B)` and nothing else: the budget-driven default
             (fkdiff.smc.adaptive: pilot-placed levels, HMC effort, twisted low temperature, island error bars)
  budget_lw  the same with all N particles in one population (Lee-Whiteley error bar)
  budget_euler  the budget default with proposal_variance="euler"

Metrics against an independent exact sample of the same size N:
  tv    total variation between the mode-occupancy histograms (each point assigned to the nearest mode centre;
        weighted by the SMC weights)
  mmd   weighted MMD (V-statistic) with a sum of RBF kernels, bandwidths 0.02, 0.05, 0.1, 0.2, 0.5
  lz    |log Z_hat - log Z| (SMC methods only)
The noise floor is the same tv / mmd between two independent exact samples of size N.
Every (target, B, method) runs for each seed in --seeds (independent exact samples and SMC noise per seed); a cell
shows the medians over seeds of tv / mmd / the mmd-to-floor ratio and, for the SMC methods, the median |log Z error|
with its [min, max] over seeds (the JSON keeps every seed's row, with the signed error and the run's own standard
error, so bias (a consistent sign) can be told from variance).

    python benchmarks/smc_accuracy.py            # 2000 particles, B = 100 / 300 / 1000, seeds 0 1 2, all targets
    python benchmarks/smc_accuracy.py --quick    # 1000 particles, B = 100 / 300
    python benchmarks/smc_accuracy.py --budgets 1000 --methods smc_hmc smc_hmc1 --seeds 0 1 2 3 4
Writes benchmarks/results/smc_accuracy.{json,md} and prints the markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch

from fkdiff import compose, mcmc, samplers, smc
from fkdiff.targets import energy
from teachers.analytic import Box as BoxTeacher
from teachers.analytic import GaussianMixture, gmm_product
from teachers.presets import columns_left, columns_right, ring8, strip

SIGMA_MAX, SIGMA_MIN = 80.0, 0.002
BANDWIDTHS = (0.02, 0.05, 0.1, 0.2, 0.5)
RESULTS = Path(__file__).resolve().parent / "results"


def iso_gmm(means, stds, weights=None) -> GaussianMixture:
    means = torch.tensor(means, dtype=torch.float64)
    stds = torch.as_tensor(stds, dtype=torch.float64).expand(means.shape[0])
    return GaussianMixture(means, stds[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64), weights)


def ring_centres():
    return ring8().means


def make_targets() -> dict:
    """name -> dict(target, potentials (SMC only), baseline_target, centres, box (grid indicator), init_std)."""
    r8 = ring8()
    two = iso_gmm([[0.35, 0.35], [-0.35, -0.35]], [0.3, 0.2])
    three = iso_gmm([[-0.5, 0.0], [0.5, 0.0], [0.0, 0.6]], [0.08, 0.12, 0.1], [0.5, 0.3, 0.2])
    # p^4 of a wide major mode (weight 0.8, std 0.2) and a narrow minor one (0.2, std 0.05): the minor mode holds
    # 0.2^4 0.05^-6 / (0.2^4 0.05^-6 + 0.8^4 0.2^-6) = 94% of p^4 (the integral of N(0, s^2 I)^4 is prop. to s^-6)
    minor = iso_gmm([[-0.4, 0.0], [0.4, 0.2]], [0.2, 0.05], [0.8, 0.2])
    cl, cr = columns_left(), columns_right()
    low, high = [-0.6, 0.0], [0.6, 0.6]
    t = {
        "product_ring_strip": dict(target=compose.product(r8, strip()), centres=r8.means),
        "product_gmm": dict(target=compose.product(r8, two), centres=r8.means, closed_form=gmm_product(r8, two)),
        "mixture": dict(target=compose.mixture(cl, cr, weights=[0.3, 0.7]), centres=torch.cat([cl.means, cr.means])),
        "negation": dict(target=compose.negation(r8, iso_gmm([[0.5, 0.0]], [0.25]), alpha=0.5), centres=r8.means,
                         init_std=2 * SIGMA_MAX),
        "low_temperature": dict(target=compose.tempered(three, 3.0), centres=three.means),
        "p4_minor": dict(target=compose.tempered(minor, 4.0), centres=minor.means),
        "bounds": dict(target=r8, potentials=[smc.Box(low, high)], baseline_target=compose.product(r8, BoxTeacher(low, high)),
                       centres=r8.means, box=(torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64))),
    }
    g = torch.Generator().manual_seed(1234)
    for d in (8, 16):
        a = _iso_nd(0.6 * torch.randn(4, d, generator=g, dtype=torch.float64), 0.3)
        b = _iso_nd(0.6 * torch.randn(4, d, generator=g, dtype=torch.float64), 0.35)
        prod, log_z = gmm_product(a, b, SIGMA_MIN)
        t[f"product{d}d"] = dict(target=compose.product(a, b), centres=prod.means, dim=d,
                                 truth=ClosedFormTruth(prod, log_z))
    return t


def _iso_nd(means, std) -> GaussianMixture:
    d = means.shape[1]
    return GaussianMixture(means, std**2 * torch.eye(d, dtype=torch.float64).expand(means.shape[0], d, d).clone())


class ClosedFormTruth:
    """A closed-form product of GMMs (teachers.analytic.gmm_product): log Z and exact samples."""

    def __init__(self, gmm: GaussianMixture, log_z: float):
        self.gmm, self.log_Z, self.edge_mass = gmm, float(log_z), 0.0

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.gmm.sample(n, generator).double()


class GridTruth:
    """exp(-E(x, sigma_min)) (times a box indicator) on an M x M grid over [-L, L]^2: log Z and exact samples."""

    def __init__(self, target, box=None, half_width: float = 1.3, cells: int = 1300):
        h = 2 * half_width / cells
        c = -half_width + h * (torch.arange(cells, dtype=torch.float64) + 0.5)
        xx, yy = torch.meshgrid(c, c, indexing="ij")
        pts = torch.stack([xx.flatten(), yy.flatten()], 1)
        logp = -energy(target, pts, SIGMA_MIN, max_batch=200_000)
        if box is not None:
            inside = ((pts >= box[0]) & (pts <= box[1])).all(1)
            logp = torch.where(inside, logp, torch.full_like(logp, -math.inf))
        self.pts, self.h = pts, h
        self.log_Z = float(torch.logsumexp(logp, 0)) + 2 * math.log(h)
        self.probs = torch.softmax(logp, 0)
        edge = (pts.abs() > half_width - 5 * h).any(1)
        self.edge_mass = float(self.probs[edge].sum())  # must be ~0: the grid covers the law

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        # torch.multinomial caps the number of categories at 2^24; fine for 1300^2
        idx = torch.multinomial(self.probs, n, replacement=True, generator=generator)
        jitter = (torch.rand(n, 2, generator=generator, dtype=torch.float64) - 0.5) * self.h
        return self.pts[idx] + jitter


def mode_tv(x, w, y, centres) -> float:
    """TV between the weighted nearest-centre histograms of x (weights w) and y (equal weights)."""
    k = centres.shape[0]
    hx = torch.zeros(k, dtype=torch.float64).index_add_(0, torch.cdist(x, centres).argmin(1), w)
    hy = torch.bincount(torch.cdist(y, centres).argmin(1), minlength=k).double() / y.shape[0]
    return 0.5 * float((hx / hx.sum() - hy).abs().sum())


def mmd(x, w, y) -> float:
    """Weighted V-statistic MMD with a sum of RBF kernels (bandwidths BANDWIDTHS, times sqrt(d / 2) in d > 2)."""
    v = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64)
    w = w / w.sum()
    scale = math.sqrt(max(x.shape[1], 2) / 2)

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * (bw * scale) ** 2)) for bw in BANDWIDTHS)

    m2 = w @ k(x, x) @ w + v @ k(y, y) @ v - 2 * w @ k(x, y) @ v
    return math.sqrt(max(float(m2), 0.0))


def run_method(method, spec, n, budget, gen):
    kw = dict(shape=(spec.get("dim", 2),), sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, generator=gen)
    base = spec.get("baseline_target", spec["target"])
    hmc_levels = max(budget // 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if method == "reverse":
            return samplers.reverse_diffusion(base, n, num_levels=budget, **kw)
        if method == "annealed":
            return samplers.annealed_mcmc(base, n, num_levels=hmc_levels, mcmc=mcmc.HMC(), **kw)
        smc_kw = dict(potentials=spec.get("potentials", ()), init_std=spec.get("init_std"))
        if method == "smc":
            return smc.sample(spec["target"], n, num_levels=budget, **smc_kw, **kw)
        if method == "smc_hmc":
            return smc.sample(spec["target"], n, num_levels=hmc_levels, mcmc=mcmc.HMC(), **smc_kw, **kw)
        if method == "smc_hmc1":
            return smc.sample(spec["target"], n, num_levels=max(budget // 2, 2), mcmc=mcmc.HMC(1, 1), **smc_kw, **kw)
        if method == "budget":  # the budget-driven default: nothing but the budget
            return smc.sample(spec["target"], n, budget=budget, **smc_kw, **kw)
        if method == "budget_euler":  # the budget default with the Euler proposal variance (issue 12: small budgets)
            return smc.sample(spec["target"], n, budget=budget, proposal_variance="euler", **smc_kw, **kw)
        if method == "budget_lw":  # the same with all N particles in one population (Lee-Whiteley error bar)
            return smc.sample(spec["target"], n, budget=budget, population=smc.core.LOCAL, **smc_kw, **kw)
    raise ValueError(method)


METHODS = ("reverse", "annealed", "smc", "smc_hmc", "smc_hmc1", "budget", "budget_lw", "budget_euler")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--particles", type=int, default=2000)
    p.add_argument("--budgets", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--targets", nargs="+", default=None, help="subset of target names")
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="1000 particles, budgets 100 300")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="smc_accuracy", help="file stem of the results")
    args = p.parse_args(argv)
    if args.quick:
        args.particles, args.budgets = 1000, [100, 300]
    torch.set_num_threads(1)  # one core per experiment on a shared machine (two threads thrash under load)
    targets = make_targets()
    names = args.targets or list(targets)
    n = args.particles
    rows, floors = [], {}
    for name in names:
        spec = targets[name]
        truth = spec.get("truth") or GridTruth(spec["target"], spec.get("box"))
        refs, fl = {}, []
        for seed in args.seeds:
            g = torch.Generator().manual_seed(seed)
            ref, ref2 = truth.sample(n, g), truth.sample(n, g)
            eq = torch.full((n,), 1.0 / n, dtype=torch.float64)
            refs[seed] = ref
            fl.append(dict(tv=mode_tv(ref2, eq, ref, spec["centres"]), mmd=mmd(ref2, eq, ref)))
        floors[name] = dict(tv=_median([f["tv"] for f in fl]), mmd=_median([f["mmd"] for f in fl]), per_seed=fl,
                            log_Z=truth.log_Z, grid_edge_mass=truth.edge_mass)
        if "closed_form" in spec:
            floors[name]["log_Z_closed_form"] = spec["closed_form"][1]
        print(f"[{name}] log Z = {truth.log_Z:.4f}  floor tv = {floors[name]['tv']:.4f}  mmd = {floors[name]['mmd']:.4f}",
              flush=True)
        for budget in args.budgets:
            for method in args.methods:
                for i, seed in enumerate(args.seeds):
                    ref = refs[seed]
                    gm = torch.Generator().manual_seed(seed * 1000 + budget)
                    t0 = time.perf_counter()
                    try:
                        res = run_method(method, spec, n, budget, gm)
                    except ValueError as e:  # e.g. a budget below the plan's minimum: recorded, not a crash
                        rows.append(dict(target=name, method=method, budget=budget, seed=seed, error=str(e)))
                        print(f"  B={budget:5d} {method:9s} seed {seed} error: {e}", flush=True)
                        continue
                    warned = list(getattr(res, "warnings", []))  # the run's degeneracy messages
                    wall = time.perf_counter() - t0
                    w = res.log_weights.exp()
                    alive = w > 0
                    x = res.samples[alive].double()
                    ok = res.log_Z is not None  # None: the baselines estimate no log Z
                    plan = getattr(res, "plan", None)
                    covered = None
                    if ok and res.log_Z_se is not None:
                        lo, hi = res.log_Z_ci(0.95)
                        covered = bool(lo <= truth.log_Z <= hi)
                    row = dict(target=name, method=method, budget=budget, seed=seed,
                               nfe=plan["used_evaluations"] if plan else res.nfe, wall_time=wall, covered=covered,
                               num_levels=len(res.sigmas) if res.sigmas is not None else None, warnings=warned,
                               island_disagreement=plan.get("island_disagreement") if plan else None,
                               min_cess=float(res.cess.min()) if res.levels.get("cess") is not None else None,
                               tv=mode_tv(x, w[alive], ref, spec["centres"]), mmd=mmd(x, w[alive], ref),
                               mmd_ratio=mmd(x, w[alive], ref) / max(fl[i]["mmd"], 1e-12), log_Z=res.log_Z,
                               log_Z_err=abs(res.log_Z - truth.log_Z) if ok else None,
                               log_Z_signed_err=res.log_Z - truth.log_Z if ok else None,
                               log_Z_se=getattr(res, "log_Z_se", None) if ok else None,
                               min_ess=float(res.ess.min()), final_ess=res.final_ess,
                               mean_acceptance=None if res.acceptance is None else float(res.acceptance.nanmean()),
                               min_acceptance=None if res.acceptance is None else float(res.acceptance.min()))
                    rows.append(row)
                    lz = "" if row["log_Z_err"] is None else f" dlogZ = {row['log_Z_signed_err']:+.3f}"
                    print(f"  B={budget:5d} {method:9s} seed {seed} tv = {row['tv']:.4f} mmd = {row['mmd']:.4f}{lz} "
                          f"(nfe {res.nfe:.0f}, {wall:.1f}s)", flush=True)
        table = write(rows, floors, args)  # after every target: a stopped run keeps what it measured
    print(table)
    return rows, floors


def write(rows, floors, args) -> str:
    table = markdown(rows, floors, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(dict(config=vars(args) | {"out": str(args.out)},
                                                                floors=floors, rows=rows), indent=1))
    (args.out / f"{args.name}.md").write_text(table)
    return table


def _median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def markdown(rows, floors, args) -> str:
    seeds = " ".join(str(s) for s in args.seeds)
    lines = [f"SMC accuracy, N = {args.particles} particles, seeds {seeds}; medians over seeds of tv / mmd (x noise floor)"
             " / |log Z error| [min, max over seeds]; seeds with both tv and mmd within 2x the median noise floor; "
             "seeds whose reported 95% log Z interval covers the exact value", "",
             "| target | B | floor tv / mmd | " + " | ".join(args.methods) + " |",
             "|---|---|---|" + "---|" * len(args.methods)]
    for name in floors:
        f = floors[name]
        for budget in args.budgets:
            cells = []
            for m in args.methods:
                rs = [r for r in rows if r["target"] == name and r["method"] == m and r["budget"] == budget]
                if rs and all("error" in r for r in rs):
                    cells.append("refused (budget below the plan's minimum)")
                    continue
                rs = [r for r in rs if "error" not in r]
                if not rs:
                    cells.append("")
                    continue
                c = (f"{_median([r['tv'] for r in rs]):.3f} / {_median([r['mmd'] for r in rs]):.3f} "
                     f"({_median([r['mmd_ratio'] for r in rs]):.1f}x)")
                lz = [r["log_Z_err"] for r in rs if r["log_Z_err"] is not None]
                if lz:
                    c += f" / {_median(lz):.3f}" + (f" [{min(lz):.3f}, {max(lz):.3f}]" if len(lz) > 1 else "")
                good = sum(r["tv"] <= 2 * f["tv"] and r["mmd"] <= 2 * f["mmd"] for r in rs)
                c += f"; {good}/{len(rs)} in 2x floor"
                cov = [r["covered"] for r in rs if r.get("covered") is not None]
                if cov:
                    c += f"; CI covers {sum(cov)}/{len(cov)}"
                cells.append(c)
            lines.append(f"| {name} | {budget} | {f['tv']:.3f} / {f['mmd']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
