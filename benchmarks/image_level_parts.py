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
from fkdiff.levels import _gauss_legendre, teacher_time_score, time_score  # noqa: E402


def _points(size: int, classes, p: int, sigma: float, gen: torch.Generator) -> dict[int, torch.Tensor]:
    from fkdiff.metrics.classifier import _digits_split

    _, _, xva, yva = _digits_split(size, 0)
    out = {}
    for c in classes:
        x0 = xva[yva == c][:p].float()
        out[c] = x0 + sigma * torch.randn(x0.shape, generator=gen)
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


def measure(teacher, students: dict, classes, sigmas, *, p: int, sigma_ref: float, edges, n_per: int,
            num_probes: int, seed: int) -> list[dict]:
    y1, y2 = classes
    rows = []
    for sigma in sigmas:
        gen = torch.Generator().manual_seed(seed)
        pts = _points(8, classes, p, sigma, gen)
        x = torch.cat([pts[y1], pts[y2]])  # [2p]: y1 digits then y2 digits
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
                sv = torch.full((n,), s)
                for r in range(2):
                    ht[r, k] += w * teacher_time_score(teacher, x, sv, cc, divergence="hutchinson",
                                                       num_probes=num_probes, generator=gen).double()
                for name, st in students.items():
                    hs[name][k] += w * time_score(st, x, sv, cc, create_graph=False).double()
            ia, ib = torch.arange(p), torch.arange(p, 2 * p)
            pairs = {"mixed": (ia, ib), f"{y1}{y1}": (ia, ia.roll(1)), f"{y2}{y2}": (ib, ib.roll(1))}
            for kind, (a, b) in pairs.items():
                line = _line(teacher, x[a], x[b], sigma_ref, cc[a])
                te = line[None] - (ht[:, :, a].sum(1) - ht[:, :, b].sum(1))  # [2, P]: two estimates
                on = {"mixed": "mixed", f"{c}{c}": "on-on"}.get(kind, "off-off")
                for name, st in students.items():
                    with torch.no_grad():
                        se = (st.energy(x[a], sigma, cc[a]) - st.energy(x[b], sigma, cc[b])).double()
                        sref = (st.energy(x[a], sigma_ref, cc[a]) - st.energy(x[b], sigma_ref, cc[b])).double()
                    e = se[None] - te  # [2, P]
                    dq = (hs[name][:, a] - hs[name][:, b])[None] - (ht[:, :, a] - ht[:, :, b])  # [2, nk, P]

                    def xrms(v):  # cross-fitted rms of two estimates v[0], v[1] of one quantity
                        return float((v[0] * v[1]).mean().clamp(min=0).sqrt())

                    row = {"student": name, "sigma": sigma, "cond": c, "pairs": kind, "kind": on, "num_pairs": p,
                           "teacher_dE_mean": float(te.mean()), "student_dE_mean": float(se.mean()),
                           "error_rms": xrms(e), "error_mean": float(e.mean()),
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


def _table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("num_pairs",)]
    allk = []
    for r in rows:
        allk += [k for k in r if k not in allk and k != "num_pairs"]
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(allk) + " |", "|" + "---|" * len(allk)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in allk) + " |" for r in rows]
    del keys
    return "\n".join(lines)


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
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from teachers import load_teacher

    teacher = load_teacher(args.teacher)
    students = {}
    for spec in args.students:
        name, _, path = spec.rpartition("=")
        students[name or Path(path).parent.name] = load_energy(path)
    rows = measure(teacher, students, args.classes, args.sigmas, p=args.num_pairs, sigma_ref=args.sigma_ref,
                   edges=args.edges, n_per=args.nodes_per_range, num_probes=args.num_probes, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/image_level_parts.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"command": cmd, "args": vars(args), "rows": rows}, indent=1))
    (out / "results.md").write_text(f"# Product levels split by component, pair kind and sigma range\n\nCommand: `{cmd}`"
                                    f"\n\n{_table(rows)}\n")
    return rows


if __name__ == "__main__":
    main()
