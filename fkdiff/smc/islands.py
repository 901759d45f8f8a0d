"""Independent islands in one process: a log Z error bar estimated from R independent sub-populations.

The island particle model (Vergé, Dubarry, Del Moral & Moulines 2015) with R islands of n = N / R particles: each
island resamples only within itself (when its own ESS < kappa n), so the islands are independent SMC runs with
estimates Z_r, and after a resampling an island's particles keep the island's mean weight (not zero), so the
population's total weight stays sum_r Z_r and the engine's log Z is that of the unbiased combination

    Z_hat = (1/R) sum_r Z_r.

With p_r = Z_r / sum_s Z_s (the final normalised weight held by island r, read from each particle's level-0 ancestor),
the relative variance of Z_hat is estimated from the spread of the R islands,

    Var(Z_hat) / Z_hat^2  ~  sum_r (R p_r - 1)^2 / (R (R - 1)),

with R - 1 degrees of freedom (a Student t interval for log Z, `SMCResult.log_Z_ci`). Unlike the genealogy
estimator of Lee & Whiteley it does not need level-0 ancestors to survive; its price is that particles never move
between islands (n must be large enough for one island to be a good SMC run on its own).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fkdiff.smc.core import Population
from fkdiff.smc.weights import Weights

__all__ = ["Islands", "island_disagreement"]


def island_disagreement(samples: Tensor, log_weights: Tensor, num_islands: int) -> float:
    """How much more the R islands' weighted means of x differ than their own weights say they should: the mean over
    coordinates of  Var_r(m_r) / mean_r(v_r / ESS_r),  m_r, v_r the weighted mean and variance of a coordinate in
    island r (rows [r n, (r + 1) n)), ESS_r its ESS. About 1 (chi^2_{R-1} / (R - 1)) when every island samples the
    same law with independent particles; large when the islands put the mass in different places (a mode found by
    some islands and not others: the particle approximation has not converged). NaN if an island has no weight."""
    r = int(num_islands)
    x = samples.detach().double().flatten(1).cpu()
    n = x.shape[0] // r
    lw = log_weights.detach().double().cpu().view(r, n)
    w = torch.softmax(lw, 1)  # [R, n] each island's own normalised weights
    if not bool(torch.isfinite(w).all()):
        return math.nan
    x = x.view(r, n, -1)
    m = (w[..., None] * x).sum(1)  # [R, d]
    v = (w[..., None] * (x - m[:, None]) ** 2).sum(1)
    ess = 1.0 / (w**2).sum(1)  # [R]
    within = (v / ess[:, None]).mean(0)  # [d]
    between = m.var(0)
    ok = within > 0
    if not bool(ok.any()):
        return math.nan
    return float((between[ok] / within[ok]).mean())


class Islands(Population):
    """All N particles in this process as `num_islands` independent islands of N / num_islands particles (rows
    [r n, (r + 1) n) form island r); log Z variance from the islands' spread (see the module docstring)."""

    def __init__(self, num_islands: int):
        if int(num_islands) != num_islands or num_islands < 2:
            raise ValueError(f"num_islands must be an integer >= 2, got {num_islands}")
        self.num_islands = int(num_islands)

    def _size(self, num_particles: int) -> int:
        r = self.num_islands
        if num_particles % r or num_particles // r < 2:
            raise ValueError(f"num_particles={num_particles} must be a multiple of num_islands={r} with at least 2 "
                             "particles per island")
        return num_particles // r

    def local_size(self, num_particles: int) -> int:
        self._size(num_particles)
        return num_particles

    def resample(self, w: Weights, resampler, ess_threshold: float,
                 generator: torch.Generator | None) -> tuple[Tensor | None, Tensor | None]:
        r, n = self.num_islands, self._size(w.num)
        lw = w.lw.view(r, n)
        log_norm = torch.logsumexp(lw, 1)  # [R] log of each island's total weight
        alive = log_norm > -math.inf
        log_w = lw - torch.where(alive, log_norm, torch.zeros_like(log_norm))[:, None]
        ess = torch.exp(-torch.logsumexp(2 * log_w, 1))
        need = alive & ((ess < ess_threshold * n) if ess_threshold < 1.0 else torch.ones_like(alive))
        if not bool(need.any()):
            return None, None
        anc = torch.arange(w.num, device=w.lw.device)
        after = w.lw.clone().view(r, n)
        for i in torch.nonzero(need).flatten().tolist():
            anc[i * n:(i + 1) * n] = i * n + resampler(lw[i], n, generator).to(anc.device)
            after[i] = log_norm[i] - math.log(n)  # the island keeps its total weight, shared equally
        return anc, after.view(-1)

    def log_Z_relative_variance(self, final: Weights, eve: Tensor, num_resampled: int) -> tuple[float, float]:
        r, n = self.num_islands, self._size(final.num)
        p = torch.zeros(r, dtype=torch.float64).index_add_(0, (eve.to(torch.long).cpu() // n), final.W.cpu())
        return float(((r * p - 1.0) ** 2).sum()) / (r * (r - 1)), float(r - 1)
