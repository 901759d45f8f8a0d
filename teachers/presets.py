"""Named 2D distributions: Du et al. 2023 appendix G (ring, strip, columns) and a recursive "fractal" mixture
in the spirit of Thornton et al. 2025 fig. 3 / Karras et al. 2024.

Du et al.'s text gives the ring's components a standard deviation of 0.3 at radius 0.5, which merges the ring
into a single blob; their figures show separated modes. `ring8()` therefore defaults to std 0.05 and takes
`std=0.3` for the literal setting.
"""

from __future__ import annotations

import math

import torch

from teachers.analytic import Box, GaussianMixture

__all__ = ["ring8", "strip", "columns_left", "columns_right", "fractal", "gaussian", "PRESETS", "make_preset"]


def _iso(means, std, dtype=torch.float64, **kw) -> GaussianMixture:
    means = torch.as_tensor(means, dtype=dtype)
    k, d = means.shape
    covs = (std**2) * torch.eye(d, dtype=dtype).expand(k, d, d).clone()
    return GaussianMixture(means, covs, dtype=dtype, **kw)


def ring8(radius: float = 0.5, std: float = 0.05, **kw) -> GaussianMixture:
    """8 equally weighted isotropic Gaussians on a circle (Du et al. appendix G, product experiment)."""
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return _iso(torch.stack([radius * ang.cos(), radius * ang.sin()], 1), std, **kw)


def strip(half_width: float = 0.1, half_height: float = 1.0, **kw) -> Box:
    """Uniform on [-0.1, 0.1] x [-1, 1] (Du et al. appendix G, product experiment)."""
    return Box([-half_width, -half_height], [half_width, half_height], **kw)


def columns_left(x: float = -0.25, std: float = 0.03, **kw) -> GaussianMixture:
    """3 Gaussians at (x, 0.5), (x, 0), (x, -0.5) with std 0.03 (Du et al. appendix G, mixture experiment)."""
    return _iso([[x, 0.5], [x, 0.0], [x, -0.5]], std, **kw)


def columns_right(x: float = 0.25, std: float = 0.03, **kw) -> GaussianMixture:
    return columns_left(x=x, std=std, **kw)


def gaussian(mean, cov, **kw) -> GaussianMixture:
    """A single Gaussian N(mean, cov) as a one-component mixture."""
    mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    if cov.ndim == 0:
        cov = cov * torch.eye(mean.shape[1], dtype=torch.float64)
    return GaussianMixture(mean, cov[None], **kw)


def fractal(depth: int = 4, per_branch: int = 3, angle: float = 0.45, shrink: float = 0.62,
            width: float = 0.03, **kw) -> GaussianMixture:
    """A binary tree of branches, each covered by `per_branch` Gaussians elongated along the branch.

    The trunk runs from (0, -1) upward with length 0.8; each branch spawns two children rotated by +-angle and
    scaled by `shrink`. Weights are proportional to branch length, so mass spreads over scales: a target where
    low-temperature sampling visibly concentrates mass on the thick branches.
    """
    means, covs, weights = [], [], []

    def grow(start, direction, length, level):
        end = start + length * direction
        for j in range(per_branch):
            t = (j + 0.5) / per_branch
            means.append(start + t * (end - start))
            along = (length / per_branch / 2) ** 2
            across = (width * (shrink ** level)) ** 2
            perp = torch.stack([-direction[1], direction[0]])
            covs.append(along * torch.outer(direction, direction) + across * torch.outer(perp, perp))
            weights.append(length / per_branch)
        if level + 1 < depth:
            for sgn in (1.0, -1.0):
                c, s = math.cos(sgn * angle), math.sin(sgn * angle)
                rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
                grow(end, rot @ direction, length * shrink, level + 1)

    grow(torch.tensor([0.0, -1.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64), 0.8, 0)
    return GaussianMixture(torch.stack(means), torch.stack(covs), torch.tensor(weights, dtype=torch.float64), **kw)


PRESETS = {
    "ring8": ring8,
    "strip": strip,
    "columns_left": columns_left,
    "columns_right": columns_right,
    "fractal": fractal,
}


def make_preset(name: str, **kwargs):
    """Build a named preset; an unknown name lists the available ones."""
    if name not in PRESETS:
        raise KeyError(f"unknown 2D preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](**kwargs)
