"""Budget-driven SMC: levels, MCMC effort, formulation and log Z estimator chosen from one number, the budget B of
target evaluations per particle (issue 12; DESIGN.md sections 5 and 8).

    result = fkdiff.smc.sample(target, 2000, shape=(2,), budget=1000, generator=gen)
    result.plan      # what was chosen: levels, kernel, mode, estimator, pilot, evaluations used

The plan, each rule from a measurement (README "Choosing the SMC settings"):

  kernel      HMC(num_steps=1, num_leapfrog=3) after every level (DESIGN.md 5/8: one corrected HMC step per level
              fixed every target tried). A low temperature gets the same: 4 steps per level (the former rule) bought
              nothing on exact p^2 / p^4 targets and cost 3/4 of the levels, and too few levels is what biases it
  formulation a low temperature `compose.tempered(t, beta)` (beta > 1) runs on t with the potential
              `LowTemperature(beta, ramp=3)`: the path pi_t ∝ p_sigma_t^(1 + (beta - 1) lambda_t), lambda_t =
              (t / (T - 1))^3, which tilts only once the modes have separated (a linear ramp tempers overlapping
              modes at intermediate sigma, emptying the lighter / narrower one, which the weights cannot refill:
              0.984 / 1.000 instead of 0.845 on an 8x8 image mixture, README). Weights: the exact SMC-sampler
              ones when T >= 150 levels, else twisted (w_t / w_{t-1}). Twisted weights are exact only when the
              proposal's marginals are p_sigma_t; the MCMC moves target p_sigma_t w_t, so the reverse kernel's
              discretisation error is never corrected (the missing term is the base model's kernel ratio
              log p_t(x_t) - log p_{t-1}(x_{t-1}) + log L - log M): a log Z bias that stays at large N, falls with
              the levels and grows with the dimension (+1.2..+2.0 nats in 32-D at 74 levels). Sampler weights have
              no such bias but more variance at coarse levels (at 24 levels in 4-D mode masses 0.005-0.12 where the
              exact is 0.021, twisted 0.018-0.021)  (sampler mode on the *tempered target* p_sigma^beta at every
              level is erratic and warns: mass must move between separated modes through weights alone)
  levels      a pilot run (N_p = max(64, N / 8) particles on the EDM rho-schedule with T_p = T / 4 levels, same
              kernel) measures the conditional ESS of the incremental weights, CESS_t (Zhou, Johansen & Aston 2016),
              at every pilot interval; the main run's T levels are placed with a density per pilot interval
              proportional to  alpha / (T_p - 1) + (1 - alpha) sqrt(-log CESS_t) / sum_s sqrt(-log CESS_s)
              (-log CESS ~ Var of log G, which grows like the square of the step where the path is smooth: equal
              sqrt(-log CESS) per level equalises the weight degeneracy per level; alpha keeps the rho-schedule as a
              floor). log sigma is interpolated linearly inside a pilot interval.
  budget      T = floor((B - pilot evaluations per particle) / evaluations per level); the pilot's evaluations are
              charged to the budget as N_p T_p e / N per particle; `plan["used_evaluations"]` is the total per
              particle (pilot included), never more than B
  estimator   `Islands(R)`, R = 4 (independent sub-populations, a log Z interval with R - 1 degrees of freedom) when
              N / R keeps >= `min_island` particles per island, else the Lee–Whiteley genealogy estimator. R = 4, not
              more: the island estimates Z_r are right-skewed at small islands, and the spread of few large ones
              is too small exactly when Z_hat is low (the variance estimate is unbiased but correlates with the
              error, +0.5 at R = 8); measured coverage of the 95% interval (benchmarks/smc_coverage.py, N = 1024,
              B = 300): R = 8 x 128 86% / 88%, R = 4 x 256 in the 90-98% target

Explicit knobs (num_levels / sigmas / mcmc / mode / population) are not overridden: `budget` is only used when no
level count is given.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from fkdiff.smc.diffusion_fk import DiffusionFK, noise_levels

__all__ = ["place_levels", "low_temperature_formulation", "default_mcmc_steps", "sample_with_budget", "DEFAULTS"]

DEFAULTS = dict(
    num_leapfrog=3,  # HMC leapfrog steps per MCMC step
    mcmc_steps=1,  # HMC steps per level
    low_temperature_mcmc_steps=1,  # HMC steps per level for p^beta, beta > 1 (4 measured worse: fewer levels)
    low_temperature_ramp=3.0,  # LowTemperature's lambda_t = (t / (T - 1))^ramp: tilt only once the modes separate
    low_temperature_mode=None,  # "twisted" | "sampler" | None: sampler (exact) from this many levels on, else twisted
    low_temperature_sampler_levels=150,
    pilot_fraction=8,  # pilot particles N_p = max(pilot_min, N / pilot_fraction)
    pilot_min=64,
    pilot_level_fraction=4,  # pilot levels T_p = max(8, T / pilot_level_fraction)
    alpha=0.3,  # weight of the rho-schedule floor in the level density
    num_islands=4,  # 4 x 256 at N = 1024: 93% coverage of the 95% interval (8 x 128: 87%; README, smc_coverage)
    min_island=128,  # particles per island needed before the island estimator is used
    disagreement_warn=3.5,  # warn when the islands' means disagree this many times more than their weights say
    # (picked on the stored budget-default rows, seeds 0-4: above every run within 2x the floor (max 3.07);
    # rates on fresh seeds in README, Benchmarks)
)


def place_levels(pilot_sigmas: Tensor, cess: Tensor, num_levels: int, *, alpha: float = 0.3) -> Tensor:
    """`[num_levels]` decreasing noise levels from sigma_max to sigma_min of `pilot_sigmas` `[T_p]`, with a density
    per pilot interval (t-1, t) proportional to alpha / (T_p - 1) + (1 - alpha) sqrt(-log cess[t]) / sum (t >= 1;
    cess[0], the initial weights, is not an interval). log sigma is linear in the cumulative density."""
    sig = noise_levels(sigmas=pilot_sigmas)
    tp = sig.numel()
    if tp < 2 or num_levels < 2:
        raise ValueError("place_levels needs at least 2 pilot levels and 2 levels")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    c = torch.as_tensor(cess, dtype=torch.float64).reshape(-1)[1:tp]
    r = torch.nan_to_num(-torch.log(c.clamp(min=1e-300, max=1.0)), nan=0.0).clamp(min=0.0).sqrt()
    total = float(r.sum())
    dens = torch.full((tp - 1,), alpha / (tp - 1), dtype=torch.float64)
    dens = dens + ((1.0 - alpha) * r / total if total > 0 else (1.0 - alpha) / (tp - 1))
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(dens, 0)])
    cum = cum / cum[-1]
    u = torch.linspace(0.0, 1.0, num_levels, dtype=torch.float64)
    i = torch.searchsorted(cum, u, right=True).clamp(1, tp - 1)  # interval (i-1, i) holds u
    frac = ((u - cum[i - 1]) / (cum[i] - cum[i - 1])).clamp(0.0, 1.0)
    log_s = torch.log(sig)
    out = torch.exp(log_s[i - 1] + frac * (log_s[i] - log_s[i - 1]))
    out[0], out[-1] = sig[0], sig[-1]
    return out


def low_temperature_formulation(target: Any) -> tuple[Any, float] | None:
    """(base target t, beta) if `target` is `compose.tempered(t, beta)` with beta > 1, else None."""
    from fkdiff.compose import Tempered

    if isinstance(target, Tempered) and target.beta > 1.0:
        return target.components[0], target.beta
    return None


def default_mcmc_steps(target: Any) -> int:
    """HMC steps per level the plan uses for `target` (DEFAULTS: 1, a low temperature p^beta included)."""
    key = "low_temperature_mcmc_steps" if low_temperature_formulation(target) is not None else "mcmc_steps"
    return int(DEFAULTS[key])


def _hmc(num_steps: int, num_leapfrog: int = 3):
    from fkdiff import mcmc as mcmc_mod

    return mcmc_mod.HMC(num_steps=num_steps, num_leapfrog=num_leapfrog)


def sample_with_budget(
    target: Any,
    num_particles: int,
    *,
    budget: float,
    shape: Sequence[int],
    sigma_max: float,
    sigma_min: float,
    generator: torch.Generator | None,
    mode: str | None,
    mcmc: Any,
    potentials: Sequence[Any],
    population: Any,
    rho: float,
    engine: dict,
    fk_kwargs: dict,
    adaptive: bool = True,
    settings: dict | None = None,
):
    """`fkdiff.smc.sample(..., budget=B)` (see the module docstring). `engine`: run_smc options (resample,
    ess_threshold, progress); `fk_kwargs`: the remaining DiffusionFK options."""
    from fkdiff.smc.core import LOCAL
    from fkdiff.smc.islands import Islands, island_disagreement
    from fkdiff.smc.potentials import LowTemperature

    cfg = {**DEFAULTS, **(settings or {})}
    n = int(num_particles)
    budget = float(budget)
    potentials = list(potentials)
    steps = cfg["mcmc_steps"]
    formulation = "as given"
    low = low_temperature_formulation(target) if mode is None else None
    if low is not None:
        target, beta = low
        potentials.append(LowTemperature(beta, ramp=cfg["low_temperature_ramp"]))
        steps = cfg["low_temperature_mcmc_steps"]
    if mcmc is None:
        mcmc = _hmc(steps, cfg["num_leapfrog"])
    # propagation (target + proposal) and MCMC (its moves, then the proposal at the moved points)
    with_proposal = int(fk_kwargs.get("proposal") is not None)
    per_level = 1 + 2 * with_proposal + int(getattr(mcmc, "num_steps", 1)) * int(getattr(mcmc, "num_leapfrog", 1))
    t_total = int(budget // per_level)
    if low is not None:
        mode = cfg["low_temperature_mode"] or ("sampler" if t_total >= cfg["low_temperature_sampler_levels"]
                                               else "twisted")
        formulation = (f"tempered(beta={beta:g}) -> {mode} + LowTemperature({beta:g}, "
                       f"ramp={cfg['low_temperature_ramp']:g})")
    mode = "sampler" if mode is None else mode
    if t_total < 8:
        raise ValueError(f"budget={budget:g} evaluations per particle allows only {t_total} levels at {per_level} "
                         "evaluations per level: give a budget of at least " f"{8 * per_level}")
    if population is not None and not isinstance(population, Islands) and population is not LOCAL:
        raise NotImplementedError(f"budget= runs in one process (LOCAL or Islands populations), not with "
                                  f"{type(population).__name__}: give num_levels for a sharded run")
    if population is None:
        r = cfg["num_islands"]
        population = Islands(r) if n % r == 0 and n // r >= cfg["min_island"] else LOCAL
    estimator = f"islands({population.num_islands})" if isinstance(population, Islands) else "lee_whiteley"

    def model(sigmas: Tensor) -> DiffusionFK:
        return DiffusionFK(target, sigmas, shape=shape, potentials=potentials, mode=mode, **fk_kwargs)

    pilot = None
    sigmas = noise_levels(t_total, sigma_max, sigma_min, rho=rho)
    if adaptive:
        n_p = min(n, max(cfg["pilot_min"], n // cfg["pilot_fraction"]))
        t_p = max(8, t_total // cfg["pilot_level_fraction"])
        pilot_cost = n_p * t_p * per_level / n
        t_main = int((budget - pilot_cost) // per_level)
        if t_main >= 8:
            import warnings

            from fkdiff.smc.core import SMCDegeneracyWarning

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SMCDegeneracyWarning)  # the pilot is only a measurement
                pres = LOCAL.run(model(noise_levels(t_p, sigma_max, sigma_min, rho=rho)), n_p, generator=generator,
                                 mcmc=mcmc, **engine)
            sigmas = place_levels(pres.sigmas, pres.cess, t_main, alpha=cfg["alpha"])
            pilot = dict(num_particles=n_p, num_levels=t_p, evaluations_per_particle=pres.nfe * n_p / n,
                         cess=pres.cess.tolist(), sigmas=pres.sigmas.tolist())
    res = population.run(model(sigmas), n, generator=generator, mcmc=mcmc, **engine)
    used = res.nfe + (pilot["evaluations_per_particle"] if pilot else 0.0)
    disagreement = None
    if isinstance(population, Islands):
        disagreement = island_disagreement(res.samples, res.log_weights, population.num_islands)
        if not disagreement <= cfg["disagreement_warn"]:  # NaN included
            import warnings

            from fkdiff.smc.core import SMCDegeneracyWarning

            msg = (f"the {population.num_islands} independent islands disagree {disagreement:.1f}x more than their "
                   "weights allow (threshold {:g}): the particles have not found where the mass is (e.g. a mode "
                   "missed or over-weighted); raise the budget (more levels and MCMC) or the number of particles"
                   .format(cfg["disagreement_warn"]))
            res.warnings.append(msg)
            warnings.warn(msg, SMCDegeneracyWarning, stacklevel=3)
    res.plan = dict(budget=budget, used_evaluations=used, num_levels=int(sigmas.numel()),
                    schedule="adaptive (pilot CESS)" if pilot else "rho", mode=mode, formulation=formulation,
                    mcmc=repr(mcmc), proposal_variance=fk_kwargs.get("proposal_variance", "ancestral"),
                    evaluations_per_level=per_level, estimator=estimator, pilot=pilot,
                    island_disagreement=disagreement)
    return res
