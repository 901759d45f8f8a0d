"""Benchmark: what makes Feynman–Kac SMC composition of a distilled *image* energy work (issue 10, phase 1).

With a class-conditional digits energy student E(x, sigma, y) (recipe `digits_small`), this runs, for each target,
number of particles N, number of levels and MCMC rejuvenation, over a few seeds:

    product       p(x | y1) p(x | y2)                                  compose.product(E(.|y1), E(.|y2))
    eq13          p(x) prod_i p(x | y_i) / p(x)                        compose.conditional(E, [E(.|y1), E(.|y2)])
                  (Du et al. 2023 eq. 13; here = p(x|y1) p(x|y2) / p(x))
    temp_sampler  p(x | y)^beta as a tempered target, sampler mode     compose.tempered(E(.|y), beta)
    temp_twisted  p(x | y)^beta by the twisted LowTemperature potential  smc.LowTemperature(beta), mode="twisted"

and records the particle system's health (minimum ESS, minimum unique ancestors at resampling, surviving level-0
ancestors `num_eves`, HMC acceptance), the log Z estimate (its spread over seeds is the honest error bar), wall time,
peak resident memory of the process during the run, and what the samples are (a digits classifier trained on the
same data: predicted classes, confidence, entropy). Sample grids of the equally weighted (resampled) particles are
written for seed 0. Everything runs chunked (`max_batch`) on the CPU with one thread.

    python benchmarks/image_smc_sizing.py --student /work/artifacts/images/digits_small/student.pt
    python benchmarks/image_smc_sizing.py --student ... --targets product --num-particles 256 --levels 100 \
        --mcmc none hmc1 hmc4 --seeds 0 1 2
    python benchmarks/image_smc_sizing.py --quick --student ...          # seconds: the smallest cell of each kind

Writes `<out>/results.json` (one row per run + aggregates; rewritten after every run), `<out>/results.md` (table),
`<out>/grid_<target>.png` and `<out>/grid_samples.pt` (16 resampled samples of the first seed of every cell).
`--append` adds cells to an earlier study in the same folder (same sigmas, classes and beta), skipping runs done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import threading
import time
import warnings
from pathlib import Path

import torch

from fkdiff import compose, load_energy, mcmc, smc
from fkdiff.smc import SMCDegeneracyWarning

TARGETS = ("product", "eq13", "temp_sampler", "temp_twisted")
MCMC = {"none": None, "hmc1": (1, 3), "hmc2": (2, 3), "hmc4": (4, 3)}


def bind(model, cond):
    """A conditional student with its condition bound (`fkdiff.compose.conditioned`)."""
    return compose.conditioned(model, cond)


class PeakRSS:
    """Peak resident set size (MiB) of this process while the context is open, plus the value before entering.

    On Linux the kernel's own peak (VmHWM in /proc/self/status), reset to the current RSS on entering (writing 5 to
    /proc/self/clear_refs): exact, whatever the scheduling. Elsewhere, or where the reset is not allowed, /proc/self/statm
    or getrusage sampled every `every` seconds by a thread (can miss a peak shorter than `every`)."""

    def __init__(self, every: float = 0.05):
        self.every, self.peak, self.start = every, 0.0, 0.0
        self._stop = threading.Event()
        self._kernel_peak = False

    @staticmethod
    def _status_mib(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024  # kB
        except OSError:  # pragma: no cover - non-Linux
            pass
        return None

    @staticmethod
    def rss_mib() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:  # pragma: no cover - non-Linux
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_mib())
            time.sleep(self.every)

    def __enter__(self):
        self.start = self.peak = self.rss_mib()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            self._kernel_peak = self._status_mib("VmHWM") is not None
        except OSError:  # pragma: no cover - non-Linux, or not allowed
            self._kernel_peak = False
        if not self._kernel_peak:  # pragma: no cover
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._kernel_peak:
            self.peak = max(self.peak, self._status_mib("VmHWM"))
        else:  # pragma: no cover
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss_mib())


def matched_init_std(target, sigma: float, shape, generator: torch.Generator, num: int = 256,
                     max_batch: int | None = 64) -> float:
    """The std of the isotropic Gaussian closest to the target at noise level `sigma`, from its score: for
    N(0, v I), -<x, score(x)> = |x|^2 / v, so v = median_n |x_n|^2 / (-<x_n, score(x_n)>) over x_n ~ N(0, sigma^2 I).

    At sigma_max every diffusion marginal is about N(0, (sigma^2 + sd^2) I), so a product of k models is about
    N(0, sigma^2 / k I) and p^beta about N(0, sigma^2 / beta I); starting SMC from N(0, sigma_max^2 I) instead costs
    a factor of about (2 sqrt(k) / (k + 1))^d in ESS at the first level (d = 64: 1e-4 for k = 2: one particle left).
    """
    from fkdiff.targets import score

    x = sigma * torch.randn((num, *shape), generator=generator, dtype=torch.float64)
    s = score(target, x.float(), sigma, max_batch=max_batch).double()
    v = x.flatten(1).pow(2).sum(1) / (-(x * s).flatten(1).sum(1))
    v = v[torch.isfinite(v) & (v > 0)]
    if v.numel() == 0:
        return float(sigma)
    return float(v.median().sqrt())


def build(name: str, student, classes: tuple[int, int], temp_class: int, beta: float):
    """(target, smc keyword arguments, description) for one of TARGETS."""
    c1, c2 = (bind(student, c) for c in classes)
    if name == "product":
        return compose.product(c1, c2), {}, f"p(x|{classes[0]}) p(x|{classes[1]})"
    if name == "eq13":
        return (compose.conditional(student, [c1, c2]), {},
                f"p(x) prod_i p(x|y_i)/p(x), y = {classes[0]}, {classes[1]} (Du et al. eq. 13)")
    ct = bind(student, temp_class)
    if name == "temp_sampler":
        return compose.tempered(ct, beta), {}, f"p(x|{temp_class})^{beta:g}, tempered target (sampler mode)"
    if name == "temp_twisted":
        return ct, {"mode": "twisted", "potentials": [smc.LowTemperature(beta)]}, \
            f"p(x|{temp_class})^{beta:g}, LowTemperature potential (twisted mode)"
    raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")


def sample_stats(clf, x: torch.Tensor, name: str, classes: tuple[int, int], temp_class: int) -> dict:
    """Classifier view of equally weighted samples `x`."""
    from fkdiff.metrics import classifier_scores

    s = classifier_scores(clf, x.float())
    counts = torch.bincount(s.pred, minlength=10)
    n = x.shape[0]
    out = {"mean_confidence": s.mean_confidence, "mean_entropy": s.mean_entropy, "class_counts": counts.tolist(),
           "num_distinct": int(torch.unique(x.flatten(1), dim=0).shape[0])}
    if name in ("product", "eq13"):
        out["frac_y1"] = float(counts[classes[0]]) / n
        out["frac_y2"] = float(counts[classes[1]]) / n
        out["frac_either"] = out["frac_y1"] + out["frac_y2"]
        both = s.probs[:, classes[0]] * s.probs[:, classes[1]]
        out["mean_p_y1_p_y2"] = float(both.mean())  # high only when one image reads as both classes
    else:
        out["frac_class"] = float(counts[temp_class]) / n
    return out


def run_one(student, clf, name: str, n: int, levels: int, mc: str, seed: int, args) -> tuple[dict, torch.Tensor]:
    target, kw, desc = build(name, student, tuple(args.classes), args.temp_class, args.beta)
    kernel = None if MCMC[mc] is None else mcmc.HMC(MCMC[mc][0], MCMC[mc][1])
    gen = torch.Generator().manual_seed(seed)
    init_std = None  # N(0, sigma_max^2 I); twisted mode starts from the base model's own law anyway
    if args.init == "matched" and kw.get("mode") != "twisted":
        init_std = matched_init_std(target, args.sigma_max, student.event_shape,
                                    torch.Generator().manual_seed(10_000 + seed), max_batch=args.max_batch)
    with warnings.catch_warnings(record=True) as caught, PeakRSS() as mem:
        warnings.simplefilter("always", SMCDegeneracyWarning)
        t0 = time.perf_counter()
        res = smc.sample(target, n, shape=student.event_shape, num_levels=levels, sigma_max=args.sigma_max,
                         sigma_min=args.sigma_min, mcmc=kernel, generator=gen, max_batch=args.max_batch,
                         eval_dtype=torch.float32, init_std=init_std, **kw)
        wall = time.perf_counter() - t0
    x = res.resample(gen)
    row = {"target": name, "description": desc, "num_particles": n, "levels": levels, "mcmc": mc, "seed": seed,
           "init": args.init, "init_std": args.sigma_max if init_std is None else init_std,
           **{k: v for k, v in res.summary().items() if k != "wall_time"},
           "min_ess_frac": res.min_ess / n, "wall_s": wall, "peak_rss_mib": mem.peak, "rss_before_mib": mem.start,
           "degenerate": bool(res.warnings), "warnings": list(res.warnings),
           **sample_stats(clf, x, name, tuple(args.classes), args.temp_class)}
    del caught
    return row, x


INITS = ("sigma_max", "matched")


def cell(r: dict) -> tuple:
    """A configuration: (target, N, levels, mcmc, init); runs of one cell differ only by their seed."""
    return r["target"], r["num_particles"], r["levels"], r["mcmc"], r.get("init", "sigma_max")


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per cell: medians over seeds, log Z spread (sd over seeds)."""
    keys = sorted({cell(r) for r in rows},
                  key=lambda k: (TARGETS.index(k[0]), INITS.index(k[4]), k[1], k[2], list(MCMC).index(k[3])))
    out = []
    for k in keys:
        rs = [r for r in rows if cell(r) == k]
        lz = [r["log_Z"] for r in rs]
        med = lambda f: statistics.median(r[f] for r in rs)  # noqa: E731
        agg = {"target": k[0], "num_particles": k[1], "levels": k[2], "mcmc": k[3], "init": k[4],
               "init_std": med("init_std") if "init_std" in rs[0] else None, "num_seeds": len(rs),
               "min_ess_frac": med("min_ess_frac"), "min_unique_ancestors": med("min_unique_ancestors"),
               "num_eves": med("num_eves"), "num_distinct": med("num_distinct"),
               "mean_acceptance": None if rs[0]["mean_acceptance"] is None else med("mean_acceptance"),
               "log_Z_mean": statistics.fmean(lz), "log_Z_sd": statistics.stdev(lz) if len(lz) > 1 else None,
               "log_Z_se_reported": med("log_Z_se"), "nfe": med("nfe"), "wall_s": med("wall_s"),
               "peak_rss_mib": max(r["peak_rss_mib"] for r in rs), "degenerate_runs": sum(r["degenerate"] for r in rs),
               "mean_entropy": med("mean_entropy"), "mean_confidence": med("mean_confidence")}
        for f in ("frac_y1", "frac_y2", "frac_either", "mean_p_y1_p_y2", "frac_class"):
            if f in rs[0]:
                agg[f] = med(f)
        out.append(agg)
    return out


