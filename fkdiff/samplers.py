"""Baseline samplers for (composed) diffusion models: `fkdiff.smc.sample` without weights (mode="none").

Both are Feynman–Kac models with G_t = 1 (zero for a particle whose score or energy became non-finite), run by the
one engine `fkdiff.smc.core.run_smc` with no resampling, so they return the same `SMCResult` with real per-level
diagnostics (ESS = the number of valid particles, MCMC acceptance and step size, nfe) and `log_Z = None`: an
unweighted sampler estimates no normaliser. Levels sigma_0 = sigma_max > ... > sigma_{T-1} = sigma_min (the EDM
rho-schedule, `num_levels` = T levels, the engine's order), Delta_t = sigma_{t-1}^2 - sigma_t^2 (DESIGN.md section 5).

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
pi_t ∝ exp(-E(x, sigma_t)), with the step size adapted level by level. The reverse step reuses the score at the
positions the kernel returned at the level above, so a level costs 1 + (the kernel's evaluations) target
evaluations per particle. Nothing weights the particles: the result is only as good as the MCMC's mixing.

A particle whose score (or energy) becomes non-finite is dropped for good (weight zero, counted in `num_invalid`;
the returned point is a copy of a valid one, so no sample is NaN).
"""

from __future__ import annotations

from typing import Any

from fkdiff import mcmc as _mcmc
from fkdiff.smc import SMCResult, noise_levels
from fkdiff.smc import sample as _sample

__all__ = ["reverse_diffusion", "annealed_mcmc", "level_schedule"]

# the options of fkdiff.smc.sample that describe an unweighted path (the others: weights, resampling, potentials)
OPTIONS = ("shape", "num_levels", "num_steps", "sigma_max", "sigma_min", "sigmas", "rho", "final_denoise",
           "generator", "device", "max_batch", "dtype", "eval_dtype", "init_std", "progress", "randn", "population")

level_schedule = noise_levels  # the levels both baselines run on (kept under its former name)


def _unweighted(target: Any, num_particles: int, variance: str, mcmc: Any, options: dict) -> SMCResult:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unexpected option(s) {', '.join(unknown)}; a baseline takes {', '.join(OPTIONS)}")
    return _sample(target, num_particles, mode="none", ess_threshold=0.0, mcmc=mcmc, proposal_variance=variance,
                   **options)


def reverse_diffusion(target: Any, num_particles: int, *, variance: str = "ancestral", **options) -> SMCResult:
    """Naive reverse diffusion with the target's (summed) score (Liu et al. 2022). Samples `[N, *shape]`.

    target    any score field: an object with score(x, sigma) or energy(x, sigma) (-grad E), or a denoiser D(x, sigma)
    variance  "ancestral" (v_t = Delta_t sigma_t^2 / sigma_{t-1}^2) or "euler" (v_t = Delta_t)
    options   `shape`, `num_levels` (T: T - 1 reverse steps; T score evaluations per particle with final_denoise,
              else T - 1), `sigma_max`, `sigma_min`, and the path options of `fkdiff.smc.sample` (see `OPTIONS`)
    """
    return _unweighted(target, num_particles, variance, None, options)


def annealed_mcmc(target: Any, num_particles: int, *, mcmc: _mcmc.Kernel | None = None, variance: str = "ancestral",
                  **options) -> SMCResult:
    """Annealed MCMC (Du et al. 2023 alg. 1): reverse step, then `mcmc` on exp(-E(x, sigma_t)), at every level.

    target   any object with energy(x, sigma) (and optionally score); `mcmc` defaults to `fkdiff.mcmc.HMC()`
             (1 step of 3 leapfrog steps; Metropolis-corrected; step size adapted level to level)
    options  as for `reverse_diffusion`
    Cost: T (1 + kernel evaluations) target evaluations per particle (`result.nfe`). Samples `[N, *shape]`.
    """
    return _unweighted(target, num_particles, variance, _mcmc.HMC() if mcmc is None else mcmc, options)
