"""Diffusion conventions shared by every module (EDM, variance exploding; DESIGN.md section 2).

    x_sigma = x_0 + sigma * eps,       eps ~ N(0, I)
    D(x, sigma) = E[x_0 | x_sigma = x]                      (the denoiser)
    grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2       (Tweedie)

Everything here is a small pure function. The conversions between denoiser, score, eps-prediction
and the probability-flow ODE derivative exist once, here, and nowhere else.

Noise-level schedule (Karras et al. 2022, eq. 5):
    sigma_i = (smax^(1/rho) + i/(N-1) * (smin^(1/rho) - smax^(1/rho)))^rho,  i = 0..N-1, rho = 7.
Training noise distribution: ln sigma ~ N(P_mean, P_std^2); loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2.
EDM's defaults (Karras et al. 2022, table 1) are written once, as the constants SIGMA_MIN / SIGMA_MAX (the noise range
of teachers and students), P_MEAN / P_STD (training noise levels) and RHO below; the Hydra config reads them as
`${diffusion.sigma_min}`, ... (registered by `fkdiff.recipes`).
EDM preconditioning: c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd/sqrt(sigma^2+sd^2),
c_in = 1/sqrt(sigma^2+sd^2), c_noise = ln(sigma)/4.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SIGMA_MIN",
    "SIGMA_MAX",
    "P_MEAN",
    "P_STD",
    "RHO",
    "append_dims",
    "as_sigma",
    "check_sigma",
    "checked_sigma",
    "is_checked",
    "check_batch",
    "sigma_schedule",
    "restrict_normal",
    "sample_training_sigma",
    "sample_training_noise",
    "edm_loss_weight",
    "Precond",
    "edm_precond",
    "score_from_denoiser",
    "denoiser_from_score",
    "eps_from_denoiser",
    "denoiser_from_eps",
    "ode_derivative",
    "vp_sigma_from_alpha_bar",
    "vp_alpha_bar_from_sigma",
]

SIGMA_MIN = 0.002  # EDM's noise range [sigma_min, sigma_max] (Karras et al. 2022, table 1)
SIGMA_MAX = 80.0
P_MEAN = -1.2  # training noise levels: ln sigma ~ N(P_MEAN, P_STD^2)
P_STD = 1.2
RHO = 7.0  # the sampling schedule's exponent


def append_dims(t: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims to `t` (shape `[B]` or `[]`) so it broadcasts against an `ndim`-dim tensor."""
    if t.ndim > ndim:
        raise ValueError(f"append_dims: tensor has {t.ndim} dims, more than the target's {ndim}")
    return t.reshape(*t.shape, *([1] * (ndim - t.ndim)))


def check_batch(x: Tensor, event_ndim: int | None = None, name: str = "x") -> None:
    """Raise a clear error unless `x` is a floating tensor of shape `[B, *event]` (with `event_ndim` event dims)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with {name}.float()")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension, got a scalar")
    if event_ndim is not None and x.ndim != 1 + event_ndim:
        raise ValueError(
            f"{name} must have shape [B, *event] with {event_ndim} event dim(s), got shape {tuple(x.shape)}"
        )


_CHECKED = "_fkdiff_sigma_checked"


def check_sigma(sigma: Tensor) -> None:
    """Raise ValueError unless every entry of `sigma` is finite and > 0.

    The one place sigma values are validated. The checks depend on the data, so on a GPU each call waits for the
    device (a host sync): `as_sigma` calls it once where a user's value enters and marks the `[B]` tensor it returns
    as checked, so the models below it (compositions, students, teachers) pass it on without checking again.
    """
    if not torch.isfinite(sigma).all():
        raise ValueError("sigma must be finite")
    if (sigma <= 0).any():
        raise ValueError(f"sigma must be > 0 (got min {sigma.min().item():.3g}); the EDM convention has no sigma = 0 "
                         "level")


def checked_sigma(sigma: Tensor) -> Tensor:
    """Mark a `[B]` sigma tensor whose values the caller guarantees finite and > 0 (e.g. a slice of a checked one, or
    levels made by a validated schedule): `as_sigma` passes it through without `check_sigma`. Returns `sigma`."""
    setattr(sigma, _CHECKED, True)
    return sigma


def is_checked(sigma) -> bool:
    """Whether `sigma` is a tensor marked by `checked_sigma` / returned by `as_sigma`."""
    return bool(getattr(sigma, _CHECKED, False))


def as_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Return sigma as a `[B]` tensor on `x`'s device and dtype, with B = x.shape[0].

    Accepts a Python float, a 0-dim tensor, a `[1]` tensor or a `[B]` tensor. Raises ValueError for sigma <= 0,
    non-finite sigma (`check_sigma`, skipped for a tensor already checked: see `checked_sigma`), or a length that does
    not match the batch. The result is marked as checked.
    """
    b = x.shape[0]
    trusted = is_checked(sigma)
    # build Python numbers directly in x's dtype: torch.as_tensor(0.1) is float32 and would round sigma
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype) if not isinstance(sigma, Tensor) else sigma.to(
        device=x.device, dtype=x.dtype)
    if s.ndim == 0:
        s = s.expand(b)
    elif s.ndim == 1 and s.shape[0] in (1, b):
        s = s.expand(b)
    else:
        raise ValueError(
            f"sigma must be a float, a scalar tensor or a [B]={b} tensor, got shape {tuple(s.shape)}"
        )
    if not trusted:
        check_sigma(s)
    return checked_sigma(s)


