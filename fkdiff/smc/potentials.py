"""Potentials w_{j,t}(x) multiplying the SMC targets (DESIGN.md section 5), at levels t = 0 (sigma_max), ..., T - 1
(sigma_min), the engine's order:

    gamma_t(x) = exp(-E(x, sigma_t)) * prod_j w_{j,t}(x)        ("sampler" mode)
    log G_t = sum_j log w_{j,t}(x_t) - log w_{j,t-1}(x_{t-1})   ("twisted" mode, telescoping)

In both modes only the last level's potential changes the final law; earlier ones only guide the particles.

- `Box(low, high)`: at the last level the hard indicator 1[x_out in box], where x_out is the sample that will be
  *returned* (the denoised point D(x, sigma_min) when `final_denoise=True`, else x). Evaluating the indicator on the
  returned point, i.e. after the final denoise, guarantees zero violations and makes the returned law exactly "what
  the sampler returns without the box, conditioned on the box". Before the last level it is the box smoothed at
  sigma_t, w_t(x) = prod_i [Phi((h_i - x_i)/sigma_t) - Phi((l_i - x_i)/sigma_t)] = P(x + sigma_t eps in box),
  computed as a difference of normal CDFs in log space in float64 (stable in both tails, Box teacher convention).
- `Polytope(A, b)`: the linear inequalities A x <= b (rows a_i over the flattened event; one row is a half-space),
  hard at the last level on x_out like `Box`; before it, w_t(x) = prod_i Phi((b_i - a_i . x) / (sigma_t |a_i|)), the
  probability that x + sigma_t eps satisfies each inequality (exact for one half-space; for several rows the product
  over them, which only guides the particles: the final law is set by the last level's hard indicator alone).
- `LowTemperature(beta, ramp=1)`: w_t = exp(-(beta - 1) lambda_t E(x, sigma_t)), lambda_t = (t / (T - 1))^ramp rising
  from 0 at the first level (sigma_max) to 1 at the last (sigma_min). In "twisted" mode without MCMC the terminal law
  is the proposal's terminal law times p^(beta-1), i.e. approximately p^beta (Thornton et al. 2025, fig. 3; FK
  steering). With MCMC moves (which target p_sigma_t w_t) the twisted weights lack the base model's kernel ratio, a
  discretisation bias of log Z that grows with the dimension; "sampler" mode keeps it (exact weights for the path
  p_sigma_t^(1 + (beta - 1) lambda_t)). A linear ramp tempers overlapping modes at intermediate sigma and can empty
  the lighter or narrower one; `fkdiff.smc.adaptive` uses ramp=3 (README, "Low temperature").
- `LogPotential(fn, final_fn=None)`: the generic hook, log w_t(x) = fn(x, sigma_t) `[N]`; at the last level
  `final_fn` (default `fn`) evaluated on the returned point x_out. Plain callables in `potentials=` are wrapped in it.

`build({kind: <a POTENTIALS name>, **arguments})` makes one from a config spec (the command line's
`sample.potentials`); a new potential class is usable from the command line once it is registered in `POTENTIALS`.

Each potential receives a `Level` (index, number of levels, sigma, whether final, the target's energy and score at
x, and x_out at the last level) and returns float64 log-weights `[N]`; `log_potential_and_grad` adds grad_x log w
(used by MCMC rejuvenation; at the last level the gradient of a function of x_out is taken w.r.t. x_out and used as
the gradient w.r.t. x, which only changes the MCMC proposal, not its Metropolis-corrected invariant law).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from fkdiff.special import box_log_mass, box_log_mass_grad, log_ndtr_diff  # noqa: F401  (log_ndtr_diff re-exported)

__all__ = ["Level", "Potential", "Box", "Polytope", "LowTemperature", "LogPotential", "as_potential", "log_ndtr_diff", "POTENTIALS",
           "build"]


@dataclass(frozen=True)
class Level:
    """Context passed to a potential at SMC level `index` (0 = sigma_max, num_levels - 1 = sigma_min).

    energy `[N]` float64 and score `[N, *event]` are the target's at x and sigma; x_out is the point that will be
    returned (only at the final level, else None).
    """

    index: int
    num_levels: int
    sigma: float
    final: bool
    energy: Tensor | None = None
    score: Tensor | None = None
    x_out: Tensor | None = None

    @property
    def progress(self) -> float:
        """0 at the first level, 1 at the last (linear in the level index)."""
        return 1.0 if self.num_levels <= 1 else self.index / (self.num_levels - 1)


class Potential:
    """Base class: subclasses implement `log_potential(x, level) -> [N] float64`."""

    def log_potential(self, x: Tensor, level: Level) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_event_shape(self, shape: tuple[int, ...]) -> None:
        """Raise a ValueError when the potential cannot apply to particles of event shape `shape` (checked once, when
        the Feynman–Kac model is built). The default accepts any shape."""

    def log_potential_and_grad(self, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        """(log w `[N]` float64, grad_x log w `[N, *event]`), by autograd unless overridden. Non-finite grads -> 0."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lw = self.log_potential(xg, level)
            if lw.requires_grad:
                (g,) = torch.autograd.grad(lw.sum(), xg, allow_unused=True)
                g = torch.zeros_like(x) if g is None else g
            else:
                g = torch.zeros_like(x)
        g = torch.nan_to_num(g.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        return lw.detach().double(), g


class Box(Potential):
    """Box constraint low <= x <= high (bounds broadcast against the event shape): hard at the last level, the box
    smoothed at sigma_t before (see the module docstring). `soft_scale` multiplies sigma_t in the smoothing."""

    def __init__(self, low, high, *, soft_scale: float = 1.0):
        self.low = torch.as_tensor(low, dtype=torch.float64)
        self.high = torch.as_tensor(high, dtype=torch.float64)
        if self.low.shape != self.high.shape:
            raise ValueError(f"low and high must have the same shape, got {tuple(self.low.shape)} and "
                             f"{tuple(self.high.shape)}")
        if not (self.high > self.low).all():
            raise ValueError("Box needs high > low in every coordinate")
        if not soft_scale > 0:
            raise ValueError(f"soft_scale must be > 0, got {soft_scale}")
        self.soft_scale = float(soft_scale)

    def _bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.low.to(x.device), self.high.to(x.device)

    def check_event_shape(self, shape: tuple[int, ...]) -> None:
        try:
            fits = torch.broadcast_shapes(tuple(self.low.shape), tuple(shape)) == tuple(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"Box bounds of shape {tuple(self.low.shape)} do not fit particles of event shape "
                             f"{tuple(shape)} (the bounds must broadcast to it, e.g. {len(shape) and shape[-1]} "
                             f"numbers for a {tuple(shape)} target)")

    def contains(self, x: Tensor) -> Tensor:
        """`[N]` bool: every coordinate of x `[N, *event]` inside the closed box."""
        low, high = self._bounds(x)
        xd = x.double()
        return ((xd >= low) & (xd <= high)).flatten(1).all(1)

    def log_potential(self, x: Tensor, level: Level) -> Tensor:
        if level.final:
            pt = x if level.x_out is None else level.x_out
            inside = self.contains(pt)
            return torch.where(inside, 0.0, -math.inf).to(torch.float64)
        low, high = self._bounds(x)
        return box_log_mass(x.double(), low, high, level.sigma * self.soft_scale).flatten(1).sum(1)

    def log_potential_and_grad(self, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        lw = self.log_potential(x, level)
        if level.final:
            return lw, torch.zeros_like(x)
        low, high = self._bounds(x)
        g = box_log_mass_grad(x.double(), low, high, level.sigma * self.soft_scale)
        return lw, torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).to(x.dtype)


class Polytope(Potential):
    """Linear inequalities A x <= b over the flattened event (A `[m, D]` or `[D]` for one half-space, b `[m]`): hard at
    the last level, smoothed at sigma_t before (see the module docstring). `soft_scale` multiplies sigma_t."""

    def __init__(self, A, b, *, soft_scale: float = 1.0):
        A = torch.as_tensor(A, dtype=torch.float64)
        A = A[None] if A.ndim == 1 else A
        b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
        if A.ndim != 2 or b.shape != (A.shape[0],):
            raise ValueError(f"Polytope needs A [m, D] and b [m], got A {tuple(A.shape)} and b {tuple(b.shape)}")
        norms = A.norm(dim=1)
        if not (torch.isfinite(A).all() and torch.isfinite(b).all() and (norms > 0).all()):
            raise ValueError("Polytope needs finite A and b and no zero row in A")
        if not soft_scale > 0:
            raise ValueError(f"soft_scale must be > 0, got {soft_scale}")
        self.A, self.b, self.norms, self.soft_scale = A, b, norms, float(soft_scale)

    def check_event_shape(self, shape: tuple[int, ...]) -> None:
        size = math.prod(shape)
        if self.A.shape[1] != size:
            raise ValueError(f"Polytope has {self.A.shape[1]} columns but particles of event shape {tuple(shape)} have "
                             f"{size} coordinates")

    def _margins(self, x: Tensor) -> Tensor:
        """b - A x `[N, m]` (float64)."""
        A = self.A.to(x.device)
        if x.flatten(1).shape[1] != A.shape[1]:
            raise ValueError(f"Polytope has {A.shape[1]} columns but the particles have {x.flatten(1).shape[1]} "
                             "coordinates")
        return self.b.to(x.device) - x.flatten(1).double() @ A.T

    def contains(self, x: Tensor) -> Tensor:
        """`[N]` bool: x `[N, *event]` satisfies every inequality."""
        return (self._margins(x) >= 0).all(1)

    def log_potential(self, x: Tensor, level: Level) -> Tensor:
        if level.final:
            inside = self.contains(x if level.x_out is None else level.x_out)
            return torch.where(inside, 0.0, -math.inf).to(torch.float64)
        scale = level.sigma * self.soft_scale * self.norms.to(x.device)
        return torch.special.log_ndtr(self._margins(x) / scale).sum(1)

    def log_potential_and_grad(self, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        lw = self.log_potential(x, level)
        if level.final:
            return lw, torch.zeros_like(x)
        scale = level.sigma * self.soft_scale * self.norms.to(x.device)
        z = self._margins(x) / scale
        # d/dx log Phi(z_i) = (phi / Phi)(z_i) * (-a_i / scale_i), the Mills ratio formed in log space
        mills = torch.exp(-0.5 * z**2 - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(z))
        g = -(mills / scale) @ self.A.to(x.device)
        return lw, torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0).reshape(x.shape).to(x.dtype)


class LowTemperature(Potential):
    """w_t = exp(-(beta - 1) lambda_t E(x, sigma_t)), lambda_t = `lambda_fn(level)` (default: linear 0 -> 1).

    Uses the target energy/score the FK model already computed at x (no extra evaluation)."""

    def __init__(self, beta: float, lambda_fn: Callable[[Level], float] | None = None, *, ramp: float = 1.0):
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a positive finite number, got {beta}")
        if not (ramp > 0 and math.isfinite(ramp)):
            raise ValueError(f"ramp must be a positive finite number, got {ramp}")
        if lambda_fn is not None and ramp != 1.0:
            raise ValueError("give lambda_fn or ramp, not both")
        self.beta, self.ramp = float(beta), float(ramp)
        self.lambda_fn = lambda_fn if lambda_fn is not None else (lambda level: level.progress ** self.ramp)

    def _coef(self, level: Level) -> float:
        return -(self.beta - 1.0) * float(self.lambda_fn(level))

    def log_potential(self, x: Tensor, level: Level) -> Tensor:
        if level.energy is None:
            raise ValueError("LowTemperature needs the target energy in the Level context")
        return self._coef(level) * level.energy.double()

    def log_potential_and_grad(self, x: Tensor, level: Level) -> tuple[Tensor, Tensor]:
        if level.score is None:
            raise ValueError("LowTemperature needs the target score in the Level context")
        c = self._coef(level)
        # log w = c E with c = -(beta - 1) lambda, and grad E = -score  =>  grad log w = -c * score
        return self.log_potential(x, level), (-c) * level.score


class LogPotential(Potential):
    """Generic hook: log w_t(x) = fn(x, sigma_t) `[N]` (sigma a `[N]` tensor); at the last level `final_fn` (default
    fn) on the returned point x_out. Return -inf for forbidden points; NaN/+inf are treated as invalid by SMC."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], final_fn: Callable[[Tensor, Tensor], Tensor] | None = None):
        if not callable(fn) or (final_fn is not None and not callable(final_fn)):
            raise TypeError("LogPotential needs callables fn(x, sigma) -> [N] (and optionally final_fn)")
        self.fn, self.final_fn = fn, final_fn

    def log_potential(self, x: Tensor, level: Level) -> Tensor:
        fn = self.fn
        pt = x
        if level.final:
            fn = self.final_fn if self.final_fn is not None else self.fn
            if level.x_out is not None:
                # keep the autograd path from x (x_out = D(x) is treated as x + const for the gradient)
                pt = x + (level.x_out - x).detach()
        sigma = torch.full((x.shape[0],), level.sigma, dtype=x.dtype, device=x.device)
        out = fn(pt, sigma)
        if not isinstance(out, Tensor) or out.shape != (x.shape[0],):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"log-potential must return shape [N]=[{x.shape[0]}], got {shape}")
        return out.double() if not out.requires_grad else out.to(torch.float64)


def as_potential(p) -> Potential:
    """A Potential as is; a plain callable fn(x, sigma) -> [N] wrapped in LogPotential."""
    if isinstance(p, Potential):
        return p
    if callable(getattr(p, "log_potential", None)):
        return p
    if callable(p):
        return LogPotential(p)
    raise TypeError(f"a potential must be a fkdiff.smc.Potential or a callable fn(x, sigma) -> [N], got {type(p).__name__}")


POTENTIALS: dict[str, type[Potential]] = {"box": Box, "polytope": Polytope, "low_temperature": LowTemperature}


def build(spec: Mapping[str, Any]) -> Potential:
    """A potential from `{kind: <a POTENTIALS name>, **its constructor's arguments}`, e.g.
    `{kind: box, low: [-1, 0], high: [1, 1]}` or `{kind: low_temperature, beta: 3}`."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in POTENTIALS:
        raise ValueError(f"unknown potential kind {kind!r}; use one of {', '.join(POTENTIALS)}")
    try:
        return POTENTIALS[kind](**spec)
    except TypeError as e:
        raise ValueError(f"potential {kind!r} ({POTENTIALS[kind].__name__}): {e}") from None
