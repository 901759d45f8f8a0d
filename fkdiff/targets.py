"""Evaluating targets: energies and scores of anything that has them, chunked, with an autograd fallback.

A *target* is any object with `energy(x, sigma) -> [B]` (p_sigma ∝ exp(-energy)), optionally `score(x, sigma)`
(else the score is -grad_x energy by autograd). A *score field* (what drives a reverse-diffusion proposal) is a
target, or a denoiser `D(x, sigma)` whose score is (D - x) / sigma^2 (Tweedie, DESIGN.md section 2).

`sigma` is always passed to the object as a `[B]` tensor in x's dtype, validated once here (`as_sigma`) and marked
as checked so that the object and its components do not validate it again (`fkdiff.diffusion.check_sigma`).
Evaluation is split into chunks of at most
`max_batch` rows (memory), which never changes the result. Returned tensors are detached: no graph survives a call.
Autograd is switched on locally where needed, so these work inside `torch.no_grad()` callers too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from fkdiff.diffusion import as_sigma, checked_sigma, is_checked, score_from_denoiser

__all__ = ["has_energy", "energy", "score", "energy_and_score", "chunked"]


def has_energy(obj: Any) -> bool:
    """Whether `obj` has an energy: an `energy` method, and for a composition or a bound condition (anything with
    `components`, `fkdiff.compose`) every component has one (a product of teacher denoisers is a score field only)."""
    if not callable(getattr(obj, "energy", None)):
        return False
    parts = getattr(obj, "components", None)
    return parts is None or all(has_energy(p) for p in parts)


def chunked(fn: Callable[[Tensor, Tensor], Any], x: Tensor, sigma: Tensor, max_batch: int | None):
    """Apply fn(x_chunk, sigma_chunk) over row chunks of size max_batch and concatenate (tuples elementwise)."""
    n = x.shape[0]
    if max_batch is None or max_batch >= n:
        return fn(x, sigma)
    if max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer or None, got {max_batch}")
    # slices of a checked sigma are checked too: the models below do not validate each chunk again
    keep = checked_sigma if is_checked(sigma) else (lambda t: t)
    outs = [fn(x[i : i + max_batch], keep(sigma[i : i + max_batch])) for i in range(0, n, max_batch)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def _check_energy(e: Tensor, x: Tensor, obj: Any) -> Tensor:
    if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
        shape = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"{type(obj).__name__}.energy must return shape [B]=[{x.shape[0]}], got {shape}")
    return e


def _score_one(obj: Any, x: Tensor, sig: Tensor) -> Tensor:
    if callable(getattr(obj, "score", None)):
        out = obj.score(x, sig)
    elif has_energy(obj):
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            e = _check_energy(obj.energy(xg, sig), x, obj)
            (g,) = torch.autograd.grad(e.sum(), xg)
        out = -g
    elif callable(obj):
        with torch.no_grad():
            out = score_from_denoiser(obj(x, sig), x, sig)
    else:
        raise TypeError(
            f"{type(obj).__name__} is not a target or score field: it needs an energy(x, sigma) method, "
            "a score(x, sigma) method, or must be a denoiser D(x, sigma)"
        )
    if out.shape != x.shape:
        raise ValueError(f"score of {type(obj).__name__} has shape {tuple(out.shape)}, expected {tuple(x.shape)}")
    return out.detach()


def energy(obj: Any, x: Tensor, sigma: float | Tensor, *, max_batch: int | None = None) -> Tensor:
    """E(x, sigma) `[N]`, detached."""
    if not has_energy(obj):
        raise TypeError(f"{type(obj).__name__} has no energy(x, sigma) method; SMC weights need energies")
    sig = as_sigma(sigma, x)

    def fn(xc, sc):
        with torch.no_grad():
            return _check_energy(obj.energy(xc, sc), xc, obj).detach()

    return chunked(fn, x, sig, max_batch)


def score(obj: Any, x: Tensor, sigma: float | Tensor, *, max_batch: int | None = None) -> Tensor:
    """grad_x log p_sigma(x) `[N, *event]` of a target (score or -grad energy) or a denoiser, detached."""
    sig = as_sigma(sigma, x)
    return chunked(lambda xc, sc: _score_one(obj, xc, sc), x, sig, max_batch)


def _energy_and_score_one(obj: Any, x: Tensor, sig: Tensor) -> tuple[Tensor, Tensor]:
    """(E, score) of one chunk, with the fewest network passes the object allows."""
    fused = getattr(obj, "energy_and_score", None)
    if callable(fused):  # compositions: each component evaluated once
        e, sc = fused(x, sig)
        return _check_energy(e, x, obj).detach(), sc.detach()
    fused = getattr(obj, "energy_and_grad", None)
    if callable(fused):  # energy students: one forward + one backward
        e, g = fused(x, sig)
        return _check_energy(e, x, obj).detach(), -g.detach()
    if callable(getattr(obj, "score", None)):  # analytic teachers: closed-form score
        with torch.no_grad():
            e = _check_energy(obj.energy(x, sig), x, obj)
        return e.detach(), _score_one(obj, x, sig)
    with torch.enable_grad():  # energy only: autograd
        xg = x.detach().requires_grad_(True)
        e = _check_energy(obj.energy(xg, sig), x, obj)
        (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach(), -g.detach()


def energy_and_score(obj: Any, x: Tensor, sigma: float | Tensor, *, max_batch: int | None = None) -> tuple[Tensor, Tensor]:
    """(E `[N]`, score `[N, *event]`) in one pass where possible.

    Uses, in order: the object's own `energy_and_score(x, sigma)` (compositions), `energy_and_grad(x, sigma)`
    (energy students: one forward and one backward), `energy` + closed-form `score` (analytic teachers), or
    autograd of `energy`. Never a separate forward for the energy when the score needs one anyway.
    """
    if not has_energy(obj):
        raise TypeError(f"{type(obj).__name__} has no energy(x, sigma) method; SMC weights need energies")
    return chunked(lambda xc, sc: _energy_and_score_one(obj, xc, sc), x, as_sigma(sigma, x), max_batch)
