"""Benchmark: do distilled energy students hold the right *relative energy levels* at every sigma? (issue 9)

For each variant (a list of Hydra overrides of the toy2d recipe) and each training seed, `fkdiff.distill` trains the
ring8 and strip students; then
  - report.json's per-bucket excess denoiser error, relative-energy error (nats rms between pairs) and mode-offset
    error (fkdiff.levels.level_error_by_bucket);
  - the composition check at sigma_min = 0.002: the students' product ring x strip by quadrature
    (fkdiff.levels.product_check_2d: upper-cluster mass, exact 0.5; log-overlap error against the closed form) and by
    SMC (fkdiff.levels.product_check_smc, N = 2000, 100 levels, 1 HMC step of 3 leapfrog per level).
Results accumulate in <out>/results.json (a finished (variant, seed) is not rerun), and `--summary` writes
<out>/summary.md (a table: median [min, max] over seeds) and <out>/summary.png.
`--timing` measures the training-step time of each variant against the baseline (same process, interleaved).

    python benchmarks/energy_levels.py --variants baseline shared_rows default --seeds 0 1 2 --summary
    python benchmarks/energy_levels.py --timing --variants shared_rows default
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

COMMON = ["logger.kind=none", "trainer.enable_progress_bar=false", "distill.plot.enabled=false",
          "+trainer.enable_model_summary=false", "distill.diagnostics_every_n_steps=0"]

# name -> overrides of the toy2d recipe (the default recipe). Since issue 9 the recipe trains with the level term
# (distill.levels.weight=0.1, pairs of a quarter of the batch on extra rows: distill.levels.rows=extra) and a smooth
# noise embedding (noise_scale 16); "baseline" is the recipe before it: the projection loss alone with EDM's embedding
# (noise_scale 250); "shared_rows" the level term with its pairs taken from the batch's own rows (the default before).
VARIANTS: dict[str, list[str]] = {
    "baseline": ["distill.levels.weight=0", "student.backbone.noise_scale=250"],
    "default": [],
    "shared_rows": ["distill.levels.rows=shared"],
    "levels_only": ["student.backbone.noise_scale=250"],   # the level term with EDM's embedding
    "emb16_only": ["distill.levels.weight=0"],              # the smooth embedding without the level term
    "levels_w0.3": ["distill.levels.weight=0.3"],
    "levels_w0.03": ["distill.levels.weight=0.03"],
}


def parse_variant(name: str) -> list[str]:
    if name in VARIANTS:
        return VARIANTS[name]
    raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")


def run_one(name: str, seed: int, out: Path, smc: bool = True) -> dict:
    from fkdiff import load_energy
    from fkdiff.distill import distill
    from fkdiff.levels import product_check_2d, product_check_smc
    from fkdiff.recipes import compose
    from teachers import ring8, strip

    run_dir = out / "runs" / f"{name}_s{seed}"
    cfg = compose(["recipe=toy2d", *COMMON, f"run_dir={run_dir}", f"seed={seed}", *parse_variant(name)])
    t0 = time.time()
    distill(cfg)
    wall = time.time() - t0
    report = json.loads((run_dir / "report.json").read_text())
    models = [load_energy(run_dir, name="ring8"), load_energy(run_dir, name="strip")]
    exact = [ring8(), strip()]
    quad = product_check_2d(models, exact, 0.002, h=0.005)
    res = {"variant": name, "seed": seed, "overrides": parse_variant(name), "distill_wall_s": wall,
           "students": report["students"], "quadrature": quad}
    if smc:
        res["smc"] = product_check_smc(models, exact, 0.002, log_normalisers=quad["model_log_normalisers"],
                                       generator=torch.Generator().manual_seed(1000 + seed))
    return res


def load_results(out: Path) -> list[dict]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.is_file() else []


def save_result(out: Path, res: dict) -> None:
    results = [r for r in load_results(out) if (r["variant"], r["seed"]) != (res["variant"], res["seed"])]
    results.append(res)
    (out / "results.json").write_text(json.dumps(results, indent=1))


# ---------------------------------------------------------------------------------------------------------------------
# timing


def step_time(names: list[str], steps: int = 60, repeats: int = 3) -> dict:
    """Median training-step time (forward, loss, backward, Adam step) of each variant's loss on the ring8 student,
    interleaved with the baseline in one process (the ratio is what holds on a shared machine)."""
    from fkdiff.distill import _build_student, _jobs, build_loss
    from fkdiff.recipes import compose

    torch.set_num_threads(1)
    times: dict[str, list[float]] = {n: [] for n in dict.fromkeys(["baseline", *names])}
    setups = {}
    for n in times:
        cfg = compose(["recipe=toy2d", *COMMON, "teacher.preset=[ring8]", *parse_variant(n)])
        ((_, teacher, dm),) = _jobs(cfg)
        dm.setup("fit")
        torch.manual_seed(0)
        student = _build_student(cfg, teacher, dm)[0]
        setups[n] = (student, teacher, build_loss(cfg.distill, student.sigma_data),
                     torch.optim.Adam(student.parameters(), lr=1e-3))
    x_all = setups["baseline"][1].sample(256 * steps, generator=torch.Generator().manual_seed(0)).float()
    for _ in range(repeats):
        for n, (student, teacher, loss_fn, opt) in setups.items():
            student.train()
            t = []
            for k in range(steps):
                x0 = x_all[256 * k:256 * (k + 1)]
                t0 = time.perf_counter()
                out = loss_fn(student, teacher, x0, None, torch.Generator().manual_seed(k))
                loss = out.loss.mean()
                if getattr(out, "level_loss", None) is not None:
                    loss = loss + out.level_loss.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                t.append(time.perf_counter() - t0)
            times[n].append(statistics.median(t[5:]))
    base = statistics.median(times["baseline"])
    return {n: {"step_ms": 1e3 * statistics.median(v), "ratio": statistics.median(v) / base} for n, v in times.items()}


# ---------------------------------------------------------------------------------------------------------------------
# summary


def _med(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    return vals


def summarize(out: Path, variants: list[str] | None = None) -> str:
    results = load_results(out)
    timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").is_file() else {}
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["variant"], []).append(r)
    names = [v for v in (variants or list(by)) if v in by]
    base = by.get("baseline", [])

    def fmt(vals, f="{:.3f}"):
        vals = sorted(vals)
        if not vals:
            return "-"
        if len(vals) == 1:
            return f.format(vals[0])
        return f"{f.format(statistics.median(vals))} [{f.format(vals[0])}, {f.format(vals[-1])}]"

    buckets = None
    lines = ["# Energy levels across sigma (toy2d, ring8 x strip)", "",
             "Cells: median [min, max] over training seeds. Upper mass: the students' product at sigma_min = 0.002 "
             "(exact 0.5; quadrature / SMC N = 2000). Log-overlap error: log int p_ring p_strip minus the closed form "
             "(nats). Level error: relative-energy error, rms nats between pairs, worst bucket and the smallest-sigma "
             "bucket. Denoiser: the worst ratio, over buckets, of the excess denoiser error to the baseline's "
             "(median over seeds per bucket).", "",
             "| variant | seeds | upper mass (quad) | upper mass (SMC) | log-overlap err (quad) | log-overlap err (SMC) "
             "| level err ring [0.002,0.01) | level err strip [0.002,0.01) | level err max bucket | denoiser vs baseline "
             "(max over buckets) | step time ratio |", "|" + "---|" * 11]
    for n in names:
        rs = by[n]
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        q_mass = [r["quadrature"]["region_mass"] for r in rs]
        s_mass = [r["smc"]["region_mass"] for r in rs if "smc" in r]
        q_err = [r["quadrature"]["log_overlap_error"] for r in rs]
        s_err = [r["smc"]["log_overlap_error"] for r in rs if "smc" in r]
        lev = {s: [r["students"][s]["energy_errors"]["rms_nats"] for r in rs] for s in ("ring8", "strip")}
        buckets = rs[0]["students"]["ring8"]["energy_errors"]["bucket"]
        worst = [max(max(r["students"][s]["energy_errors"]["rms_nats"]) for s in ("ring8", "strip")) for r in rs]
        den = "-"
        if base:
            ratios = []
            for s in ("ring8", "strip"):
                b = [statistics.median(r["students"][s]["errors"]["ratio"][i] for r in base) for i in range(len(buckets))]
                v = [statistics.median(r["students"][s]["errors"]["ratio"][i] for r in rs) for i in range(len(buckets))]
                ratios += [vi / max(bi, 1e-12) for vi, bi in zip(v, b)]
            den = f"{max(ratios):.2f}"
        tr = timing.get(n, {}).get("ratio")
        lines.append(f"| {n} | {seeds} | {fmt(q_mass)} | {fmt(s_mass)} | {fmt(q_err, '{:+.2f}')} | {fmt(s_err, '{:+.2f}')} "
                     f"| {fmt([v[0] for v in lev['ring8']])} | {fmt([v[0] for v in lev['strip']])} | {fmt(worst)} "
                     f"| {den} | {'-' if tr is None else f'{tr:.2f}'} |")
    notes = [f"- {r['variant']} seed {r['seed']}: {r['source']}" for n in names for r in by[n] if r.get("source")]
    lines += ["", *notes] if notes else []
    lines += ["", "Per bucket (median over seeds): relative-energy error rms (nats) / excess denoiser error (% of optimal).", ""]
    if buckets:
        lines += ["| variant | student | " + " | ".join(buckets) + " |", "|" + "---|" * (2 + len(buckets))]
        for n in names:
            for s in ("ring8", "strip"):
                rs = by[n]
                cells = []
                for i in range(len(buckets)):
                    lv = statistics.median(r["students"][s]["energy_errors"]["rms_nats"][i] for r in rs)
                    dn = statistics.median(r["students"][s]["errors"]["ratio"][i] for r in rs)
                    cells.append(f"{lv:.3f} / {100 * dn:.2f}%")
                lines.append(f"| {n} | {s} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    plot(by, names, out / "summary.png")
    return text


def plot(by: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for j, n in enumerate(names):
        rs = by[n]
        lo = rs[0]["students"]["ring8"]["energy_errors"]["lo"]
        hi = rs[0]["students"]["ring8"]["energy_errors"]["hi"]
        mid = [math.sqrt(a * b) for a, b in zip(lo, hi)]
        for ax, s in ((axes[0], "ring8"), (axes[1], "strip")):
            med = [statistics.median(r["students"][s]["energy_errors"]["rms_nats"][i] for r in rs) for i in range(len(mid))]
            ax.plot(mid, med, "o-", label=n, color=f"C{j}")
        den = [statistics.median(max(r["students"][s]["errors"]["ratio"][i] for s in ("ring8", "strip")) for r in rs)
               for i in range(len(mid))]
        axes[2].plot(mid, [100 * d for d in den], "o-", color=f"C{j}", label=n)
        for r in rs:
            axes[3].scatter(r["quadrature"]["region_mass"], r["quadrature"]["log_overlap_error"], color=f"C{j}", marker="o")
            if "smc" in r:
                axes[3].scatter(r["smc"]["region_mass"], r["smc"]["log_overlap_error"], color=f"C{j}", marker="x")
    for ax, t in ((axes[0], "ring8: relative-energy error (rms nats)"), (axes[1], "strip: relative-energy error (rms nats)"),
                  (axes[2], "excess denoiser error, worse student (% of optimal)")):
        ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlabel("sigma"), ax.set_title(t, fontsize=9)
        ax.axhline(0.3 if ax is not axes[2] else 1.0, color="gray", ls=":", lw=1)
    axes[0].legend(fontsize=7)
    a = axes[3]
    a.axvspan(0.45, 0.55, color="green", alpha=0.1), a.axhspan(-0.2, 0.2, color="green", alpha=0.1)
    a.axvline(0.5, color="gray", ls=":"), a.axhline(0, color="gray", ls=":")
    a.set_xlabel("upper-cluster mass (o quadrature, x SMC)"), a.set_ylabel("log-overlap error (nats)")
    a.set_title("students' product at sigma_min = 0.002 (target: green box)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=["baseline"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "energy_levels")
    ap.add_argument("--no-smc", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="rerun (variant, seed) pairs already in results.json")
    ap.add_argument("--summary", action="store_true", help="write summary.md / summary.png")
    ap.add_argument("--summary-only", action="store_true", help="write the summary of the results so far, run nothing")
    ap.add_argument("--timing", action="store_true", help="measure step-time ratios vs the baseline")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summary_only:
        print(summarize(args.out, args.variants))
        return
    if args.timing:
        tm = step_time([v for v in args.variants if v != "baseline"])
        old = json.loads((args.out / "timing.json").read_text()) if (args.out / "timing.json").is_file() else {}
        old.update(tm)
        (args.out / "timing.json").write_text(json.dumps(old, indent=1))
        print(json.dumps(tm, indent=1))
    else:
        done = {(r["variant"], r["seed"]) for r in load_results(args.out)}
        for v in args.variants:
            for s in args.seeds:
                if (v, s) in done and not args.rerun:
                    continue
                res = run_one(v, s, args.out, smc=not args.no_smc)
                save_result(args.out, res)
                q = res["quadrature"]
                print(f"[energy_levels] {v} seed {s}: upper mass {q['region_mass']:.3f}, log-overlap err "
                      f"{q['log_overlap_error']:+.2f}, levels ring {res['students']['ring8']['energy_errors']['rms_nats'][0]:.3f} "
                      f"strip {res['students']['strip']['energy_errors']['rms_nats'][0]:.3f}", flush=True)
    if args.summary:
        print(summarize(args.out, args.variants if args.variants != ["baseline"] else None))


if __name__ == "__main__":
    main()
