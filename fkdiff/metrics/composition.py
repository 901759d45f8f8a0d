"""Composition accuracy on `shapes` (Du et al. 2023, sec. 5.2, table 2: "an object at every requested position").

For generated images x_b and requested positions p_{b,1..M} (normalised (x, y) in [-1, 1], the `shapes` condition),

    hit_{b,m} = [an object centre lies within `tol` pixels of p_{b,m}]     (the exact detector of fkdiff.data.shapes)
    accuracy  = mean_b prod_m hit_{b,m},   se = sqrt(acc (1 - acc) / B)     (binomial standard error)

The detector is deterministic and exact on clean renders (`fkdiff.data.shapes.centre_map`); on samples it asks for a
full object core at the position and mostly background around it, so blobs and merged objects do not count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fkdiff.data.shapes import centre_map, _lookup

__all__ = ["CompositionScore", "composition_accuracy"]


@dataclass(frozen=True)
class CompositionScore:
    """hits `[B, M]` bool (object found at each requested position), all_hit `[B]` bool, accuracy (fraction of images
    with every requested object), se (its binomial standard error), per_position `[M]` (hit rate of each position
    when the positions are shared by the batch, else of each slot), num_objects `[B]` (detected centres per image)."""

    hits: Tensor
    all_hit: Tensor
    accuracy: float
    se: float
    per_position: Tensor
    num_objects: Tensor

    def summary(self) -> dict:
        return {"accuracy": self.accuracy, "se": self.se, "per_position": self.per_position.tolist(),
                "mean_num_objects": float(self.num_objects.float().mean()), "num_images": int(self.hits.shape[0])}


def composition_accuracy(images: Tensor, positions: Tensor, tol: int = 1, radius: int | None = None,
                         ring_fraction: float = 0.5) -> CompositionScore:
    """Score images `[B, 3, H, W]` (values about [-1, 1]) against requested positions `[M, 2]` (the same for every
    image) or `[B, M, 2]`; NaN rows of a `[B, M, 2]` request are ignored (count as found). See module docstring."""
    if not isinstance(positions, Tensor) or positions.ndim not in (2, 3) or positions.shape[-1] != 2:
        raise ValueError(f"positions must be [M, 2] or [B, M, 2] normalised (x, y), got "
                         f"{tuple(getattr(positions, 'shape', ()))}")
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got {tuple(getattr(images, 'shape', ()))}")
    b = images.shape[0]
    if b < 1:
        raise ValueError("composition_accuracy needs at least one image")
    pos = positions.to(torch.float32)
    if pos.ndim == 2:
        pos = pos[None].expand(b, -1, -1)
    elif pos.shape[0] != b:
        raise ValueError(f"images and positions disagree on the batch size: {b} vs {pos.shape[0]}")
    cmap = centre_map(images.detach().float().cpu(), radius, ring_fraction)  # [B, H, W]
    req = ~pos.isnan().any(-1)
    hits = _lookup(cmap, pos.cpu(), tol) | ~req
    all_hit = hits.all(1)
    acc = float(all_hit.double().mean())
    return CompositionScore(hits=hits, all_hit=all_hit, accuracy=acc, se=math.sqrt(acc * (1 - acc) / b),
                            per_position=hits.double().mean(0), num_objects=_count_centres(cmap))


def _count_centres(cmap: Tensor) -> Tensor:
    """Detected objects per image: 8-connected groups of centre pixels, each counted once (blurry samples can give a
    plateau of centre pixels). Exact connected components by max-label propagation. `[B]` long."""
    b, h, w = cmap.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, 1, h, w).expand(b, 1, h, w)
    mask = cmap[:, None].float()
    lab = ids * mask
    for _ in range(h * w):
        new = torch.nn.functional.max_pool2d(lab, 3, stride=1, padding=1) * mask
        if torch.equal(new, lab):
            break
        lab = new
    # a group's label is its largest pixel id: count the pixels that carry their own id
    return ((lab == ids) & (mask > 0)).flatten(1).sum(1)
