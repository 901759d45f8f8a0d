"""Image metrics from the command line, on the `samples.pt` that `python -m fkdiff.sample` writes (or any file holding
an image tensor `[B, C, H, W]` in [-1, 1], or a dict with one under `--key`).

    python -m fkdiff.metrics train-classifier --size 8 --out runs/classifier_digits8.pt
    python -m fkdiff.metrics classifier RUN/samples.pt --classifier runs/classifier_digits8.pt [--label 3]
    python -m fkdiff.metrics shapes RUN/samples.pt --positions="0.5,0.5;-0.5,-0.5"
    python -m fkdiff.metrics fid REAL.pt RUN/samples.pt [--weights <inception .pth>]

`classifier`: confidence, entropy, class counts (accuracy against `--label`) and the classifier-feature Fréchet
distance to the real digits validation split of the same size (offline; *not* FID). `shapes`: the composition
accuracy of Du et al. table 2 (an object at every requested position, normalised (x, y) in [-1, 1]). `fid`: FID/KID
through torchmetrics (extra `fid`). Each prints one JSON object and, with `--out`, writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load_images(path: str | Path, key: str = "resampled") -> torch.Tensor:
    """The image tensor `[B, C, H, W]` in a .pt file: the tensor itself, or `obj[key]` of a dict (fkdiff.sample writes
    `resampled` = the equally weighted SMC samples). Loaded with `weights_only=True` (no code runs from the file)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        if key not in obj:
            raise KeyError(f"{path} holds {sorted(obj)}; pick one with --key")
        obj = obj[key]
    if not isinstance(obj, torch.Tensor) or obj.ndim != 4:
        raise ValueError(f"{path}: expected images [B, C, H, W], got {type(obj).__name__} "
                         f"{tuple(getattr(obj, 'shape', ()))}")
    return obj.float()


def _positions(text: str) -> torch.Tensor:
    """'x,y;x,y;...' -> `[M, 2]`."""
    values = [s for s in text.replace(" ", ";").split(";") if s]
    try:
        pts = [[float(v) for v in s.split(",")] for s in values]
    except ValueError:
        raise SystemExit(f"--positions: expected x,y pairs such as 0.5,-0.25, got {values}") from None
    if any(len(p) != 2 for p in pts):
        raise SystemExit(f"--positions: expected x,y pairs, got {values}")
    return torch.tensor(pts)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fkdiff.metrics", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train-classifier", help="train the offline digits classifier (a few seconds on CPU)")
    t.add_argument("--size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--out", required=True)
    c = sub.add_parser("classifier", help="digits classifier scores + classifier-feature Frechet distance")
    c.add_argument("samples")
    c.add_argument("--classifier", required=True)
    c.add_argument("--label", type=int, default=None)
    c.add_argument("--key", default="resampled")
    c.add_argument("--out", default=None)
    s = sub.add_parser("shapes", help="composition accuracy on shapes samples")
    s.add_argument("samples")
    s.add_argument("--positions", required=True,
                   help="requested positions 'x,y;x,y' (normalised, [-1, 1]); write --positions=... when x < 0")
    s.add_argument("--tol", type=int, default=1)
    s.add_argument("--key", default="resampled")
    s.add_argument("--out", default=None)
    f = sub.add_parser("fid", help="FID/KID via torchmetrics (extra `fid`; Inception weights from the torch cache)")
    f.add_argument("real")
    f.add_argument("samples")
    f.add_argument("--weights", default=None)
    f.add_argument("--weights-sha256", default=None, help="the weights file's expected sha256 (checked first)")
    f.add_argument("--key", default="resampled")
    f.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from fkdiff import metrics as M

    if args.cmd == "train-classifier":
        clf = M.train_digits_classifier(args.size, seed=args.seed, steps=args.steps)
        M.save_classifier(clf, args.out)
        out = {"path": str(args.out), **clf.report}
    elif args.cmd == "classifier":
        from fkdiff.metrics.classifier import _digits_split

        x = load_images(args.samples, args.key)
        clf = M.load_classifier(args.classifier)
        _, _, xva, yva = _digits_split(x.shape[-1], 0)
        ref = xva if args.label is None else xva[yva == args.label]
        out = {"samples": str(args.samples), "num_samples": int(x.shape[0]),
               **M.classifier_scores(clf, x, args.label).summary(),
               "classifier_frechet_distance": M.classifier_frechet_distance(clf, x, ref.float()),
               "reference": f"digits validation split, size {x.shape[-1]}" +
                            ("" if args.label is None else f", class {args.label}")}
    elif args.cmd == "shapes":
        x = load_images(args.samples, args.key)
        out = {"samples": str(args.samples), "positions": _positions(args.positions).tolist(),
               **M.composition_accuracy(x, _positions(args.positions), tol=args.tol).summary()}
    else:
        real, fake = load_images(args.real, args.key), load_images(args.samples, args.key)
        out = {"real": str(args.real), "samples": str(args.samples), **M.fid_kid(real, fake, weights_path=args.weights,
                                                                           weights_sha256=args.weights_sha256)}
    text = json.dumps(out, indent=1)
    print(text)
    if getattr(args, "out", None) and args.cmd != "train-classifier":
        Path(args.out).write_text(text)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
