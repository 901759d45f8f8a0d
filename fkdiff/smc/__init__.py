"""Feynman–Kac SMC for diffusion models and their compositions (DESIGN.md section 5; Thornton et al. 2025).

    result = fkdiff.smc.sample(target, 2000, shape=(2,), num_levels=100, sigma_max=80.0, sigma_min=0.002,
                               mcmc=fkdiff.mcmc.HMC(num_steps=1, num_leapfrog=3), generator=gen)

Layers: `resampling` (schemes under one signature + registry), `weights` (log-space normalisation, ESS),
`fk` (the Feynman–Kac protocol M0 / M_t / log G_t), `diffusion_fk` (the model built from a target, a proposal score
field and potentials), `potentials` (Box, Polytope, LowTemperature, generic log-potentials, a registry),
`core` (the pure SMC step, the loop, the per-level collectors and the result). `sample` below only builds the
diffusion FK model and hands it to a population: all N particles here (default), or sharded over `torch.distributed`
ranks (`population=fkdiff.smc.distributed.ShardedPopulation()`, DESIGN.md section 7). The baselines of
`fkdiff.samplers` are this same sampler without weights (mode="none").

Level index everywhere: t = 0 is sigma_max (the first level), t = T - 1 is sigma_min (the last); `result.sigmas[t]`.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

from fkdiff.smc.core import (COLLECTORS, LOCAL, Collector, Population, SMCDegeneracyWarning, SMCError, SMCResult,
                             SMCState, StepInfo, run_smc, smc_step)
from fkdiff.smc.diffusion_fk import DiffusionFK, noise_levels
from fkdiff.smc.islands import Islands
from fkdiff.smc.fk import FeynmanKac, MCMCTarget, Particles
from fkdiff.smc.potentials import Box, Level, LogPotential, LowTemperature, Polytope, Potential, log_ndtr_diff
from fkdiff.smc.resampling import RESAMPLERS, get_resampler, multinomial, residual, stratified, systematic
from fkdiff.smc.weights import Weights

__all__ = [
    "sample", "distributed", "SMCResult", "SMCError", "SMCDegeneracyWarning", "SMCState", "StepInfo", "smc_step",
    "run_smc", "Population", "Collector", "COLLECTORS", "Islands", "adaptive",
    "DiffusionFK", "FeynmanKac", "MCMCTarget", "Particles", "noise_levels",
    "Box", "Level", "LogPotential", "LowTemperature", "Polytope", "Potential", "log_ndtr_diff",
    "RESAMPLERS", "get_resampler", "multinomial", "residual", "stratified", "systematic", "Weights",
]


def sample(
    target: Any,
    num_particles: int,
    *,
    shape: Sequence[int],
    num_levels: int | None = None,
    sigma_max: float | None = None,
    sigma_min: float | None = None,
    proposal: Any = None,
    potentials: Sequence[Any] = (),
    mcmc: Any = None,
    resample: str = "systematic",
    ess_threshold: float = 0.5,
    mode: str | None = None,
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
    randn: Callable[..., torch.Tensor] | None = None,
    population: Population | None = None,
    num_steps: int | None = None,
    budget: float | None = None,
) -> SMCResult:
    """Feynman–Kac SMC from N(0, sigma_max^2 I) down to sigma_min for `target` (DESIGN.md section 5).

    target          any object with energy(x, sigma) -> [B] (optionally score(x, sigma)); sigma is a [B] tensor
    num_particles   N; particles are `[N, *shape]`
    num_levels      number of levels T of the EDM rho-schedule sigma_max -> sigma_min (or pass `sigmas` `[T]`);
                    `num_steps` is its former name (deprecated)
    proposal        score field of the reverse-diffusion proposal (target or denoiser); None = the target's score
    potentials      `Box`, `Polytope`, `LowTemperature`, `LogPotential` or callables fn(x, sigma) -> [N] log-potentials
    mcmc            rejuvenation kernel (fkdiff.mcmc.HMC / MALA / ...) run at every level after weighting and
                    (adaptive) resampling, invariant for gamma_t; None = plain SMC
    resample        "systematic" | "stratified" | "residual" | "multinomial" or a resampler callable
    ess_threshold   resample when ESS < ess_threshold * N (0: never, 1: every level)
    budget          target evaluations per particle (pilot included): with no num_levels / sigmas given, the
                    budget-driven default (fkdiff.smc.adaptive): levels placed from a pilot run's conditional ESS,
                    HMC rejuvenation, low temperature run twisted, island log Z error bars; `result.plan` says
                    what it chose and how many evaluations it used (sigma_max / sigma_min default to EDM's 80 / 0.002)
    mode            (default "sampler") "sampler" (exact kernel-ratio weights, targets exp(-E(x, sigma_t)) * potentials at every level),
                    "twisted" (telescoping potentials on the proposal's own law) or "none" (no weights, no log Z:
                    the baselines of fkdiff.samplers)
    final_denoise   return D(x, sigma_min) = x + sigma_min^2 score (hard potentials are enforced on it)
    generator       the only source of randomness; results do not depend on max_batch
    max_batch       chunk size for target/proposal evaluations (memory only)
    init_std        std of the initial N(0, init_std^2 I) (default sigma_max; wider for negations)
    dtype           particle dtype (float64 default); eval_dtype: dtype the models are called in (default dtype)
    randn           the propagation noise source (default torch.randn; see fkdiff.smc.diffusion_fk)
    population      where the particles live: None = all here; `fkdiff.smc.distributed.ShardedPopulation(...)`
                    shards them over torch.distributed ranks (global or island resampling)

    Returns an `SMCResult` (samples, normalised log-weights, log Z and its variance, per-level ESS, resampling,
    unique ancestors, MCMC acceptance, nfe, wall time; `.resample(generator)` for equally weighted samples); with a
    sharded population a `DistributedSMCResult` (this rank's shard, global diagnostics).
    """
    num_levels = _num_levels(num_levels, num_steps)
    if device is None and generator is not None:
        device = generator.device
    if mode is not None:
        _warn_low_temperature(target, mode, mcmc)
    if budget is not None and num_levels is None and sigmas is None:
        from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN

        return adaptive.sample_with_budget(
            target, num_particles, budget=budget, shape=shape,
            sigma_max=SIGMA_MAX if sigma_max is None else sigma_max,
            sigma_min=SIGMA_MIN if sigma_min is None else sigma_min, generator=generator, mode=mode, mcmc=mcmc,
            potentials=potentials, population=population, rho=rho,
            engine=dict(resample=resample, ess_threshold=ess_threshold, progress=progress),
            fk_kwargs=dict(proposal=proposal, final_denoise=final_denoise, proposal_variance=proposal_variance,
                           init_std=init_std, max_batch=max_batch, dtype=dtype, eval_dtype=eval_dtype, device=device,
                           randn=randn))
    if budget is not None:
        raise TypeError("give either budget (levels chosen for you) or num_levels / sigmas, not both")
    if mode is None:
        mode = "sampler"
        _warn_low_temperature(target, mode, mcmc)
    fk = DiffusionFK.on_levels(target, num_levels=num_levels, sigma_max=sigma_max, sigma_min=sigma_min, rho=rho,
                               sigmas=sigmas, shape=shape, proposal=proposal, potentials=potentials, mode=mode,
                               final_denoise=final_denoise, proposal_variance=proposal_variance, init_std=init_std,
                               max_batch=max_batch, dtype=dtype, eval_dtype=eval_dtype, device=device, randn=randn)
    return (LOCAL if population is None else population).run(
        fk, num_particles, generator=generator, resample=resample, ess_threshold=ess_threshold, mcmc=mcmc,
        progress=progress)


def _warn_low_temperature(target: Any, mode: str, mcmc: Any) -> None:
    """A tempered target p_sigma^beta (beta > 1) in sampler mode is erratic (DESIGN.md 8: mode TV 0.17-0.59 at beta = 4
    with HMC(1, 3)): say so, with the fix (the LowTemperature path, fkdiff.smc.adaptive)."""
    low = adaptive.low_temperature_formulation(target)
    if low is None or mode != "sampler":
        return
    warnings.warn(
        f"compose.tempered(..., beta={low[1]:g}) in sampler mode with {'no MCMC' if mcmc is None else repr(mcmc)} "
        "is unreliable (mass must move between modes through the weights alone): use budget=B without num_levels "
        "(fkdiff.smc.adaptive plans it), or on the base target potentials="
        f"[fkdiff.smc.LowTemperature({low[1]:g}, ramp=3)] with mcmc=fkdiff.mcmc.HMC(1, 3) and mode='sampler' at "
        ">= 150 levels (exact weights), mode='twisted' below (README 'Choosing the SMC settings')", UserWarning,
        stacklevel=3)


def _num_levels(num_levels: int | None, num_steps: int | None) -> int | None:
    """`num_levels`, or its deprecated former name `num_steps` (with a DeprecationWarning)."""
    if num_steps is None:
        return num_levels
    if num_levels is not None:
        raise TypeError("give num_levels only (num_steps is its deprecated former name)")
    warnings.warn("num_steps= is deprecated for the number of SMC levels: use num_levels= (num_steps now only "
                  "counts MCMC steps per level)", DeprecationWarning, stacklevel=3)
    return num_steps


from fkdiff.smc import adaptive, distributed  # noqa: E402  (multi-process SMC; imports this package's names lazily)
