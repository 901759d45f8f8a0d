"""Importance weights in log space (Chopin & Papaspiliopoulos 2020, sec. 8.6; nchopin/particles `Weights`).

For unnormalised log-weights l_n (float64):
    W_n = exp(l_n - logsumexp(l)),   ESS = 1 / sum_n W_n^2,   log_mean = logsumexp(l) - log N.
A NaN or +inf log-weight (a broken energy, an overflow) is invalid: it is replaced by -inf (weight zero) and counted
in `num_invalid`; a -inf log-weight is a legitimate zero weight (e.g. outside a hard constraint).

The scalars (ESS, log-normaliser, counts) are computed on the weights' device and read to the host together, in one
transfer (one synchronisation of a GPU stream per set of weights: the ESS decision needs it); `extra` device scalars
of the caller (the engine's log Z and conditional ESS terms) ride along in the same read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Weights", "sanitize_log_weights"]


def _sanitize(log_weights: Tensor) -> tuple[Tensor, Tensor]:
    """(log_weights in float64 with NaN/+inf replaced by -inf, number replaced as a device scalar): no host read."""
    lw = log_weights.detach().to(torch.float64)
    bad = torch.isnan(lw) | (lw == math.inf)
    return torch.where(bad, torch.full_like(lw, -math.inf), lw), bad.sum()


def sanitize_log_weights(log_weights: Tensor) -> tuple[Tensor, int]:
    """(log_weights in float64 with NaN/+inf replaced by -inf `[N]`, number replaced)."""
    lw, num_bad = _sanitize(log_weights)
    return lw, int(num_bad)


class Weights:
    """Normalised weights of a population, computed once from unnormalised log-weights `[N]`.

    Attributes: `lw` `[N]` float64 (sanitised), `log_W` `[N]` normalised log-weights, `W` `[N]`, `ess` (float),
    `log_mean` (float, log of the mean unnormalised weight), `num_invalid` (NaN/+inf entries replaced by -inf),
    `num_alive` (entries with positive weight), `all_dead` (bool: every weight is zero; then W and log_W are NaN-free
    uniform placeholders and `ess` is 0). `extra`: name -> 0-d device tensor, read in the same host transfer into
    `self.extra` (name -> float).
    """

    def __init__(self, log_weights: Tensor, extra: dict[str, Tensor] | None = None):
        if log_weights.ndim != 1 or log_weights.numel() == 0:
            raise ValueError(f"log_weights must have shape [N] with N >= 1, got {tuple(log_weights.shape)}")
        self.lw, num_bad = _sanitize(log_weights)
        n = self.lw.numel()
        alive = self.lw > -math.inf
        log_norm = torch.logsumexp(self.lw, 0)  # -inf when every weight is zero
        log_W = self.lw - log_norm
        lo = torch.where(alive, self.lw, torch.full_like(self.lw, math.inf)).min()
        equal = self.lw.max() == lo  # equal weights (an unweighted sampler): ESS is exactly the number alive
        ess = torch.exp(-torch.logsumexp(2 * log_W, 0))  # ESS = 1 / sum W^2 = exp(-logsumexp(2 log W))
        names = list(extra or {})
        scalars = [num_bad, alive.sum(), log_norm, equal, ess] + [extra[k] for k in names]
        values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in scalars]).tolist()  # the one read
        self.num_invalid, self.num_alive = int(values[0]), int(values[1])
        self.extra = dict(zip(names, values[5:]))
        self.all_dead = self.num_alive == 0
        if self.all_dead:
            self.log_norm = -math.inf
            self.log_mean = -math.inf
            self.log_W = torch.full_like(self.lw, -math.log(n))
            self.W = self.log_W.exp()
            self.ess = 0.0
            return
        self.log_norm = values[2]
        self.log_mean = self.log_norm - math.log(n)
        self.log_W = log_W
        self.W = self.log_W.exp()
        self.ess = float(self.num_alive) if values[3] else values[4]

    @property
    def num(self) -> int:
        return self.lw.numel()

    def __repr__(self) -> str:
        return f"Weights(N={self.num}, ess={self.ess:.1f}, alive={self.num_alive}, invalid={self.num_invalid})"
