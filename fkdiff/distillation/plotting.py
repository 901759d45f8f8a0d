"""Figures of distilled students: learnt densities exp(-E_theta) on a 2D grid, probability-flow ODE samples, image grids.

`euler_sample` draws ODE samples by Euler steps on the EDM rho-schedule (Karras et al. 2022, alg. 1 without the Heun
correction); it is for plots only (the samplers of record are `fkdiff.smc` and `fkdiff.samplers`).
Figures are matplotlib figures (Agg backend); the caller saves and closes them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN, ode_derivative, sigma_schedule
from fkdiff.distillation.loss import denoise

__all__ = ["euler_sample", "energy_grid", "image_grid_figure", "sample_figure", "plot_densities"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def euler_sample(denoiser: Callable, shape: Sequence[int], generator: torch.Generator, *, num_steps: int = 32,
                 sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, cond: Any = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """Probability-flow ODE samples by Euler steps on the EDM rho-schedule, for validation plots only.
    `shape` = (N, *event); returns `[N, *event]`."""
    sigmas = sigma_schedule(num_steps, sigma_min, sigma_max, append_zero=True).tolist()
    x = torch.randn(tuple(shape), generator=generator) * sigmas[0]
    x = x.to(device)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        d = denoise(denoiser, x, sig, cond).detach()
        x = x + (s_next - s) * ode_derivative(x, d, sig)
    return x


def energy_grid(model: Any, lim: float, n: int, sigma: float, device="cpu") -> Tensor:
    """exp(-E) of `model.energy` on an n x n grid over [-lim, lim]^2, normalised to sum 1. `[n, n]` indexed [ix, iy]."""
    t = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(device)
    with torch.no_grad():
        e = model.energy(pts, sigma).double().cpu()
    return torch.softmax(-e, 0).reshape(n, n)


def image_grid_figure(xs: Tensor):
    """A square grid of images `[N, C, H, W]` with values in about [-1, 1]."""
    plt = _pyplot()
    n = xs.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = ((xs[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
    return fig


def sample_figure(student: Any, x0: Tensor, cond: Any, generator: torch.Generator, *, num_steps: int = 32,
                  num_samples: int | None = None, lim: float = 1.5, sigma: float = 0.05, grid: int = 100,
                  device: torch.device | str = "cpu"):
    """2D: exp(-E_theta) at `sigma` on a grid + ODE samples over the data `x0`; images: a grid of ODE samples (one per
    condition of `cond` when given). None for other event shapes. The student is put in eval mode meanwhile."""
    plt = _pyplot()
    event = tuple(student.event_shape)
    n = int(num_samples or (512 if len(event) == 1 else 16))
    was_training = student.training
    student.eval()
    try:
        if event == (2,):
            fig, ax = plt.subplots(1, 2, figsize=(8, 4))
            dens = energy_grid(student, lim, grid, sigma, device)
            ax[0].imshow(dens.T, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
            ax[0].set_title(f"exp(-E_theta), sigma={sigma:g}")
            xs = euler_sample(student, (n, 2), generator, num_steps=num_steps, sigma_min=student.sigma_min,
                              sigma_max=student.sigma_max, device=device).cpu()
            ax[1].scatter(x0[:, 0], x0[:, 1], s=2, alpha=0.3, label="data")
            ax[1].scatter(xs[:, 0], xs[:, 1], s=2, alpha=0.5, label="student ODE")
            ax[1].set_xlim(-lim, lim), ax[1].set_ylim(-lim, lim), ax[1].legend(loc="upper right")
            return fig
        if len(event) == 3:
            c = None if cond is None else cond[:n]
            n = n if c is None else len(c)
            xs = euler_sample(student, (n, *event), generator, num_steps=num_steps, sigma_min=student.sigma_min,
                              sigma_max=student.sigma_max, cond=c, device=device).cpu()
            return image_grid_figure(xs)
        return None
    finally:
        student.train(was_training)


def plot_densities(rows: Sequence[tuple[str, Any, Any]], path: str | Path, sigma: float, lim: float = 1.5,
                   grid: int = 120) -> Path:
    """Learnt exp(-E_theta(x, sigma)) beside the true exp(-E(x, sigma)): one row per (name, exact model, student)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rows), 2, figsize=(6, 3 * len(rows)), squeeze=False)
    for row, (name, exact, student) in zip(axes, rows):
        for ax, model, title in ((row[0], exact, "true"), (row[1], student, "student exp(-E)")):
            dens = energy_grid(model, lim, grid, sigma)
            ax.imshow(dens.T.numpy(), origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
            ax.set_title(f"{name}: {title}, sigma={sigma:g}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
