"""Importance weights in log space (Chopin & Papaspiliopoulos 2020, sec. 8.6; nchopin/particles `Weights`).

For unnormalised log-weights l_n (float64):
    W_n = exp(l_n - logsumexp(l)),   ESS = 1 / sum_n W_n^2,   log_mean = logsumexp(l) - log N.
A NaN or +inf log-weight (a broken energy, an overflow) is invalid: it is replaced by -inf (weight zero) and counted
in `num_invalid`; a -inf log-weight is a legitimate zero weight (e.g. outside a hard constraint).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Weights", "sanitize_log_weights"]


def sanitize_log_weights(log_weights: Tensor) -> tuple[Tensor, int]:
    """(log_weights in float64 with NaN/+inf replaced by -inf `[N]`, number replaced)."""
    lw = log_weights.detach().to(torch.float64)
    bad = torch.isnan(lw) | (lw == math.inf)
    num_bad = int(bad.sum())
    if num_bad:
        lw = torch.where(bad, torch.full_like(lw, -math.inf), lw)
    return lw, num_bad


class Weights:
    """Normalised weights of a population, computed once from unnormalised log-weights `[N]`.

    Attributes: `lw` `[N]` float64 (sanitised), `log_W` `[N]` normalised log-weights, `W` `[N]`, `ess` (float),
    `log_mean` (float, log of the mean unnormalised weight), `num_invalid` (NaN/+inf entries replaced by -inf),
    `num_alive` (entries with positive weight), `all_dead` (bool: every weight is zero; then W and log_W are NaN-free
    uniform placeholders and `ess` is 0).
    """

    def __init__(self, log_weights: Tensor):
        if log_weights.ndim != 1 or log_weights.numel() == 0:
            raise ValueError(f"log_weights must have shape [N] with N >= 1, got {tuple(log_weights.shape)}")
        self.lw, self.num_invalid = sanitize_log_weights(log_weights)
        n = self.lw.numel()
        self.num_alive = int((self.lw > -math.inf).sum())
        self.all_dead = self.num_alive == 0
        if self.all_dead:
            self.log_norm = -math.inf
            self.log_mean = -math.inf
            self.log_W = torch.full_like(self.lw, -math.log(n))
            self.W = self.log_W.exp()
            self.ess = 0.0
            return
        log_norm = torch.logsumexp(self.lw, 0)
        self.log_norm = float(log_norm)
        self.log_mean = self.log_norm - math.log(n)
        self.log_W = self.lw - log_norm
        self.W = self.log_W.exp()
        alive = self.lw[self.lw > -math.inf]
        if float(alive.max()) == float(alive.min()):  # equal weights (an unweighted sampler): exactly the number alive
            self.ess = float(self.num_alive)
        else:  # ESS = 1 / sum W^2 = exp(-logsumexp(2 log W))
            self.ess = float(torch.exp(-torch.logsumexp(2 * self.log_W, 0)))

    @property
    def num(self) -> int:
        return self.lw.numel()

    def __repr__(self) -> str:
        return f"Weights(N={self.num}, ess={self.ess:.1f}, alive={self.num_alive}, invalid={self.num_invalid})"
