"""Figures of sampling runs (what `python -m fkdiff.sample` writes as samples.png and diagnostics.png).

`samples_figure`: for 2D samples, the target density exp(-E(x, sigma_min)) on a grid with the equally weighted SMC
samples over it (and, optionally, another sampler's points beside them); for image samples `[N, C, H, W]` in
[-1, 1], a grid of up to 64 of them (`image_grid`), other samplers' grids beside it.
`diagnostics_figure`: ESS after weighting, unique ancestors and MCMC acceptance
per level (level 0 = sigma_max, the last = sigma_min). Both return a matplotlib Figure (Agg backend); `save` writes
and closes one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["samples_figure", "image_grid", "diagnostics_figure", "save"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def samples_figure(target: Any, samples: Tensor, *, sigma: float, lim: float = 1.5, others: dict | None = None,
                   title: str | None = None, max_batch: int | None = None, grid: int = 200):
    """2D `samples` `[N, 2]` over exp(-E(x, sigma)) of `target` on [-lim, lim]^2, one panel per entry of `others`
    (name -> points `[M, 2]`) beside them; images `[N, C, H, W]`: a grid per panel. None for other shapes."""
    plt = _pyplot()
    x = samples.detach().cpu().float()
    if x.ndim == 2 and x.shape[1] == 2:
        from fkdiff import targets

        g = torch.linspace(-lim, lim, grid, dtype=torch.float64)
        xx, yy = torch.meshgrid(g, g, indexing="xy")
        pts = torch.stack([xx.flatten(), yy.flatten()], 1)
        e = targets.energy(target, pts, float(sigma), max_batch=max_batch)
        dens = torch.softmax(-e.double(), 0).reshape(grid, grid)
        panels = [("target exp(-E) at sigma_min", None), ("SMC (this run)", x)]
        panels += [(name, pts_.detach().cpu().float()) for name, pts_ in (others or {}).items()]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
        for ax, (name, pts_) in zip(axes, panels):
            ax.imshow(dens.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="Blues")
            if pts_ is not None:
                ax.scatter(pts_[:, 0], pts_[:, 1], s=2, c="tab:orange", alpha=0.6)
            ax.set_title(name)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
    elif x.ndim == 4:
        panels = [("SMC (this run, resampled)", x)]
        panels += [(name, o.detach().cpu().float()) for name, o in (others or {}).items()]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.4), squeeze=False)
        for ax, (name, imgs) in zip(axes[0], panels):
            ax.axis("off")
            grid = image_grid(imgs[:64])
            ax.imshow(grid.squeeze(-1).numpy(), cmap="gray" if grid.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_title(name, fontsize=9)
    else:
        return None
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def image_grid(x: Tensor, pad: int = 1) -> Tensor:
    """Images `[B, C, H, W]` in [-1, 1] tiled into one `[rows (H + pad), cols (W + pad), C]` array in [0, 1] (a square
    grid, row-major, gaps mid-grey)."""
    x = ((x.detach().cpu().float().clamp(-1, 1) + 1) / 2)
    b, c, h, w = x.shape
    k = max(1, int(math.ceil(math.sqrt(b))))
    out = torch.full((k * (h + pad), k * (w + pad), c), 0.5)
    for i in range(b):
        r, q = divmod(i, k)
        out[r * (h + pad):r * (h + pad) + h, q * (w + pad):q * (w + pad) + w] = x[i].permute(1, 2, 0)
    return out


def diagnostics_figure(result: Any):
    """ESS after weighting, unique ancestors and MCMC acceptance per level of an `SMCResult`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3))
    lev = range(len(result.ess))
    axes[0].plot(lev, result.ess.cpu().numpy())
    axes[0].set_title("ESS after weighting")
    axes[1].plot(lev, result.unique_ancestors.cpu().numpy())
    axes[1].set_title("unique ancestors")
    if result.acceptance is not None:
        axes[2].plot(lev, result.acceptance.cpu().numpy())
    axes[2].set_title("MCMC acceptance")
    for ax in axes:
        ax.set_xlabel("level (sigma_max -> sigma_min)")
    fig.tight_layout()
    return fig


def save(fig, path: str | Path, dpi: int = 100) -> None:
    """Write `fig` to `path` and close it."""
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
