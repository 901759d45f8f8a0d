"""Wall-time overhead of SMC (no MCMC) over naive reverse diffusion at equal NFE, same network (DESIGN.md section 5).

Both samplers make one network evaluation per level and particle: reverse diffusion needs the score
(-grad_x E: one forward + one backward of the energy network), SMC needs the energy *and* the score at the new
particles (the same forward + backward) plus its bookkeeping (proposal densities, weights, ESS, resampling).
The network is an untrained `fkdiff.energy` student (`fkdiff.nets.MLP`, width 128, 4 residual blocks, float32),
the DESIGN's small 2D/low-dimensional setting.

Two ways of handing the student to the samplers are timed:
  energy_only  a thin wrapper exposing only `energy`, so both samplers get energy and score from one
               forward + backward (fkdiff.targets' autograd path)
  student      the student as is: fkdiff.targets.energy_and_score uses its fused `energy_and_grad` (one forward +
               one backward). Before that path existed SMC called `energy` and `score` separately, an extra forward
               per level, and measured 1.6-1.8x here; a regression test counts the passes (tests/test_compose.py)

Each configuration is timed `--repeats` times after a warm-up, the two samplers alternating; the median is reported.
Target ratio <= 1.10.

    python benchmarks/smc_overhead.py [--quick]
Writes benchmarks/results/smc_overhead.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from fkdiff import samplers, smc
from fkdiff.energy import build_student

RESULTS = Path(__file__).resolve().parent / "results"


class EnergyOnly:
    """Expose only the student's energy: score by autograd in fkdiff.targets (one forward + backward)."""

    def __init__(self, student):
        self.student = student

    def energy(self, x, sigma):
        return self.student.energy(x, sigma)


def timed_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median wall times of fn_a and fn_b, run alternately (a, b, a, b, ...) after one warm-up each, so that load
    from other processes on a shared machine hits both alike."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    p.add_argument("--particles", type=int, nargs="+", default=[2000, 8000])
    p.add_argument("--nfe", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="dim 2, 2000 particles, 50 levels, 3 repeats")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.dims, args.particles, args.nfe, args.repeats = [2], [2000], 50, 3
    torch.set_num_threads(args.threads)
    rows = []
    for dim in args.dims:
        torch.manual_seed(0)  # network initialisation only; the samplers take their own generators
        student = build_student((dim,), sigma_data=0.5, g="l2", backbone=dict(width=128, num_blocks=4)).eval()
        for n in args.particles:
            for kind, target in (("energy_only", EnergyOnly(student)), ("student", student)):
                kw = dict(shape=(dim,), num_levels=args.nfe, sigma_max=80.0, sigma_min=0.002)

                def run_rd():
                    return samplers.reverse_diffusion(target, n, generator=torch.Generator().manual_seed(1), **kw)

                def run_smc():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return smc.sample(target, n, generator=torch.Generator().manual_seed(1), **kw)

                nfe_rd, nfe_smc = run_rd().nfe, run_smc().nfe
                t_rd, t_smc = timed_pair(run_rd, run_smc, args.repeats)
                row = dict(dim=dim, particles=n, levels=args.nfe, target=kind, nfe_reverse=nfe_rd, nfe_smc=nfe_smc,
                           wall_reverse=t_rd, wall_smc=t_smc, ratio=t_smc / t_rd)
                rows.append(row)
                print(f"dim {dim:3d} N {n:6d} {kind:12s} reverse {t_rd:.3f}s  smc {t_smc:.3f}s  "
                      f"ratio {row['ratio']:.3f}  (nfe {nfe_rd:.0f} / {nfe_smc:.0f})", flush=True)
    lines = [f"SMC (no MCMC) vs reverse diffusion, {args.nfe} levels, median of {args.repeats}, "
             f"{args.threads} threads, MLP energy width 128 x 4 blocks", "",
             "| dim | N | target | nfe rd / smc | reverse (s) | smc (s) | ratio |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dim']} | {r['particles']} | {r['target']} | {r['nfe_reverse']:.0f} / {r['nfe_smc']:.0f} | "
                     f"{r['wall_reverse']:.3f} | {r['wall_smc']:.3f} | {r['ratio']:.3f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "smc_overhead.json").write_text(json.dumps(dict(config=vars(args) | {"out": str(args.out)}, rows=rows),
                                                           indent=1))
    (args.out / "smc_overhead.md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