def markdown(agg: list[dict], meta: dict) -> str:
    lines = [f"# Image SMC sizing ({meta['student']})", "",
             f"Machine: {meta['machine']}. sigma {meta['sigma_max']} -> {meta['sigma_min']} (EDM rho = 7 levels, "
             f"then one denoising step), max_batch {meta['max_batch']}, seeds {meta['seeds']}; HMC = k steps x 3 "
             "leapfrog, step size adapted to acceptance 0.65. Medians over seeds; log Z sd = spread over seeds.", "",
             "| target | init | N | levels | MCMC | min ESS/N | min uniq. anc. | eves | distinct | acc. | log Z mean | "
             "log Z sd (seeds) | reported se | nfe | wall s | peak RSS MiB | degenerate | classes | entropy |",
             "|" + "---|" * 19]
    for a in agg:
        if "frac_class" in a:
            cls = f"class {a['frac_class']:.2f}"
        else:
            cls = f"y1 {a['frac_y1']:.2f} / y2 {a['frac_y2']:.2f} / both {a['mean_p_y1_p_y2']:.2f}"
        acc = "-" if a["mean_acceptance"] is None else f"{a['mean_acceptance']:.2f}"
        sd = "-" if a["log_Z_sd"] is None else f"{a['log_Z_sd']:.2f}"
        lines.append(
            f"| {a['target']} | {a['init']} | {a['num_particles']} | {a['levels']} | {a['mcmc']} | {a['min_ess_frac']:.3f} | "
            f"{a['min_unique_ancestors']:.0f} | {a['num_eves']:.0f} | {a['num_distinct']:.0f} | {acc} | "
            f"{a['log_Z_mean']:.1f} | {sd} | {a['log_Z_se_reported']:.2f} | {a['nfe']:.0f} | {a['wall_s']:.0f} | "
            f"{a['peak_rss_mib']:.0f} | {a['degenerate_runs']}/{a['num_seeds']} | {cls} | {a['mean_entropy']:.2f} |")
    return "\n".join(lines) + "\n"


