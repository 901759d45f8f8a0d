"""Resampling schemes (Douc, Cappé & Moulines 2005; Chopin & Papaspiliopoulos 2020, ch. 9).

Every scheme has one signature

    resample(log_weights [N] float, num: int, generator) -> ancestors [num] int64

and is *unbiased*: the expected number of offspring of particle n is num * W_n, W = softmax(log_weights).
All schemes are inverse-CDF transforms of uniforms U_m in [0, 1):

- multinomial: U_m i.i.d.
- stratified:  U_m = (m + V_m) / num, V_m i.i.d. U[0, 1)
- systematic:  U_m = (m + V) / num,   one V ~ U[0, 1)
- residual:    floor(num W_n) deterministic copies, the remaining R = num - sum floor(num W_n) drawn multinomially
               from the residual weights num W_n - floor(num W_n).

Zero-weight safety: the inverse CDF picks the first n with C_n > u for the *unnormalised* float64 cumulative sum C
and u scaled by C_N. A particle with weight exactly 0 has an empty interval [C_{n-1}, C_n) and is never returned;
u >= C_N (possible only by float rounding) is mapped to the last particle with positive weight. Log-weights are
promoted to float64 before exponentiation, so a float32 input whose weights underflow in float32 still resamples
correctly. NaN and +inf log-weights are rejected (sanitise them with `fkdiff.smc.weights.Weights` first), and so
are all -inf: a check that reads the device once per call; `check=False` skips it for a caller that already knows
(the SMC engine: its `Weights` are sanitised and their number alive was read with the ESS).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
from torch import Tensor

__all__ = ["multinomial", "stratified", "systematic", "residual", "RESAMPLERS", "get_resampler", "inverse_cdf"]

Resampler = Callable[[Tensor, int, "torch.Generator | None"], Tensor]


def _unnormalised(log_weights: Tensor, check: bool = True) -> Tensor:
    """exp(log_weights - max) in float64 `[N]`, after validating the input (`check`: one host read of its values;
    False for a caller that already knows them free of NaN/+inf and not all -inf, e.g. the SMC engine, whose
    sanitised `Weights` have read the number alive in the level's one read)."""
    if log_weights.ndim != 1 or log_weights.numel() == 0:
        raise ValueError(f"log_weights must have shape [N] with N >= 1, got {tuple(log_weights.shape)}")
    lw = log_weights.detach().to(torch.float64)
    m = lw.max()
    if not check:
        return torch.exp(lw - m)
    invalid, all_zero = torch.stack([(torch.isnan(lw) | (lw == float("inf"))).any(), m == float("-inf")]).tolist()
    if invalid:  # both checks in one host read
        raise ValueError("log_weights contain NaN or +inf; sanitise them (fkdiff.smc.weights.Weights) first")
    if all_zero:
        raise ValueError("cannot resample: every weight is zero (all log-weights are -inf)")
    return torch.exp(lw - m)


def inverse_cdf(u: Tensor, w: Tensor) -> Tensor:
    """Ancestors `[M]` for uniforms `u` `[M]` in [0, 1) and non-negative unnormalised float64 weights `w` `[N]`."""
    cdf = torch.cumsum(w, 0)
    total = cdf[-1]
    idx = torch.searchsorted(cdf, u.to(torch.float64) * total, right=True)
    positions = torch.arange(w.numel(), device=w.device)
    last_positive = torch.where(w > 0, positions, torch.zeros_like(positions)).max()  # on the device: no host read
    return torch.minimum(idx, last_positive)


def _check_num(num: int) -> int:
    num = int(num)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    return num


def multinomial(log_weights: Tensor, num: int, generator: torch.Generator | None = None, *,
                check: bool = True) -> Tensor:
    """i.i.d. draws from Cat(W). `[num]` int64."""
    w = _unnormalised(log_weights, check)
    num = _check_num(num)
    u = torch.rand(num, generator=generator, dtype=torch.float64, device=w.device)
    return inverse_cdf(u, w)


def stratified(log_weights: Tensor, num: int, generator: torch.Generator | None = None, *,
               check: bool = True) -> Tensor:
    """One uniform per stratum [m/num, (m+1)/num). `[num]` int64."""
    w = _unnormalised(log_weights, check)
    num = _check_num(num)
    v = torch.rand(num, generator=generator, dtype=torch.float64, device=w.device)
    u = (torch.arange(num, dtype=torch.float64, device=w.device) + v) / num
    return inverse_cdf(u, w)


def systematic(log_weights: Tensor, num: int, generator: torch.Generator | None = None, *,
               check: bool = True) -> Tensor:
    """One shared uniform offset for all strata. `[num]` int64."""
    w = _unnormalised(log_weights, check)
    num = _check_num(num)
    v = torch.rand(1, generator=generator, dtype=torch.float64, device=w.device)
    u = (torch.arange(num, dtype=torch.float64, device=w.device) + v) / num
    return inverse_cdf(u, w)


def residual(log_weights: Tensor, num: int, generator: torch.Generator | None = None, *,
             check: bool = True) -> Tensor:
    """floor(num W) deterministic copies plus multinomial draws from the residuals. `[num]` int64."""
    w = _unnormalised(log_weights, check)
    num = _check_num(num)
    nw = num * w / w.sum()
    copies = torch.floor(nw).to(torch.int64)
    # float rounding can make sum(floor(num W)) exceed num by one at most in pathological cases: trim from the largest
    excess = int(copies.sum()) - num
    if excess > 0:
        order = torch.argsort(copies, descending=True)
        copies[order[:excess]] -= 1
    res = (nw - copies.to(torch.float64)).clamp_min(0.0)
    res = torch.where(w > 0, res, torch.zeros_like(res))
    num_det = int(copies.sum())
    det = torch.searchsorted(torch.cumsum(copies, 0), torch.arange(num_det, device=w.device), right=True)
    num_rest = num - det.numel()
    if num_rest == 0:
        return det
    if not (res > 0).any():  # all residuals rounded to zero: spread over the positive-weight particles
        res = (w > 0).to(torch.float64)
    u = torch.rand(num_rest, generator=generator, dtype=torch.float64, device=w.device)
    return torch.cat([det, inverse_cdf(u, res)])


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(scheme: str | Resampler, *, check: bool = True) -> Resampler:
    """A scheme by name (see RESAMPLERS) or a callable with the resampler signature. `check=False`: a scheme that
    takes a `check` argument (the built-ins) skips its input check (for sanitised log-weights known not to be all
    -inf); any other function (a callable, or one a user registered without `check`) is returned as it is."""
    if callable(scheme):
        return scheme
    if scheme not in RESAMPLERS:
        raise KeyError(f"unknown resampling scheme {scheme!r}; available: {', '.join(sorted(RESAMPLERS))}")
    fn = RESAMPLERS[scheme]
    if check or "check" not in inspect.signature(fn).parameters:
        return fn
    return functools.partial(fn, check=False)
