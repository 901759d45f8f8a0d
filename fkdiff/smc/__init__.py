"""Feynman–Kac SMC for diffusion models and their compositions (DESIGN.md section 5; Thornton et al. 2025).

    result = fkdiff.smc.sample(target, 2000, shape=(2,), num_steps=100, sigma_max=80.0, sigma_min=0.002,
                               mcmc=fkdiff.mcmc.HMC(num_steps=1, num_leapfrog=3), generator=gen)

Layers: `resampling` (schemes under one signature + registry), `weights` (log-space normalisation, ESS),
`fk` (the Feynman–Kac protocol M0 / M_t / log G_t), `diffusion_fk` (the model built from a target, a proposal score
field and potentials), `potentials` (Box, LowTemperature, generic log-potentials), `core` (the pure SMC step and the
loop). `sample` below only builds the diffusion FK model and runs the loop. `distributed.sample` is the same sampler
with the particles sharded over `torch.distributed` ranks (DESIGN.md section 7).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fkdiff.diffusion import sigma_schedule
from fkdiff.smc.core import (Population, SMCDegeneracyWarning, SMCError, SMCResult, SMCState, StepInfo, run_smc,
                             smc_step)
from fkdiff.smc.diffusion_fk import DiffusionFK
from fkdiff.smc.fk import FeynmanKac, MCMCTarget, Particles
from fkdiff.smc.potentials import Box, Level, LogPotential, LowTemperature, Polytope, Potential, log_ndtr_diff
from fkdiff.smc.resampling import RESAMPLERS, get_resampler, multinomial, residual, stratified, systematic
from fkdiff.smc.weights import Weights

__all__ = [
    "sample", "distributed", "SMCResult", "SMCError", "SMCDegeneracyWarning", "SMCState", "StepInfo", "smc_step",
    "run_smc", "Population",
    "DiffusionFK", "FeynmanKac", "MCMCTarget", "Particles",
    "Box", "Level", "LogPotential", "LowTemperature", "Polytope", "Potential", "log_ndtr_diff",
    "RESAMPLERS", "get_resampler", "multinomial", "residual", "stratified", "systematic", "Weights",
]


def sample(
    target: Any,
    num_particles: int,
    *,
    shape: Sequence[int],
    num_steps: int,
    sigma_max: float,
    sigma_min: float,
    proposal: Any = None,
    potentials: Sequence[Any] = (),
    mcmc: Any = None,
    resample: str = "systematic",
    ess_threshold: float = 0.5,
    mode: str = "sampler",
    final_denoise: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    max_batch: int | None = None,
    progress: bool = False,
    rho: float = 7.0,
    sigmas: torch.Tensor | None = None,
    init_std: float | None = None,
    proposal_variance: str = "ancestral",
    dtype: torch.dtype = torch.float64,
    eval_dtype: torch.dtype | None = None,
) -> SMCResult:
    """Feynman–Kac SMC from N(0, sigma_max^2 I) down to sigma_min for `target` (DESIGN.md section 5).

    target          any object with energy(x, sigma) -> [B] (optionally score(x, sigma)); sigma is a [B] tensor
    num_particles   N; particles are `[N, *shape]`
    num_steps       number of levels T of the EDM rho-schedule sigma_max -> sigma_min (or pass `sigmas` `[T]`)
    proposal        score field of the reverse-diffusion proposal (target or denoiser); None = the target's score
    potentials      `Box`, `LowTemperature`, `LogPotential` or callables fn(x, sigma) -> [N] log-potentials
    mcmc            rejuvenation kernel (fkdiff.mcmc.HMC / MALA / ...) run at every level after weighting and
                    (adaptive) resampling, invariant for gamma_t; None = plain SMC
    resample        "systematic" | "stratified" | "residual" | "multinomial" or a resampler callable
    ess_threshold   resample when ESS < ess_threshold * N (0: never, 1: every level)
    mode            "sampler" (exact kernel-ratio weights, targets exp(-E(x, sigma_t)) * potentials at every level)
                    or "twisted" (telescoping potentials on the proposal's own law)
    final_denoise   return D(x, sigma_min) = x + sigma_min^2 score (hard potentials are enforced on it)
    generator       the only source of randomness; results do not depend on max_batch
    max_batch       chunk size for target/proposal evaluations (memory only)
    init_std        std of the initial N(0, init_std^2 I) (default sigma_max; wider for negations)
    dtype           particle dtype (float64 default); eval_dtype: dtype the models are called in (default dtype)

    Returns an `SMCResult` (samples, normalised log-weights, log Z and its variance, per-level ESS, resampling,
    unique ancestors, MCMC acceptance, nfe, wall time; `.resample(generator)` for equally weighted samples).
    """
    if device is None and generator is not None:
        device = generator.device
    fk = _diffusion_fk(target, shape=shape, num_steps=num_steps, sigma_max=sigma_max, sigma_min=sigma_min,
                       sigmas=sigmas, rho=rho, proposal=proposal, potentials=potentials, mode=mode,
                       final_denoise=final_denoise, proposal_variance=proposal_variance, init_std=init_std,
                       max_batch=max_batch, dtype=dtype, eval_dtype=eval_dtype, device=device)
    return run_smc(fk, num_particles, generator=generator, resample=resample, ess_threshold=ess_threshold,
                   mcmc=mcmc, progress=progress)


def _diffusion_fk(target: Any, *, shape, num_steps: int, sigma_max: float, sigma_min: float,
                  sigmas: torch.Tensor | None, rho: float, **kwargs) -> DiffusionFK:
    """The DiffusionFK model `sample` runs (shared with `fkdiff.smc.distributed.sample`)."""
    if sigmas is None:
        sigmas = sigma_schedule(int(num_steps), float(sigma_min), float(sigma_max), rho=rho, dtype=torch.float64)
    elif len(sigmas) != num_steps:
        raise ValueError(f"sigmas has {len(sigmas)} levels but num_steps={num_steps}")
    return DiffusionFK(target, sigmas, shape=shape, **kwargs)


from fkdiff.smc import distributed  # noqa: E402  (multi-process SMC; imports this package's names lazily)
