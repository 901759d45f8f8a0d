"""Baseline samplers for (composed) diffusion models, returning the same `fkdiff.smc.SMCResult` as SMC.

Levels sigma_0 = sigma_max > ... > sigma_{T-1} = sigma_min (EDM rho-schedule, `num_steps` = T levels, the indexing of
`fkdiff.smc.sample`), Delta_t = sigma_{t-1}^2 - sigma_t^2 (DESIGN.md section 5).

`reverse_diffusion` — the naive "summed-score" sampler (Liu et al. 2022; Du et al. 2023 sec. 2.1 / 4, the baseline
"Reverse" of their table 1): ancestral sampling driven by the target's score s (for a composition: the composed
score, e.g. the sum of the components' scores),
    x_0 ~ N(0, sigma_max^2 I),
    x_t = x_{t-1} + Delta_t s(x_{t-1}, sigma_{t-1}) + sqrt(v_t) z,   v_t = Delta_t sigma_t^2 / sigma_{t-1}^2
(ancestral; `variance="euler"`: v_t = Delta_t), and finally D(x, sigma_min) = x + sigma_min^2 s(x, sigma_min).
For a single model with its exact score this samples the model up to discretisation error. For a composition it
samples the wrong law: the sum of diffused scores is not the score of the diffused product (Du et al. eq. 11 vs 12),
and nothing corrects for it — which is why `fkdiff.smc` weights the same proposal.

`annealed_mcmc` — Du et al. 2023 algorithm 1 with the image-domain recipe of their appendix C.3 (one reverse step
initialises each level, then MCMC): at each level t, a reverse-diffusion step from level t-1 (none at t = 0, where
x ~ N(0, sigma_max^2 I)), then `mcmc` (e.g. `fkdiff.mcmc.HMC`, Du et al. alg. 2/3) targeting
pi_t ∝ exp(-E(x, sigma_t)), with the step size adapted level by level. The reverse step reuses the score the kernel
returned at the level above, so a level costs 1 + (the kernel's evaluations) target evaluations per particle.
Nothing weights the particles: the result is only as good as the MCMC's mixing at each level.

Both return equally weighted particles (log_weights = -log N; -inf for a particle whose score became non-finite,
which is counted in `num_invalid`; positions stay finite), `log_Z = nan`, and the per-level
diagnostics of `SMCResult` (ESS = number of valid particles, never resampled, MCMC acceptance / step size).
"""

from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
from torch import Tensor

from fkdiff import mcmc as _mcmc
from fkdiff.diffusion import sigma_schedule
from fkdiff.smc.core import SMCResult
from fkdiff.targets import score as _score

__all__ = ["reverse_diffusion", "annealed_mcmc", "level_schedule"]


def level_schedule(num_steps: int, sigma_max: float, sigma_min: float, rho: float = 7.0,
                   sigmas: Tensor | None = None) -> Tensor:
    """`[T]` float64 decreasing noise levels: the EDM rho-schedule, or `sigmas` validated."""
    if sigmas is None:
        return sigma_schedule(int(num_steps), float(sigma_min), float(sigma_max), rho=rho, dtype=torch.float64)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    if sig.numel() != num_steps:
        raise ValueError(f"sigmas has {sig.numel()} levels but num_steps={num_steps}")
    if not torch.isfinite(sig).all() or (sig <= 0).any() or (sig.numel() > 1 and not (sig[1:] < sig[:-1]).all()):
        raise ValueError("sigmas must be positive, finite and strictly decreasing (sigma_max first)")
    return sig


def _variance(delta: float, s_prev: float, s: float, variance: str) -> float:
    if variance == "ancestral":
        return delta * (s * s) / (s_prev * s_prev)
    if variance in ("euler", "em"):
        return delta
    raise ValueError(f"variance must be 'ancestral' or 'euler', got {variance!r}")


def _rowfinite(t: Tensor) -> Tensor:
    return torch.isfinite(t).flatten(1).all(1)


def _bc(mask: Tensor, x: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (x.ndim - 1)))


def _device(device, generator):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def _result(x: Tensor, invalid: Tensor, sigmas: Tensor, num_invalid: list[int], num_alive: list[int], nfe: float,
            t0: float, acceptance: list[float] | None = None, step_size: list[float] | None = None) -> SMCResult:
    n, T = x.shape[0], sigmas.numel()
    log_w = torch.full((n,), -math.log(n), dtype=torch.float64, device=x.device)
    num_valid = int((~invalid).sum())
    if num_valid == 0:
        raise RuntimeError("every particle's score became non-finite: no valid samples")
    log_w = torch.where(invalid, torch.full_like(log_w, -math.inf), log_w - math.log(num_valid / n))
    alive = torch.tensor(num_alive)
    nan_t = torch.full((T,), math.nan, dtype=torch.float64)
    return SMCResult(
        samples=x.detach(),
        log_weights=log_w,
        log_Z=math.nan,
        log_Z_var=math.nan,
        ess=alive.to(torch.float64),
        resampled=torch.zeros(T, dtype=torch.bool),
        unique_ancestors=alive.clone(),
        num_invalid=torch.tensor(num_invalid),
        num_alive=alive,
        acceptance=None if acceptance is None else torch.tensor(acceptance, dtype=torch.float64),
        step_size=None if step_size is None else torch.tensor(step_size, dtype=torch.float64),
        log_Z_increments=nan_t,
        sigmas=sigmas,
        nfe=float(nfe),
        wall_time=time.perf_counter() - t0,
        num_eves=num_valid,
        warnings=[],
    )


