"""The Feynman–Kac protocol the SMC engine knows (Chopin & Papaspiliopoulos 2020, ch. 5; nchopin/particles `FeynmanKac`).

A Feynman–Kac model on levels t = 0, ..., T-1 is given by its book symbols

    M0(num, generator)            -> particles X_0 ~ M_0
    M(t, prev, generator)         -> particles X_t ~ M_t(. | X_{t-1})          (t >= 1)
    logG(t, prev, cur)            -> log G_t(X_{t-1}, X_t)  `[N]` float64      (prev is None at t = 0)

and defines the path measure Q_t(dx_{0:t}) ∝ M_0(dx_0) G_0(x_0) prod_{s=1}^t M_s(dx_s | x_{s-1}) G_s(x_{s-1}, x_s).
SMC estimates the normaliser Z_t of Q_t and its marginal at x_t. `logG` must be a pure function of its arguments.

Particles are carried as `Particles`: the positions `x` `[N, *event]` plus model-specific cached per-particle tensors
(energies, scores, proposal densities; anything with leading dimension N), so that expensive evaluations happen
once per level. The engine only reads `.x` and indexes the whole bundle on resampling.

Optional, for MCMC rejuvenation (resample-move, Gilks & Berzuini 2001): `mcmc_target(t, particles)` returns an
`MCMCTarget` whose `logdensity_fn` is log gamma_t (the unnormalised marginal target at level t, `(logp [N] float64,
grad [N, *event])`) and whose `particles_at(x_new)` rebuilds the cached bundle at moved positions.
Optional `finalize(particles)` maps the last level's particles to the returned samples (default: `.x`).
Optional `num_evals(t)`: target evaluations per particle that M_t / log G_t made (summed into the result's nfe).
Optional `weighted = False`: the model's G_t only mark invalid particles (G in {0, 1}; an unweighted sampler such as
reverse diffusion run by the same engine); the result then reports no log Z (None: not estimated).

Level index: t = 0 is the first level the particles visit (for diffusion models sigma_max), t = T - 1 the last
(sigma_min); `fk.sigmas[t]` is the noise level of level t where the model has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Particles", "FeynmanKac", "MCMCTarget"]


@dataclass(frozen=True)
class Particles:
    """Positions `x` `[N, *event]` and cached per-particle tensors `data[name]` `[N, ...]` (None entries allowed)."""

    x: Tensor
    data: dict[str, Tensor | None] = field(default_factory=dict)

    @property
    def num(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, name: str) -> Tensor | None:
        return self.data[name]

    def get(self, name: str, default=None):
        return self.data.get(name, default)

    def index(self, idx: Tensor) -> "Particles":
        """The bundle restricted/reordered to rows `idx` (ancestors after resampling)."""
        return Particles(self.x[idx], {k: (None if v is None else v[idx]) for k, v in self.data.items()})

    def replace(self, x: Tensor | None = None, **data) -> "Particles":
        new = dict(self.data)
        new.update(data)
        return Particles(self.x if x is None else x, new)


class MCMCTarget(Protocol):
    """What rejuvenation at one level needs: log gamma_t with gradient, its value at the current particles,
    and a way to rebuild the cached particle bundle after the move."""

    logdensity_fn: Callable[[Tensor], tuple[Tensor, Tensor]]
    logp: Tensor  # [N] float64 at the current particles
    grad: Tensor  # [N, *event]

    def particles_at(self, x_new: Tensor, *, evaluated: bool = False) -> Particles: ...
    # evaluated=True (passed only for a kernel with `returns_evaluated`, e.g. every fkdiff.mcmc kernel): every row of
    # x_new is one at which logdensity_fn was called (or the current particles)

    @property
    def num_evals(self) -> int: ...


@runtime_checkable
class FeynmanKac(Protocol):
    """Levels t = 0..T-1 with M0, M_t and log G_t (see the module docstring)."""

    T: int

    def M0(self, num: int, generator: torch.Generator | None) -> Particles: ...

    def M(self, t: int, prev: Particles, generator: torch.Generator | None) -> Particles: ...

    def logG(self, t: int, prev: Particles | None, cur: Particles) -> Tensor: ...