def save_grids(grids: dict, out: Path) -> list[str]:
    """One figure per target: a panel of 16 resampled samples per configuration (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for name in TARGETS:
        order = lambda kx: (INITS.index(kx[0][4] if len(kx[0]) > 4 else "sigma_max"), *kx[0][1:3],  # noqa: E731
                            list(MCMC).index(kx[0][3]))
        cells = sorted(((k, x) for k, x in grids.items() if k[0] == name), key=order)
        if not cells:
            continue
        cols = min(3, len(cells))
        rows = math.ceil(len(cells) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.5 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (key, x) in zip(axes.flat, cells):
            n, lv, mc = key[1:4]
            init = key[4] if len(key) > 4 else "sigma_max"
            x = x[:16].float().clamp(-1, 1)
            k = int(math.ceil(math.sqrt(x.shape[0])))
            pad = torch.full((k * k - x.shape[0], *x.shape[1:]), -1.0)
            tiles = torch.cat([x, pad]).reshape(k, k, *x.shape[1:])  # [k, k, C, H, W]
            img = tiles.permute(2, 0, 3, 1, 4).reshape(x.shape[1], k * x.shape[2], k * x.shape[3])
            ax.imshow(((img[0] + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"N={n} L={lv} {mc} init={init}", fontsize=8)
        fig.suptitle(name, fontsize=10)
        fig.tight_layout()
        path = out / f"grid_{name}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(str(path))
    return files


def _meta(args, clf_path, clf) -> dict:
    return {"student": str(args.student), "classifier": str(clf_path), "classifier_report": getattr(clf, "report", {}),
            "machine": f"{platform.machine()} {os.cpu_count()}-core CPU (shared with other jobs), torch "
                       f"{torch.__version__}, 1 thread",
            "sigma_max": args.sigma_max, "sigma_min": args.sigma_min, "max_batch": args.max_batch,
            "seeds": args.seeds, "classes": args.classes, "temp_class": args.temp_class, "beta": args.beta}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="a digits energy student (student.pt from fkdiff.distill)")
    p.add_argument("--classifier", default=None, help="digits classifier file (fkdiff.metrics.save_classifier); "
                   "trained from seed 0 and written there when missing; default: beside the student")
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--num-particles", nargs="+", type=int, default=[64, 256])
    p.add_argument("--levels", nargs="+", type=int, default=[50, 100, 200])
    p.add_argument("--mcmc", nargs="+", default=["none", "hmc1", "hmc4"], choices=list(MCMC))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--classes", nargs=2, type=int, default=[1, 7], help="the two classes of product / eq13")
    p.add_argument("--temp-class", type=int, default=3)
    p.add_argument("--beta", type=float, default=2.0)
    p.add_argument("--sigma-max", type=float, default=10.0)
    p.add_argument("--sigma-min", type=float, default=0.05)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--init", default="matched", choices=INITS,
                   help="initial particles: N(0, sigma_max^2) or matched to the target at sigma_max (see "
                        "matched_init_std); twisted mode always starts from the base model's N(0, sigma_max^2)")
    p.add_argument("--out", default="benchmarks/results/image_smc_sizing")
    p.add_argument("--append", action="store_true", help="add these cells to <out>/results.json (skips done runs)")
    p.add_argument("--quick", action="store_true", help="N=16, 6 levels, seeds 0 1, no HMC and hmc1 (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.num_particles, args.levels, args.seeds, args.mcmc = [16], [6], [0, 1], ["none", "hmc1"]
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from fkdiff.metrics import load_classifier, save_classifier, train_digits_classifier

    student = load_energy(args.student)
    size = student.event_shape[-1]
    clf_path = Path(args.classifier) if args.classifier else Path(args.student).with_name(f"classifier_digits{size}.pt")
    if clf_path.is_file():
        clf = load_classifier(clf_path)
    else:
        clf = train_digits_classifier(size, seed=0)
        save_classifier(clf, clf_path)

    rows, grids = [], {}
    if args.append and (out / "results.json").is_file():  # add cells to an earlier run of the same study
        old = json.loads((out / "results.json").read_text())
        for k in ("sigma_max", "sigma_min", "classes", "temp_class", "beta"):
            if old["meta"][k] != getattr(args, k):
                raise SystemExit(f"--append: {k}={getattr(args, k)} differs from the earlier run's {old['meta'][k]}")
        rows = old["runs"]
        if (out / "grid_samples.pt").is_file():
            grids = torch.load(out / "grid_samples.pt")
    done = {(*cell(r), r["seed"]) for r in rows}
    cells = [(t, n, lv, mc) for t in args.targets for n in args.num_particles for lv in args.levels for mc in args.mcmc]
    for i, (t, n, lv, mc) in enumerate(cells):
        for seed in args.seeds:
            if (t, n, lv, mc, args.init, seed) in done:
                continue
            row, x = run_one(student, clf, t, n, lv, mc, seed, args)
            rows.append(row)
            if cell(row) not in grids:
                grids[cell(row)] = x[:16].float()
            # write as we go: a long study can be stopped and continued with --append
            (out / "results.json").write_text(json.dumps({"meta": _meta(args, clf_path, clf), "runs": rows}, indent=1))
            torch.save(grids, out / "grid_samples.pt")
            print(f"[{i + 1}/{len(cells)}] {t} N={n} L={lv} {mc} init={args.init} seed={seed}: min ESS/N {row['min_ess_frac']:.3f}, "
                  f"min uniq {row['min_unique_ancestors']}, eves {row['num_eves']}, acc {row['mean_acceptance']}, "
                  f"log Z {row['log_Z']:.2f}, {row['wall_s']:.1f} s, peak RSS {row['peak_rss_mib']:.0f} MiB",
                  flush=True)
    agg = aggregate(rows)
    meta = _meta(args, clf_path, clf)
    meta["seeds"] = sorted({r["seed"] for r in rows})
    result = {"meta": meta, "runs": rows, "aggregate": agg, "grids": save_grids(grids, out)}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(agg, meta))
    print(markdown(agg, meta))
    return result


if __name__ == "__main__":
    main()