def _reverse_step(x: Tensor, u: Tensor, delta: float, var: float, generator) -> Tensor:
    """x + Delta u + sqrt(v) z for the whole population `[N, *event]`."""
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x + delta * u + math.sqrt(var) * z


def reverse_diffusion(
    target: Any,
    num_particles: int,
    *,
    shape: Sequence[int],
    num_steps: int,
    sigma_max: float,
    sigma_min: float,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    max_batch: int | None = None,
    variance: str = "ancestral",
    rho: float = 7.0,
    sigmas: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> SMCResult:
    """Naive reverse diffusion with the target's (summed) score (Liu et al. 2022). Samples `[N, *shape]`.

    target   any score field: an object with score(x, sigma) or energy(x, sigma) (-grad E), or a denoiser D(x, sigma)
    num_steps T levels (T - 1 reverse steps; T score evaluations per particle with final_denoise, else T - 1)
    variance "ancestral" (v_t = Delta_t sigma_t^2 / sigma_{t-1}^2) or "euler" (v_t = Delta_t)
    """
    t0 = time.perf_counter()
    sig = level_schedule(num_steps, sigma_max, sigma_min, rho, sigmas)
    T, n = sig.numel(), int(num_particles)
    dev = _device(device, generator)
    x = float(sig[0]) * torch.randn((n, *shape), generator=generator, dtype=dtype, device=dev)
    invalid = torch.zeros(n, dtype=torch.bool, device=dev)
    num_invalid, num_alive, nfe = [0] * T, [n] * T, 0
    for t in range(1, T + (1 if final_denoise else 0)):
        s_prev = float(sig[t - 1])
        u = _score(target, x, s_prev, max_batch=max_batch).to(dtype)
        nfe += 1
        ok = _rowfinite(u)
        new_bad = ~ok & ~invalid
        num_invalid[t - 1] += int(new_bad.sum())
        invalid |= ~ok  # sticky: the particle's path used a zero score at this level
        num_alive[t - 1] = n - int(invalid.sum())
        u = torch.where(_bc(ok, u), u, torch.zeros_like(u))
        if t == T:  # final denoise D(x, sigma_min) = x + sigma_min^2 s(x, sigma_min)
            x = x + s_prev * s_prev * u
            break
        s = float(sig[t])
        delta = s_prev * s_prev - s * s
        x = _reverse_step(x, u, delta, _variance(delta, s_prev, s, variance), generator)
    if not final_denoise:
        num_alive[T - 1] = n - int(invalid.sum())
    return _result(x, invalid, sig, num_invalid, num_alive, nfe, t0)


def annealed_mcmc(
    target: Any,
    num_particles: int,
    *,
    shape: Sequence[int],
    num_steps: int,
    sigma_max: float,
    sigma_min: float,
    mcmc: _mcmc.Kernel | None = None,
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    max_batch: int | None = None,
    variance: str = "ancestral",
    rho: float = 7.0,
    sigmas: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> SMCResult:
    """Annealed MCMC (Du et al. 2023 alg. 1): reverse step, then `mcmc` on exp(-E(x, sigma_t)), at every level.

    target  any object with energy(x, sigma) (and optionally score); `mcmc` defaults to `fkdiff.mcmc.HMC()`
            (1 step of 3 leapfrog steps; Metropolis-corrected; step size adapted level to level).
    Cost: T (1 + kernel evaluations) target evaluations per particle (`result.nfe`). Samples `[N, *shape]`.
    """
    t0 = time.perf_counter()
    kernel = _mcmc.HMC() if mcmc is None else mcmc
    sig = level_schedule(num_steps, sigma_max, sigma_min, rho, sigmas)
    T, n = sig.numel(), int(num_particles)
    dev = _device(device, generator)
    x = float(sig[0]) * torch.randn((n, *shape), generator=generator, dtype=dtype, device=dev)
    invalid = torch.zeros(n, dtype=torch.bool, device=dev)
    num_invalid, num_alive, acc, steps, nfe = [0] * T, [n] * T, [], [], 0.0
    state = kernel.init_state()
    u = None
    for t in range(T):
        s = float(sig[t])
        if t > 0:
            s_prev = float(sig[t - 1])
            delta = s_prev * s_prev - s * s
            x_new = _reverse_step(x, u, delta, _variance(delta, s_prev, s, variance), generator)
            x = torch.where(_bc(_rowfinite(x_new), x), x_new, x)
        f = _mcmc.target_logdensity(target, s, max_batch=max_batch)
        x, state, info = kernel(x, f, generator=generator, state=state)
        nfe += info.num_evals
        alive = ~invalid
        acc.append(float(info.acceptance[alive].mean()) if alive.any() else math.nan)
        steps.append(info.step_size)
        u = info.grad.to(dtype)  # grad log pi_t = the target's score at the returned positions
        ok = _rowfinite(u) & ~torch.isnan(info.logp) & (info.logp > -math.inf)
        invalid = ~ok  # not sticky: the next level's MCMC may move the particle back to a finite density
        num_invalid[t], num_alive[t] = int(invalid.sum()), n - int(invalid.sum())
        u = torch.where(_bc(ok, u), u, torch.zeros_like(u))
    if final_denoise:
        x = x + float(sig[-1]) ** 2 * u
    return _result(x, invalid, sig, num_invalid, num_alive, nfe, t0, acceptance=acc, step_size=steps)
