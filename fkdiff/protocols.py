"""The two interfaces every module meets at (DESIGN.md sections 2-3).

`Denoiser`: D(x, sigma, cond=None) -> E[x_0 | x_sigma = x], the adapter boundary for every teacher and student.
`EnergyModel`: E(x, sigma, cond=None) -> [B] with p_sigma ∝ exp(-E); its score is -grad_x E.
Anything with these methods plugs in: analytic teachers, trained nets, distilled students, compositions.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """`D(x, sigma, cond=None)`: x `[B, *event]`, sigma float or `[B]` -> denoised `[B, *event]`."""

    sigma_min: float
    sigma_max: float
    sigma_data: float

    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor: ...


@runtime_checkable
class EnergyModel(Protocol):
    """`energy(x, sigma) -> [B]` with p_sigma(x) ∝ exp(-energy); `score(x, sigma) = -grad_x energy`."""

    def energy(self, x: Tensor, sigma: float | Tensor) -> Tensor: ...

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor: ...
