"""The distillation loss (DESIGN.md section 4; docs/conventions.md): the Helmholtz projection of a teacher's score.

    L(theta) = E_{sigma, x_0, eps} [ lambda(sigma) | D_theta(x_sigma, sigma) - stopgrad(D_teacher(x_sigma, sigma)) |^2 ]
    x_sigma = x_0 + sigma eps,   ln sigma ~ N(P_mean, P_std^2),   lambda = (sigma^2 + sd^2) / (sigma sd)^2   (EDM)

In score terms this is lambda sigma^4 |grad E_theta + s_teacher|^2, whose minimiser over scalar E is the L2(p_sigma)
projection of the teacher's score onto gradient fields (Thornton et al. 2025, sec. 3; weighted Helmholtz-Hodge).
The E-DSM baseline (energy-parameterised denoising score matching, Thornton et al. fig. 2) is the same loss with the
target x_0 instead of D_teacher: `target="data"` changes nothing else (same sigma, same noise, same weighting).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from fkdiff.diffusion import P_MEAN, P_STD, append_dims, edm_loss_weight, sample_training_noise

__all__ = ["LossOutput", "DenoiserMatchingLoss", "denoise", "split_batch"]


def denoise(denoiser: Callable, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    """`denoiser(x, sigma)`, or `denoiser(x, sigma, cond)` when there is a condition."""
    return denoiser(x, sigma) if cond is None else denoiser(x, sigma, cond)


def split_batch(batch) -> tuple[Tensor, Any]:
    """(x0, cond) from a datamodule batch `{"x": ..., "cond": ...}`, a tuple `(x0, cond)` or a bare tensor."""
    if isinstance(batch, dict):
        return batch["x"], batch.get("cond")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class LossOutput(NamedTuple):
    loss: Tensor      # [B] lambda(sigma) |D_theta - target|^2 (summed over event dims)
    sigma: Tensor     # [B]
    x_noisy: Tensor   # [B, *event]
    denoised: Tensor  # [B, *event] D_theta(x_noisy, sigma), with graph
    target: Tensor    # [B, *event] D_teacher(x_noisy, sigma) or x_0


class DenoiserMatchingLoss:
    """Per-sample lambda(sigma) |D_theta(x_0 + sigma eps, sigma) - target|^2 (module docstring).

    target: "teacher" (distillation, D_teacher(x_sigma)) or "data" (E-DSM, x_0).
    weighting: "edm" (lambda = (sigma^2 + sd^2)/(sigma sd)^2) or "uniform" (lambda = 1/sigma^2, the eps-MSE).
    sigma_range: (lo, hi) truncates the sigma law to the teacher's range (a DDPM teacher is defined on its schedule's
    [sigma_0, sigma_{T-1}] only); None: the full log-normal.
    """

    def __init__(self, sigma_data: float, target: str = "teacher", p_mean: float = P_MEAN, p_std: float = P_STD,
                 weighting: str = "edm", sigma_range: tuple[float, float] | None = None):
        if target not in ("teacher", "data"):
            raise ValueError(f"distill.target must be 'teacher' (distillation) or 'data' (E-DSM), got {target!r}")
        if weighting not in ("edm", "uniform"):
            raise ValueError(f"distill.weighting must be 'edm' or 'uniform', got {weighting!r}")
        self.sigma_data, self.target = float(sigma_data), target
        self.p_mean, self.p_std, self.weighting = float(p_mean), float(p_std), weighting
        self.sigma_range = None if sigma_range is None else (float(sigma_range[0]), float(sigma_range[1]))

    def weight(self, sigma: Tensor) -> Tensor:
        return edm_loss_weight(sigma, self.sigma_data) if self.weighting == "edm" else sigma**-2

    def draw(self, x0: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
        """(sigma `[B]`, eps `[B, *event]`) for x0's rows of the global batch (`fkdiff.diffusion.sample_training_noise`)."""
        return sample_training_noise(x0, generator, self.p_mean, self.p_std, shard, self.sigma_range)

    def __call__(self, student: Callable, teacher: Callable | None, x0: Tensor, cond: Any,
                 generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> LossOutput:
        sigma, eps = self.draw(x0, generator, shard)
        x_noisy = x0 + append_dims(sigma, x0.ndim) * eps
        if self.target == "teacher":
            if teacher is None:
                raise ValueError("distill.target=teacher needs a teacher")
            with torch.no_grad():
                target = denoise(teacher, x_noisy, sigma, cond).to(x0.dtype)
        else:
            target = x0
        denoised = student(x_noisy, sigma, cond)  # graph kept iff the student is training
        loss = self.weight(sigma) * (denoised - target).flatten(1).pow(2).sum(1)
        return LossOutput(loss, sigma, x_noisy, denoised, target)
