"""Is an image teacher's score conservative at a fixed sigma? Triangle loops of its line integral.

For a pair of real digits (x_a, x_b) noised to sigma and a third real digit x_c, the teacher's relative energy straight
across, line(a -> b), against the detour line(a -> c) + line(c -> b), each the line integral of the teacher's score
-(x - D(x, sigma, c)) / sigma^2 by 64 Gauss-Legendre nodes (`image_level_parts._line`). For a conservative score
(any energy student: checked to 0.1 nats) the loop is zero. `image_level_parts.py`'s "teacher loop" closes the loop
through sigma_ref with the heat equation instead; this one stays at sigma, so it isolates the score's own rotational
part. Pairs as in `image_level_parts.py` (same seed, same points).

    python benchmarks/image_teacher_loops.py --teacher T --out benchmarks/results/image_teacher_loops
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import image_level_parts as parts  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--classes", nargs=2, type=int, default=[1, 7])
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.05, 0.2, 1.0])
    ap.add_argument("--num-pairs", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from teachers import load_teacher

    teacher = load_teacher(args.teacher)
    y1, y2 = args.classes
    rows = []
    for sigma in args.sigmas:
        gen = torch.Generator().manual_seed(args.seed)
        pts = parts._points(8, args.classes, args.num_pairs, sigma, gen)
        x = torch.cat([pts[y1][0], pts[y2][0]]) + sigma * torch.cat([pts[y1][1], pts[y2][1]])
        p = pts[y1][0].shape[0]
        ia, ib = torch.arange(p), torch.arange(p, 2 * p)
        for c in args.classes:
            cc = torch.full((p,), c, dtype=torch.long)
            kinds = {f"mixed via {y1}": (ia, ib, ia.roll(3)), f"mixed via {y2}": (ia, ib, ib.roll(3)),
                     f"{y1}{y1} via {y1}": (ia, ia.roll(1), ia.roll(5)), f"{y2}{y2} via {y2}": (ib, ib.roll(1), ib.roll(5))}
            for kind, (a, b, m) in kinds.items():
                direct = parts._line(teacher, x[a], x[b], sigma, cc, n=64)
                via = parts._line(teacher, x[a], x[m], sigma, cc, n=64) + parts._line(teacher, x[m], x[b], sigma, cc, n=64)
                d = direct - via
                row = {"sigma": sigma, "cond": c, "pairs": kind, "direct_mean": float(direct.mean()),
                       "direct_rms": float(direct.pow(2).mean().sqrt()), "loop_mean": float(d.mean()),
                       "loop_rms": float(d.pow(2).mean().sqrt()), "num_pairs": p}
                rows.append(row)
                print(f"sigma {sigma:g} c={c} {kind:10s}: direct {row['direct_mean']:7.1f} (rms {row['direct_rms']:.1f})"
                      f" loop {row['loop_mean']:6.1f} rms {row['loop_rms']:.1f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "python benchmarks/image_teacher_loops.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "results.json").write_text(json.dumps({"command": cmd, "args": vars(args), "rows": rows}, indent=1))
    lines = ["| sigma | cond | pairs | straight-across mean (rms) | triangle loop mean | loop rms |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['sigma']:g} | {r['cond']} | {r['pairs']} | {r['direct_mean']:.1f} ({r['direct_rms']:.1f}) | "
              f"{r['loop_mean']:.1f} | **{r['loop_rms']:.1f}** |" for r in rows]
    (out / "results.md").write_text(
        f"# Triangle loops of the teacher's score at fixed sigma (nats; zero for a conservative score)\n\nCommand: "
        f"`{cmd}`\n\n{p} pairs per line; a real digit noised to sigma at each corner.\n\n" + "\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
