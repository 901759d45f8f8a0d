"""Which part of an image student's product levels is wrong? The `image_claims.py levels` error split per component,
per kind of point (on / off the condition) and per sigma range.

`image_claims.py levels` compares, for the product p(x|y1) p(x|y2), the student's relative energy of a real y1 digit
vs a real y2 digit with the teacher's (heat equation integrated along ln sigma from sigma_ref plus a line integral of
the teacher's score at sigma_ref, `fkdiff.levels.teacher_relative_energy`). That product reads every component at a
point of the *other* class too: E(x_y1 | y2) is evaluated off the conditional's own distribution, where neither the
projection loss nor the level term ever trains the student (their rows are data with their own labels). Here the
relative energies of one component c are split by pair kind, for pairs of points noised to sigma:

    on-on    two real c digits under condition c             (where training has leverage)
    off-off  two real digits of the other class under c      (off the condition: only a composition reads it)
    mixed    a real y1 vs a real y2 digit under c            (what the product sums over c)

and the error of each is split along ln sigma. The teacher's relative energy of x_a, x_b at sigma is

    dE_T(sigma) = line_T(x_a, x_b; sigma_ref) - [H_T(x_a) - H_T(x_b)],   H_T(x) = int_{ln sigma}^{ln sigma_ref} T(x, s) dln s

(T the teacher's time score, eq. (2) of fkdiff/levels.py, Hutchinson divergence; per point, so every pair kind costs
the same teacher calls), and the student's obeys the same identity exactly (it is an energy), so the error is

    err(sigma) = [dE_S - line_T](sigma_ref) - sum_k [ (H_S - H_T)(x_a) - (H_S - H_T)(x_b) ] over ln-sigma ranges k

(`err_ref`: the levels at sigma_ref; `err_k`: what the time-score error within range k adds). The teacher's H is
estimated twice with independent probes: rms columns are cross-fitted (the probe noise removed), `noise` is the
probe noise of the error. Negative relative energy: the first point is preferred.

    python benchmarks/image_level_parts.py --teacher T --students S1 S2 ... --out benchmarks/results/image_level_parts
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fkdiff import load_energy  # noqa: E402
from fkdiff.levels import _gauss_legendre, energy_grad_and_time_score, teacher_time_score  # noqa: E402


def _points(size: int, classes, p: int, sigma: float, gen: torch.Generator) -> dict[int, torch.Tensor]:
    from fkdiff.metrics.classifier import _digits_split

    _, _, xva, yva = _digits_split(size, 0)
    out = {}
    for c in classes:
        x0 = xva[yva == c][:p].float()
        out[c] = (x0, torch.randn(x0.shape, generator=gen))
    return out


def _nodes(sigma: float, sigma_ref: float, edges, n_per: int):
    """Gauss-Legendre nodes (s, weight in ln s, range index) on [ln sigma, ln sigma_ref], split at `edges`."""
    cuts = [sigma] + [e for e in edges if sigma < e < sigma_ref] + [sigma_ref]
    u, v = _gauss_legendre(n_per)
    out = []
    for k, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        a, b = math.log(lo), math.log(hi)
        out += [(math.exp(a + float(uk) * (b - a)), float(vk) * (b - a), k) for uk, vk in zip(u, v)]
    return out, cuts


def _line(model_denoise, xa, xb, sref: float, cond, n: int = 16) -> torch.Tensor:
    """-int_0^1 (x_a - x_b) . s(x_b + t (x_a - x_b), sref) dt, s = (D - x) / sref^2 (the teacher's line integral)."""
    t, w = _gauss_legendre(n)
    out = torch.zeros(xa.shape[0], dtype=torch.float64)
    sv = torch.full((xa.shape[0],), sref)
    with torch.no_grad():
        for tk, wk in zip(t.tolist(), w.tolist()):
            x = xb + tk * (xa - xb)
            s = (model_denoise(x, sv, cond).double() - x.double()) / sref**2
            out -= wk * ((xa - xb).double() * s).flatten(1).sum(1)
    return out


def _integrand_teacher(teacher, x0, eps, x, s, cond, path, num_probes, gen):
    sv = torch.full((x.shape[0],), s)
    with torch.no_grad():
        d = teacher(x, sv, cond)
    t = teacher_time_score(teacher, x, sv, cond, divergence="hutchinson", num_probes=num_probes, generator=gen,
                           denoised=d).double()
    if path == "noising":  # d/dln s of E(x0 + s eps, s) = s eps . grad E + T, grad E = (x - D) / s^2
        t = t + (eps * (x - d)).flatten(1).sum(1).double() / s
    return t


def _integrand_student(st, x0, eps, x, s, cond, path):
    sv = torch.full((x.shape[0],), s)
    _, gx, ts = energy_grad_and_time_score(st, x, sv, cond, create_graph=False)
    ts = ts.double()
    if path == "noising":
        ts = ts + s * (eps * gx).flatten(1).sum(1).double()
    return ts


def measure(teacher, students: dict, classes, sigmas, *, p: int, sigma_ref: float, edges, n_per: int,
            num_probes: int, seed: int, path: str = "fixed") -> list[dict]:
    y1, y2 = classes
    rows = []
    for sigma in sigmas:
        gen = torch.Generator().manual_seed(seed)
        pts = _points(8, classes, p, sigma, gen)
        x0 = torch.cat([pts[y1][0], pts[y2][0]])  # [2p]: y1 digits then y2 digits
        eps = torch.cat([pts[y1][1], pts[y2][1]])
        x = x0 + sigma * eps
        at = (lambda s: x0 + s * eps) if path == "noising" else (lambda s: x)  # the points along the path at s
        n = x.shape[0]
        nodes, cuts = _nodes(sigma, sigma_ref, edges, n_per)
        nk = len(cuts) - 1
        t0 = time.perf_counter()
        for c in classes:
            cc = torch.full((n,), c, dtype=torch.long)
            # teacher: H per range, two independent probe sets
            ht = torch.zeros(2, nk, n, dtype=torch.float64)
            hs = {name: torch.zeros(nk, n, dtype=torch.float64) for name in students}
            for s, w, k in nodes:
                xs = at(s)
                for r in range(2):
                    ht[r, k] += w * _integrand_teacher(teacher, x0, eps, xs, s, cc, path, num_probes, gen)
                for name, st in students.items():
                    hs[name][k] += w * _integrand_student(st, x0, eps, xs, s, cc, path)
            ia, ib = torch.arange(p), torch.arange(p, 2 * p)
            pairs = {"mixed": (ia, ib), f"{y1}{y1}": (ia, ia.roll(1)), f"{y2}{y2}": (ib, ib.roll(1))}
            for kind, (a, b) in pairs.items():
                xr = at(sigma_ref)
                line = _line(teacher, xr[a], xr[b], sigma_ref, cc[a])
                te = line[None] - (ht[:, :, a].sum(1) - ht[:, :, b].sum(1))  # [2, P]: two estimates
                # the teacher's loop integral in (x, ln sigma): straight across at sigma minus the heat reference
                # (zero for a conservative teacher: its score and time score are the gradient of one energy)
                line_here = _line(teacher, x[a], x[b], sigma, cc[a], n=64)
                loop = line_here - te.mean(0)
                on = {"mixed": "mixed", f"{c}{c}": "on-on"}.get(kind, "off-off")
                for name, st in students.items():
                    with torch.no_grad():
                        se = (st.energy(x[a], sigma, cc[a]) - st.energy(x[b], sigma, cc[b])).double()
                        sref = (st.energy(xr[a], sigma_ref, cc[a]) - st.energy(xr[b], sigma_ref, cc[b])).double()
                    e = se[None] - te  # [2, P]
                    dq = (hs[name][:, a] - hs[name][:, b])[None] - (ht[:, :, a] - ht[:, :, b])  # [2, nk, P]

                    def xrms(v):  # cross-fitted rms of two estimates v[0], v[1] of one quantity
                        return float((v[0] * v[1]).mean().clamp(min=0).sqrt())

                    row = {"student": name, "sigma": sigma, "cond": c, "pairs": kind, "kind": on, "num_pairs": p,
                           "teacher_dE_mean": float(te.mean()), "student_dE_mean": float(se.mean()),
                           "error_rms": xrms(e), "error_mean": float(e.mean()),
                           "teacher_loop_mean": float(loop.mean()), "teacher_loop_rms": float(loop.pow(2).mean().sqrt()),
                           "error_vs_line_rms": float((se - line_here).pow(2).mean().sqrt()),
                           "noise": float(((e[0] - e[1]) ** 2 / 2).mean().sqrt()),
                           "err_ref_rms": float((sref - line).pow(2).mean().sqrt()),
                           # minus: err = err_ref - sum_k dq_k
                           **{f"err_{cuts[k]:g}-{cuts[k + 1]:g}_rms": xrms(dq[:, k]) for k in range(nk)},
                           **{f"err_{cuts[k]:g}-{cuts[k + 1]:g}_mean": float(-dq[:, k].mean()) for k in range(nk)}}
                    rows.append(row)
                    print(f"  sigma {sigma:g} c={c} {kind:6s} ({on:7s}) {name:10s}: teacher {row['teacher_dE_mean']:7.1f}"
                          f" student {row['student_dE_mean']:7.1f} err rms {row['error_rms']:5.1f} (noise "
                          f"{row['noise']:.1f}, ref {row['err_ref_rms']:.1f}; per range "
                          + " ".join(f"{row[f'err_{cuts[k]:g}-{cuts[k + 1]:g}_rms']:.1f}" for k in range(nk)) + ")",
                          flush=True)
        print(f"sigma {sigma:g}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def denoiser_errors(teacher, students: dict, edges=(0.002, 0.05, 0.2, 1.0, 5.0), seed: int = 0) -> list[dict]:
    """The students' denoiser error against the teacher's, |D_S - D_T|^2 / |x - D_T|^2 (means over the held-out
    digits, sigma log-uniform per bucket), under each digit's own class, a uniformly drawn other class and the null
    token: where the projection loss holds the student to the teacher, and where only compositions read it."""
    from fkdiff.metrics.classifier import _digits_split

    _, _, xv, yv = _digits_split(8, 0)
    xv, yv = xv.float(), yv.long()
    n, rows = xv.shape[0], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        g = torch.Generator().manual_seed(seed)
        s = torch.exp(math.log(lo) + torch.rand(n, generator=g) * (math.log(hi) - math.log(lo)))
        x = xv + s[:, None, None, None] * torch.randn(xv.shape, generator=g)
        other = (yv + torch.randint(1, 10, (n,), generator=g)) % 10
        for mode, c in (("own", yv), ("other", other), ("null", torch.full_like(yv, -1))):
            with torch.no_grad():
                dt = teacher(x, s, c)
            scale = (x - dt).flatten(1).pow(2).sum(1).mean()
            row = {"bucket": f"[{lo:g}, {hi:g})", "condition": mode}
            for name, st in students.items():
                with torch.no_grad():
                    ds = st(x, s, c)
                row[name] = float((ds - dt).flatten(1).pow(2).sum(1).mean() / scale)
            rows.append(row)
    return rows


def _denoiser_table(rows: list[dict]) -> str:
    names = [k for k in rows[0] if k not in ("bucket", "condition")]
    lines = ["| sigma | condition | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    lines += [f"| {r['bucket']} | {r['condition']} | " + " | ".join(f"{100 * r[n]:.2f}%" for n in names) + " |"
              for r in rows]
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    """One line per (sigma, condition, pair kind): the teacher's mean relative energy, then per student its mean,
    the error rms and the error rms each ln-sigma range adds (cross-fitted)."""
    names = list(dict.fromkeys(r["student"] for r in rows))
    ranges = [k[4:-4] for k in rows[0] if k.startswith("err_") and k.endswith("_rms") and k != "err_ref_rms"]
    head = ["sigma", "cond", "pairs", "kind", "teacher mean", "teacher loop mean / rms"] + [f"{n}: mean / err rms / per range / err vs line" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["sigma"], r["cond"], r["pairs"]) for r in rows))
    for key in keys:
        by = {r["student"]: r for r in rows if (r["sigma"], r["cond"], r["pairs"]) == key}
        r0 = next(iter(by.values()))
        loop = f"{r0['teacher_loop_mean']:.1f} / {r0['teacher_loop_rms']:.1f}" if "teacher_loop_rms" in r0 else "-"
        cells = [f"{key[0]:g}", str(key[1]), key[2], r0["kind"], f"{r0['teacher_dE_mean']:.1f}", loop]
        for n in names:
            r = by[n]
            per = " ".join(f"{r[f'err_{g}_rms']:.1f}" for g in ranges if f"err_{g}_rms" in r)
            vs_line = f" / {r['error_vs_line_rms']:.1f}" if "error_vs_line_rms" in r else ""
            cells.append(f"{r['student_dE_mean']:.1f} / **{r['error_rms']:.1f}** / {per}{vs_line}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, cmd: str, args: dict, rows: list[dict], denoiser: list[dict] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": cmd, "args": args, "rows": rows, "denoiser": denoiser},
                                                 indent=1))
    note = ("Relative energy of the first vs the second point of each pair (nats, mean over pairs); err rms: the "
            "student's error against the teacher (cross-fitted over two probe sets); per range: what the time-score "
            "error within each ln-sigma range (sigma..0.2, 0.2..1, 1..sigma_ref) adds, rms. Kinds: mixed = a real "
            "y1 vs a real y2 under one condition (the product's terms), on-on / off-off = two "
            "digits of the condition's own / the other class. Teacher loop: the teacher's relative energy by a straight line "
            "across at sigma (its score) minus the heat-equation reference (up to sigma_ref at one point, across, down at "
            "the other): a closed loop in (x, ln sigma), zero for a conservative teacher; err vs line: the student's error rms "
            "against that straight-line reference instead.")
    (out / "results.md").write_text(f"# Product levels split by component, pair kind and sigma range\n\nCommand: "
                                    f"`{cmd}`\n\n{note}\n\n{_table(rows)}\n" + (
        "" if not denoiser else "\n## Denoiser error against the teacher by condition\n\n|D_S - D_T|^2 / |x - D_T|^2 "
        "over the held-out digits, sigma log-uniform per bucket; condition: the digit's own class, a uniformly drawn "
        f"other class, the null token.\n\n{_denoiser_table(denoiser)}\n"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--students", nargs="+", required=True, help="name=path or path (name: the file's parent)")
    ap.add_argument("--classes", nargs=2, type=int, default=[1, 7])
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.05, 0.2, 1.0])
    ap.add_argument("--num-pairs", type=int, default=16)
    ap.add_argument("--sigma-ref", type=float, default=5.0)
    ap.add_argument("--edges", nargs="*", type=float, default=[0.2, 1.0])
    ap.add_argument("--nodes-per-range", type=int, default=12)
    ap.add_argument("--num-probes", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--denoiser", action="store_true", help="also the denoiser error by condition (own / other / null)")
    ap.add_argument("--path", choices=["fixed", "noising"], default="fixed",
                    help="the teacher's integration path: fixed points (image_claims levels) or x0 + s eps (typical "
                         "points of p_s at every s)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from teachers import load_teacher

    teacher = load_teacher(args.teacher)
    students = {}
    for spec in args.students:
        name, _, path = spec.rpartition("=")
        students[name or Path(path).parent.name] = load_energy(path)
    den = denoiser_errors(teacher, students, seed=args.seed) if args.denoiser else None
    rows = measure(teacher, students, args.classes, args.sigmas, p=args.num_pairs, sigma_ref=args.sigma_ref,
                   edges=args.edges, n_per=args.nodes_per_range, num_probes=args.num_probes, seed=args.seed,
                   path=args.path)
    cmd = "python benchmarks/image_level_parts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write(Path(args.out), cmd, vars(args), rows, den)
    return rows


if __name__ == "__main__":
    main()