def sigma_schedule(
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = RHO,
    append_zero: bool = False,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """EDM rho-schedule, decreasing from sigma_max to sigma_min (Karras et al. 2022, eq. 5). Shape `[num_steps(+1)]`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not (0 < sigma_min <= sigma_max):
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if num_steps == 1:
        sig = torch.tensor([sigma_max], dtype=dtype, device=device)
    else:
        i = torch.arange(num_steps, dtype=dtype, device=device)
        smax, smin = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
        sig = (smax + i / (num_steps - 1) * (smin - smax)) ** rho
        sig[0], sig[-1] = sigma_max, sigma_min  # exact end points
    if append_zero:
        sig = torch.cat([sig, sig.new_zeros(1)])
    return sig


def restrict_normal(z: Tensor, a: float, b: float) -> Tensor:
    """Standard normal draws `z` made draws of N(0, 1) truncated to [a, b], moving only those outside it.

    A draw outside [a, b] is placed at the same relative position of the truncated law's CDF that it had among the
    draws outside: with Phi the normal CDF and p_out = Phi(a) + 1 - Phi(b), its rank u = Phi(z) / p_out (z < a) or
    (Phi(a) + Phi(z) - Phi(b)) / p_out (z > b) is uniform on (0, 1) given z outside, and
    z' = Phi^-1(Phi(a) + u (Phi(b) - Phi(a))). The result is exactly truncated-normal (the moved mass lands with density
    proportional to the normal's), a draw inside [a, b] is unchanged, and the map is deterministic (same generator
    stream). Computed in float64; returns z's dtype.
    """
    if not a < b:
        raise ValueError(f"need a < b, got [{a}, {b}]")
    zd = z.to(torch.float64)
    ndtr, ndtri = torch.special.ndtr, torch.special.ndtri
    fa, qb = ndtr(torch.tensor(a, dtype=torch.float64)), ndtr(torch.tensor(-b, dtype=torch.float64))  # tails
    p_out = fa + qb
    if float(p_out) == 0.0:
        return z
    u = torch.where(zd < a, ndtr(zd), fa + qb - ndtr(-zd)) / p_out  # rank among the outside draws, in (0, 1)
    inside = ndtri((fa + u * (1 - qb - fa)).clamp(float(fa), float(1 - qb)))
    return torch.where((zd < a) | (zd > b), inside.clamp(a, b), zd).to(z.dtype)


def sample_training_sigma(
    n: int,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    sigma_range: tuple[float, float] | None = None,
) -> Tensor:
    """EDM training noise levels: ln sigma ~ N(p_mean, p_std^2), truncated to `sigma_range = (lo, hi)` when given
    (a teacher defined on [lo, hi] only; `restrict_normal`: draws inside are unchanged). Shape `[n]`."""
    z = torch.randn(n, generator=generator, device=device, dtype=dtype)
    if sigma_range is not None:
        lo, hi = (float(v) for v in sigma_range)
        if not 0 < lo < hi:
            raise ValueError(f"sigma_range must satisfy 0 < lo < hi, got {sigma_range}")
        z = restrict_normal(z, (math.log(lo) - p_mean) / p_std, (math.log(hi) - p_mean) / p_std)
    return (p_mean + p_std * z).exp()


def sample_training_noise(
    x0: Tensor,
    generator: torch.Generator,
    p_mean: float = P_MEAN,
    p_std: float = P_STD,
    shard: tuple[int, int] = (0, 1),
    sigma_range: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """(sigma `[B]`, eps `[B, *event]`) for the rows `x0 [B, *event]`, on x0's device and dtype.

    Drawn on the CPU from `generator` (a CPU generator, so the numbers do not depend on the device): first the global
    batch's ln sigma ~ N(p_mean, p_std^2) (truncated to `sigma_range` when given), then its eps ~ N(0, I). With
    `shard = (rank, world_size)`, x0 holds rows rank, rank + w, ... of a global batch of B * w rows: the noise of the
    whole global batch is drawn and the same rows are kept, so a row's noise does not depend on the number of processes.
    """
    rank, world = shard
    n = x0.shape[0] * world
    sigma = sample_training_sigma(n, p_mean, p_std, generator=generator,
                                  sigma_range=sigma_range)[rank::world].to(x0)
    eps = torch.randn((n, *x0.shape[1:]), generator=generator, dtype=x0.dtype)[rank::world].to(x0.device)
    return sigma, eps


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma * sd)^2 (Karras et al. 2022, table 1)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class Precond(NamedTuple):
    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def edm_precond(sigma: Tensor, sigma_data: float) -> Precond:
    """EDM preconditioning coefficients (Karras et al. 2022, table 1), same shape as sigma."""
    s2 = sigma**2 + sigma_data**2
    return Precond(
        c_skip=sigma_data**2 / s2,
        c_out=sigma * sigma_data / s2.sqrt(),
        c_in=1 / s2.sqrt(),
        c_noise=sigma.log() / 4,
    )


def _b(sigma: float | Tensor, x: Tensor) -> Tensor:
    return append_dims(as_sigma(sigma, x), x.ndim)


def score_from_denoiser(denoised: Tensor, x: Tensor, sigma: float | Tensor) -> Tensor:
    """Tweedie: grad log p_sigma(x) = (D(x, sigma) - x) / sigma^2."""
    s = _b(sigma, x)
    return (denoised - x) / s**2


def denoiser_from_score(score: Tensor, x: Tensor, sigma: float | Tensor) -> Tensor:
    """D(x, sigma) = x + sigma^2 * score."""
    s = _b(sigma, x)
    return x + s**2 * score


def eps_from_denoiser(denoised: Tensor, x: Tensor, sigma: float | Tensor) -> Tensor:
    """eps_hat = (x - D) / sigma."""
    s = _b(sigma, x)
    return (x - denoised) / s


def denoiser_from_eps(eps: Tensor, x: Tensor, sigma: float | Tensor) -> Tensor:
    """D = x - sigma * eps_hat."""
    s = _b(sigma, x)
    return x - s * eps


def ode_derivative(x: Tensor, denoised: Tensor, sigma: float | Tensor) -> Tensor:
    """Probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 4 with s(t)=1, sigma(t)=t)."""
    s = _b(sigma, x)
    return (x - denoised) / s


def vp_sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """VP (DDPM) cumulative alpha -> EDM sigma: sigma = sqrt((1 - abar) / abar)."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def vp_alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """EDM sigma -> VP cumulative alpha: abar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def log_normal_pdf_isotropic(x: Tensor, mean: Tensor | float, var: Tensor | float) -> Tensor:
    """log N(x; mean, var I) summed over event dims. `x` `[B, *event]`, `var` scalar or `[B]`. Returns `[B]`."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    d = x[0].numel()
    diff2 = ((x - mean) ** 2).flatten(1).sum(1)
    var_b = var if var.ndim == 0 else var.reshape(-1)
    return -0.5 * diff2 / var_b - 0.5 * d * (torch.log(var_b) + math.log(2 * math.pi))
