"""MCMC kernels for SMC rejuvenation and annealed sampling (DESIGN.md section 5; Du et al. 2023, appendix C).

Every kernel targets a density pi(x) ∝ exp(logp(x)) given by `logdensity_fn(x [N, *event]) -> (logp [N] float64,
grad_x logp [N, *event])` and moves the whole population at once, with a per-particle accept/reject:

- `HMC` — Hamiltonian Monte Carlo with leapfrog integration and identity mass matrix (Du et al. appendix C.1,
  algorithm 2), Metropolis-corrected per particle. With `damping = gamma > 0` it is algorithm 3 (Neal 1996, partial
  momentum refreshment): across the `num_steps` steps of one call,
      v <- gamma v + sqrt(1 - gamma^2) lambda,  lambda ~ N(0, I);  (x', v') = Leapfrog(x, v; eps, L);
      accept with prob min(1, pi(x') N(v') / (pi(x) N(v)))  ->  (x, v) = (x', v')   else  (x, v) = (x, -v)
  (the algorithm's two momentum negations cancel on acceptance and flip the momentum on rejection).
- `MALA` — Metropolis-adjusted Langevin (Besag 1994; Du et al. eq. 4 plus correction):
      x' = x + (eps^2 / 2) grad logp(x) + eps z,  accepted with the Metropolis–Hastings ratio of the Gaussian proposals.
- `RWM` — random-walk Metropolis (Metropolis et al. 1953): x' = x + eps z, accepted with min(1, pi(x') / pi(x)).
  It ignores the gradient in its move (robust where scores are noisy or stiff, e.g. near hard constraints); the
  gradient it carries only sets the population step size. Optimal acceptance about 0.23-0.44 (Roberts, Gelman &
  Gilks 1997 in high dimension; higher in 1-2D): `target_accept` 0.3.
- `ULA`, `UHMC` — the same moves without the correction (Du et al. eq. 4; Geffner & Domke 2021). They are
  *approximate*: they leave a perturbed law invariant (e.g. ULA on N(0, s^2) at step eps has stationary variance
  s^2 / (1 - eps^2 / (4 s^2))). `kernel.adjusted` is False for them and `info.acceptance` is 1.

Step size, outside the kernels (the blackjax pattern; DESIGN.md section 5, "what reference runs taught"; Du et al.
appendix C.2). A kernel is a pure move `kernel.step(state, logdensity_fn, step_size, generator) -> (state, info)` on
a `ChainState(x, logp, grad)` with a typed `MoveInfo`; `StepSizeAdapter(kernel, gather)` chooses the step size and
adapts it from call to call (level to level in SMC). Unless the kernel has a fixed `step_size`,
    eps = c / sqrt(median_n mean_d (grad logp(x_n))_d^2),
a population scale (the median, so that a few boundary particles with huge gradients do not shrink everyone's step)
that tracks sigma for free, times a constant `c` adapted toward the kernel's `target_accept`:
    log c <- log c + adapt_gain * (mean acceptance - target_accept).
The median and the mean run over the whole population: `gather` collects the rows held elsewhere (a sharded SMC
population, fkdiff.smc.distributed), so every process uses and carries the same step size. The step size, log c and
the adaptation's arithmetic stay on the particles' device as 0-d float64 tensors (the same IEEE operations as on
host floats), so an adapted call reads nothing back to the host: its step size, mean acceptance and divergent /
non-finite counts are device scalars (MCMCInfo), read by whoever reports them (the SMC engine, once after its loop).
Unadjusted kernels do not adapt `c` (they have no acceptance to adapt on; their would-be Metropolis acceptance is
reported as `info.mh_acceptance` at no extra evaluation): they use `init_scale` times the population scale, or the
fixed step size. Adapting them on the would-be acceptance was tried and drove them past the integrator's stability
limit on 2D Gaussians, where the would-be acceptance stays high while the chain already diverges.

A proposal whose logp is NaN / +-inf, or whose position or gradient is not finite, is always rejected (also by the
unadjusted kernels), so positions never become NaN; such proposals are counted in `info.num_nonfinite`. Proposals
whose Hamiltonian error exceeds `divergence_threshold` nats are counted as divergent.

All randomness comes from the `generator` argument, drawn for the whole population at once. No autograd graph is
kept: positions are detached and `logdensity_fn` is expected to return detached tensors (see `target_logdensity`).

Interface:
    kernel = HMC(num_steps=1, num_leapfrog=3, step_size=None, target_accept=0.7, damping=0.0)   # the rest keyword-only
    chain = kernel.init(x, logdensity_fn)                                  # ChainState(x, logp, grad)
    chain, move = kernel.step(chain, logdensity_fn, 0.1, generator)        # the pure move at a given step size
    adapter = StepSizeAdapter(kernel)                                      # or kernel.for_population(population)
    state = adapter.init_state()                                           # MCMCState (frozen): log c, last numbers
    x, state, info = adapter(x, logdensity_fn, generator=g, state=state, logp=None, grad=None)
    x, state, info = kernel(x, logdensity_fn, generator=g, state=state)    # the same, one population here
    x, state, infos = run(kernel, x0, logdensity_fn, num_iters=..., generator=g)          # standalone driver
`info.logp` / `info.grad` are the values at the returned positions: pass them to the next call to save an evaluation.
`KERNELS` / `build({kind: ..., **arguments})`: the kernels by name (the command line's `sample/mcmc` group).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor

from fkdiff.diffusion import check_sigma, checked_sigma
from fkdiff.targets import energy_and_score

__all__ = [
    "ChainState",
    "MoveInfo",
    "MCMCState",
    "MCMCInfo",
    "Kernel",
    "StepSizeAdapter",
    "HMC",
    "MALA",
    "ULA",
    "UHMC",
    "RWM",
    "population_scale",
    "scale_from_mean_squared_grad",
    "run",
    "target_logdensity",
    "KERNELS",
    "build",
]

LogDensityFn = Callable[[Tensor], "tuple[Tensor, Tensor]"]

_LOG_C_MIN, _LOG_C_MAX = math.log(1e-6), math.log(1e3)


class ChainState(NamedTuple):
    """What a chain carries from move to move: positions `x` `[N, *event]`, `logp` `[N]` float64 and `grad`
    `[N, *event]` at x (so a move evaluates only its proposals)."""

    x: Tensor
    logp: Tensor
    grad: Tensor


@dataclass(frozen=True)
class MoveInfo:
    """What one `Kernel.step` did.

    acceptance    `[N]` float64: mean Metropolis acceptance probability min(1, ratio) per particle over the move's
                  steps (1.0 for unadjusted kernels)
    mh_acceptance `[N]` float64: the same Metropolis probability, also for unadjusted kernels (what it would have been)
    num_evals     logdensity+grad evaluations per particle
    num_divergent proposals (summed over particles and steps) with Hamiltonian/MH error > divergence_threshold
    num_nonfinite proposals rejected because logp, position or gradient was NaN/inf
    (both counts 0-d int64 tensors on the particles' device: a move makes no host read; `MCMCInfo` keeps them so)
    """

    acceptance: Tensor
    mh_acceptance: Tensor
    num_evals: int
    num_divergent: Tensor
    num_nonfinite: Tensor


@dataclass(frozen=True)
class MCMCState:
    """Adaptation state carried from call to call (level to level): `log_scale` = log c, plus the last call's numbers.
    `log_scale` starts as a float and becomes a 0-d float64 device tensor once adapted; `acceptance` and `step_size`
    are 0-d device tensors after a call (a fixed step size stays a float): no host read in the loop."""

    log_scale: float | Tensor
    num_calls: int = 0
    acceptance: float | Tensor = math.nan  # population mean of the (would-be) Metropolis acceptance, last call
    step_size: float | Tensor = math.nan  # step size used by the last call

    @property
    def scale(self) -> float | Tensor:
        return self.log_scale.exp() if isinstance(self.log_scale, Tensor) else math.exp(self.log_scale)


@dataclass(frozen=True)
class MCMCInfo:
    """Diagnostics of one adapted call (`StepSizeAdapter.__call__`): the move's `MoveInfo` fields, the step size it
    used (a 0-d float64 device tensor, or the kernel's fixed float), and logp `[N]` / grad `[N, *event]` at the
    returned positions (pass them to the next call). The counts are 0-d int64 device tensors (no host read)."""

    acceptance: Tensor
    mh_acceptance: Tensor
    step_size: float | Tensor
    num_evals: int
    num_divergent: Tensor
    num_nonfinite: Tensor
    logp: Tensor
    grad: Tensor

    @property
    def mean_acceptance(self) -> float:
        return float(self.acceptance.mean())


def population_scale(grad: Tensor) -> float:
    """1 / sqrt(median over particles of the mean squared gradient) for `grad` `[N, *event]`.

    Non-finite rows are ignored; a zero or undefined median (a flat density) falls back to the mean, then to 1.
    """
    return scale_from_mean_squared_grad(_mean_squared(grad))


def _mean_squared(grad: Tensor) -> Tensor:
    return grad.detach().double().flatten(1).pow(2).mean(1)


def scale_from_mean_squared_grad(msg: Tensor) -> float:
    """`population_scale` from the per-particle mean squared gradients `msg` `[N]` (for callers that gather them)."""
    return float(_scale_from_mean_squared_grad(msg))


def _scale_from_mean_squared_grad(msg: Tensor) -> Tensor:
    """`scale_from_mean_squared_grad` as a 0-d float64 tensor on msg's device, with no host read: the median of the
    finite entries (non-finite ones set to NaN, which nanmedian skips; the lower middle, as median), else their mean,
    else 1."""
    msg = msg.double()
    msg = torch.where(torch.isfinite(msg), msg, torch.full_like(msg, math.nan))
    med = msg.nanmedian()
    med = torch.where(med > 0, med, msg.nanmean())
    ok = (med > 0) & torch.isfinite(med)
    one = torch.ones_like(med)
    return torch.where(ok, 1.0 / torch.sqrt(torch.where(ok, med, one)), one)


def _evaluate(logdensity_fn: LogDensityFn, x: Tensor) -> tuple[Tensor, Tensor]:
    logp, grad = logdensity_fn(x)
    if logp.shape != (x.shape[0],):
        raise ValueError(f"logdensity_fn must return logp of shape [N]=[{x.shape[0]}], got {tuple(logp.shape)}")
    if grad.shape != x.shape:
        raise ValueError(f"logdensity_fn must return grad of shape {tuple(x.shape)}, got {tuple(grad.shape)}")
    return logp.detach().double(), grad.detach().to(x.dtype)


def _rowsum(t: Tensor) -> Tensor:
    return t.double().flatten(1).sum(1)


def _rowfinite(t: Tensor) -> Tensor:
    return torch.isfinite(t).flatten(1).all(1)


def _bcast(mask: Tensor, x: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class Kernel:
    """A pure move `step` (subclasses) plus the settings its `StepSizeAdapter` reads (step_size, target_accept,
    init_scale, adapt_gain, max_step_size). Calling the kernel runs it through an adapter over one local population."""

    num_steps: int = 1
    _: KW_ONLY
    step_size: float | None = None
    target_accept: float = 0.65
    init_scale: float = 0.5
    adapt_gain: float = 0.5
    max_step_size: float | None = None
    divergence_threshold: float = 1000.0

    adjusted = True  # class attribute, overridden by the unadjusted kernels
    # class attribute: `step` returns, row by row, its start or a proposal it evaluated through logdensity_fn (so a
    # caller that memoises the evaluations, e.g. the SMC engine's diffusion FK model, needs no check for others)
    returns_evaluated = True

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.step_size is not None and not (self.step_size > 0 and math.isfinite(self.step_size)):
            raise ValueError(f"step_size must be a positive float or None, got {self.step_size}")
        if not 0.0 < self.target_accept < 1.0:
            raise ValueError(f"target_accept must be in (0, 1), got {self.target_accept}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")

    # -- the pure move -----------------------------------------------------------------------------
    def init(self, x: Tensor, logdensity_fn: LogDensityFn) -> ChainState:
        """The chain state at positions x `[N, *event]` (one evaluation); NaN logp -> -inf."""
        x = x.detach()
        logp, grad = _evaluate(logdensity_fn, x)
        return ChainState(x, torch.where(torch.isnan(logp), torch.full_like(logp, -math.inf), logp), grad)

    def step(self, state: ChainState, logdensity_fn: LogDensityFn, step_size: float,
             generator: torch.Generator | None) -> tuple[ChainState, MoveInfo]:  # pragma: no cover - abstract
        """`num_steps` moves of every particle at `step_size`; returns the new chain state and what the move did."""
        raise NotImplementedError

    def _accept(self, log_ratio: Tensor, ok: Tensor, generator, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-particle acceptance: (probability `[N]`, accepted mask `[N]`). Non-finite proposals (`~ok`) never pass."""
        log_ratio = torch.where(ok & ~torch.isnan(log_ratio), log_ratio, torch.full_like(log_ratio, -math.inf))
        prob = log_ratio.clamp(max=0.0).exp()
        if not self.adjusted:
            return prob, ok
        u = torch.rand(log_ratio.shape[0], generator=generator, dtype=torch.float64, device=x.device)
        return prob, ok & (u < prob)

    def _metropolis(self, state: ChainState, proposal: ChainState, log_ratio: Tensor, generator,
                    ok: Tensor | None = None) -> tuple[ChainState, Tensor, Tensor, int, int]:
        """One per-particle Metropolis–Hastings decision between `state` and `proposal` (log acceptance ratio
        `log_ratio` `[N]`; always taken by unadjusted kernels; never for a non-finite proposal or where `ok` is False).
        Returns (new state, acceptance probability `[N]`, accepted `[N]`, number non-finite, number divergent)."""
        x, logp, grad = state
        xn, lpn, gn = proposal
        finite = torch.isfinite(lpn) & _rowfinite(xn) & _rowfinite(gn) & (True if ok is None else ok)
        prob, accept = self._accept(log_ratio, finite, generator, x)
        n_div = (finite & (-log_ratio > self.divergence_threshold)).sum()  # counts stay on the device (no host read)
        m = _bcast(accept, x)
        new = ChainState(torch.where(m, xn, x), torch.where(accept, lpn, logp), torch.where(m, gn, grad))
        return new, prob, accept, (~finite).sum(), n_div

    def _info(self, mh_sum: Tensor, num_evals: int, n_div: int, n_bad: int) -> MoveInfo:
        k = self.num_steps
        acc = mh_sum / k if self.adjusted else torch.ones_like(mh_sum)
        return MoveInfo(acceptance=acc, mh_acceptance=mh_sum / k, num_evals=num_evals, num_divergent=n_div,
                        num_nonfinite=n_bad)

    # -- with step-size adaptation -------------------------------------------------------------------
    def for_population(self, population: Any = None) -> "StepSizeAdapter":
        """This kernel behind a `StepSizeAdapter` whose reductions run over `population` (anything with
        `gather(rows [n, ...]) -> [N, ...]`, e.g. a fkdiff.smc Population; None: the rows given are everything)."""
        return StepSizeAdapter(self, None if population is None else population.gather)

    def init_state(self) -> MCMCState:
        return StepSizeAdapter(self).init_state()

    def __call__(self, x: Tensor, logdensity_fn: LogDensityFn, *, generator: torch.Generator | None,
                 state: MCMCState, logp: Tensor | None = None,
                 grad: Tensor | None = None) -> tuple[Tensor, MCMCState, MCMCInfo]:
        """`StepSizeAdapter(self)(...)`: one adapted call on a population held here (see StepSizeAdapter)."""
        return StepSizeAdapter(self)(x, logdensity_fn, generator=generator, state=state, logp=logp, grad=grad)


class StepSizeAdapter:
    """A kernel with its step size chosen and adapted from the whole population (see the module docstring).

    eps = the kernel's fixed step_size, or c * scale_from_mean_squared_grad(all N particles' mean squared gradients),
    capped by max_step_size; after the move log c <- log c + adapt_gain (mean mh_acceptance over all N - target_accept)
    for adjusted kernels. `gather` maps this process's rows `[n, ...]` to the whole population's `[N, ...]` (identity
    by default), so sharded populations keep one step size on every process.
    """

    def __init__(self, kernel: Kernel, gather: Callable[[Tensor], Tensor] | None = None):
        if not callable(getattr(kernel, "step", None)):
            raise TypeError(f"StepSizeAdapter wraps a kernel with a pure move step(state, logdensity_fn, step_size, "
                            f"generator); got {type(kernel).__name__}")
        self.kernel = kernel
        self.gather = gather if gather is not None else (lambda t: t)

    def for_population(self, population: Any = None) -> "StepSizeAdapter":
        return self.kernel.for_population(population)

    @property
    def returns_evaluated(self) -> bool:
        """Whether every returned position was evaluated through logdensity_fn (`Kernel.returns_evaluated`)."""
        return bool(getattr(self.kernel, "returns_evaluated", False))

    def init_state(self) -> MCMCState:
        return MCMCState(log_scale=math.log(self.kernel.init_scale))

    def step_size(self, state: MCMCState, grad: Tensor) -> float | Tensor:
        """The step size of this call: the fixed one (a float), or c * the population scale of `grad`, capped by
        max_step_size (a 0-d float64 tensor on grad's device: no host read)."""
        k = self.kernel
        if k.step_size is not None:
            return float(k.step_size)
        c = state.scale  # exp(log c): on the device once adapted (no host read)
        eps = c * _scale_from_mean_squared_grad(self.gather(_mean_squared(grad)))
        if k.max_step_size is not None:
            eps = eps.clamp(max=float(k.max_step_size))
        return eps

    def update(self, state: MCMCState, mh_acceptance: Tensor, eps: float | Tensor) -> MCMCState:
        """The state after a call at step `eps` whose per-particle Metropolis probabilities were `mh_acceptance`."""
        return self._adapt(state, self.gather(mh_acceptance.detach().double()).mean(), eps)

    def _adapt(self, state: MCMCState, mean_acc: Tensor, eps: float | Tensor) -> MCMCState:
        """log c <- clamp(log c + adapt_gain (mean_acc - target_accept)) where mean_acc is finite, on the device."""
        k = self.kernel
        log_c = state.log_scale
        if k.step_size is None and k.adjusted:
            log_c = torch.as_tensor(log_c, dtype=torch.float64, device=mean_acc.device)
            moved = (log_c + k.adapt_gain * (mean_acc - k.target_accept)).clamp(_LOG_C_MIN, _LOG_C_MAX)
            log_c = torch.where(torch.isfinite(mean_acc), moved, log_c)
        return replace(state, log_scale=log_c, num_calls=state.num_calls + 1, acceptance=mean_acc, step_size=eps)

    def __call__(
        self,
        x: Tensor,
        logdensity_fn: LogDensityFn,
        *,
        generator: torch.Generator | None,
        state: MCMCState,
        logp: Tensor | None = None,
        grad: Tensor | None = None,
    ) -> tuple[Tensor, MCMCState, MCMCInfo]:
        """Run the kernel's move on every particle of `x` `[N, *event]` at the population step size, then adapt.

        `logp` `[N]` / `grad` `[N, *event]` at `x` may be passed to save one evaluation.
        Returns (x_new `[N, *event]`, adapted state, MCMCInfo).
        """
        if logp is None or grad is None:
            chain, extra = self.kernel.init(x, logdensity_fn), 1
        else:
            logp = logp.detach().double()
            chain, extra = ChainState(x.detach(), torch.where(torch.isnan(logp), torch.full_like(logp, -math.inf), logp),
                                      grad.detach().to(x.dtype)), 0
        eps = self.step_size(state, chain.grad)  # a device scalar (the median stays there), or the fixed float
        chain, move = self.kernel.step(chain, logdensity_fn, eps, generator)
        mean_acc = self.gather(move.mh_acceptance.detach().double()).mean()
        dev = move.acceptance.device
        info = MCMCInfo(acceptance=move.acceptance, mh_acceptance=move.mh_acceptance, step_size=eps,
                        num_evals=move.num_evals + extra,
                        num_divergent=torch.as_tensor(move.num_divergent, dtype=torch.int64, device=dev),
                        num_nonfinite=torch.as_tensor(move.num_nonfinite, dtype=torch.int64, device=dev),
                        logp=chain.logp, grad=chain.grad)
        return chain.x, self._adapt(state, mean_acc, eps), info


@dataclass(frozen=True)
class HMC(Kernel):
    """Metropolis-corrected HMC (Du et al. alg. 2), partial momentum refresh with `damping` (alg. 3)."""

    num_leapfrog: int = 3
    _: KW_ONLY
    damping: float = 0.0
    target_accept: float = 0.7  # Du et al. appendix C.2 tune HMC to about 70% acceptance

    def __post_init__(self):
        super().__post_init__()
        if self.num_leapfrog < 1:
            raise ValueError(f"num_leapfrog must be >= 1, got {self.num_leapfrog}")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"damping must be in [0, 1), got {self.damping}")

    def step(self, state, logdensity_fn, step_size, generator):
        eps = step_size
        x = state.x
        mh_sum = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        n_div = n_bad = 0
        gamma = self.damping
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) if gamma > 0 else None
        for _ in range(self.num_steps):
            lam = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            v = lam if v is None or gamma == 0 else gamma * v + math.sqrt(1.0 - gamma**2) * lam
            # leapfrog (L steps, L evaluations: the gradient at x is cached)
            xn, g = state.x, state.grad
            vn = v + 0.5 * eps * g
            for ell in range(self.num_leapfrog):
                xn = xn + eps * vn
                lpn, g = _evaluate(logdensity_fn, xn)
                vn = vn + (eps if ell < self.num_leapfrog - 1 else 0.5 * eps) * g
            d_h = (-lpn + 0.5 * _rowsum(vn**2)) - (-state.logp + 0.5 * _rowsum(v**2))  # H' - H
            state, prob, accept, bad, div = self._metropolis(state, ChainState(xn, lpn, g), -d_h, generator,
                                                             ok=_rowfinite(vn))
            n_bad, n_div, mh_sum = n_bad + bad, n_div + div, mh_sum + prob
            v = torch.where(_bcast(accept, v), vn, -v)  # alg. 3: momentum kept on accept, flipped on reject
        return state, self._info(mh_sum, self.num_steps * self.num_leapfrog, n_div, n_bad)


@dataclass(frozen=True)
class UHMC(HMC):
    """Unadjusted HMC (no Metropolis step; approximate; Du et al. appendix C.1, Geffner & Domke 2021)."""

    adjusted = False


@dataclass(frozen=True)
class MALA(Kernel):
    """Metropolis-adjusted Langevin: x' = x + (eps^2/2) grad logp(x) + eps z, MH-corrected per particle."""

    target_accept: float = 0.57

    def step(self, state, logdensity_fn, step_size, generator):
        eps = step_size
        mh_sum = torch.zeros(state.x.shape[0], dtype=torch.float64, device=state.x.device)
        n_div = n_bad = 0
        h = 0.5 * eps**2
        for _ in range(self.num_steps):
            x, logp, grad = state
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            xn = x + h * grad + eps * z
            lpn, gn = _evaluate(logdensity_fn, xn)
            log_fwd = -0.5 * _rowsum(z**2)  # log q(x' | x) + const
            log_bwd = -0.5 * _rowsum((x - xn - h * gn) ** 2) / eps**2  # log q(x | x') + const
            state, prob, _, bad, div = self._metropolis(state, ChainState(xn, lpn, gn), lpn - logp + log_bwd - log_fwd,
                                                        generator)
            n_bad, n_div, mh_sum = n_bad + bad, n_div + div, mh_sum + prob
        return state, self._info(mh_sum, self.num_steps, n_div, n_bad)


@dataclass(frozen=True)
class ULA(MALA):
    """Unadjusted Langevin: the MALA move always taken (approximate, biased at finite step; Du et al. eq. 4)."""

    adjusted = False


@dataclass(frozen=True)
class RWM(Kernel):
    """Random-walk Metropolis: x' = x + eps z, z ~ N(0, I), accepted per particle with min(1, pi(x') / pi(x))."""

    target_accept: float = 0.3

    def step(self, state, logdensity_fn, step_size, generator):
        mh_sum = torch.zeros(state.x.shape[0], dtype=torch.float64, device=state.x.device)
        n_div = n_bad = 0
        for _ in range(self.num_steps):
            x = state.x
            xn = x + step_size * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            lpn, gn = _evaluate(logdensity_fn, xn)
            # symmetric proposal: the ratio of densities only
            state, prob, _, bad, div = self._metropolis(state, ChainState(xn, lpn, gn), lpn - state.logp, generator)
            n_bad, n_div, mh_sum = n_bad + bad, n_div + div, mh_sum + prob
        return state, self._info(mh_sum, self.num_steps, n_div, n_bad)


def run(
    kernel: Kernel,
    x0: Tensor,
    logdensity_fn: LogDensityFn,
    *,
    num_iters: int,
    generator: torch.Generator | None,
    adapt: bool = True,
    state: MCMCState | None = None,
) -> tuple[Tensor, MCMCState, list[MCMCInfo]]:
    """Standalone driver: `num_iters` adapted kernel calls from `x0` `[N, *event]` on a fixed target.

    Evaluations are reused between calls (logp/grad of the returned positions). With `adapt=False` every call uses
    the initial state (fixed c). Returns (x `[N, *event]`, final state, list of MCMCInfo).
    """
    adapter = StepSizeAdapter(kernel)
    state0 = adapter.init_state() if state is None else state
    st, x, logp, grad, infos = state0, x0.detach(), None, None, []
    for _ in range(num_iters):
        x, new_st, info = adapter(x, logdensity_fn, generator=generator, state=st, logp=logp, grad=grad)
        st = new_st if adapt else replace(new_st, log_scale=state0.log_scale)
        logp, grad = info.logp, info.grad
        infos.append(info)
    return x, st, infos


def target_logdensity(target: Any, sigma: float | Tensor, *, max_batch: int | None = None) -> LogDensityFn:
    """logdensity_fn of pi(x) ∝ exp(-E(x, sigma)) for any target (energy, optional score; fkdiff.targets).

    Returns `fn(x [N, *event]) -> (-E [N] float64, score [N, *event])`, chunked by `max_batch`, detached.
    sigma (a float or a `[N]` tensor) is validated here, once, not at every evaluation.
    """
    if not isinstance(sigma, Tensor):
        check_sigma(torch.tensor(float(sigma), dtype=torch.float64))
    else:
        check_sigma(sigma)

    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        s = checked_sigma(sigma.to(x) if isinstance(sigma, Tensor) else torch.full((x.shape[0],), float(sigma),
                                                                                    dtype=x.dtype, device=x.device))
        e, score = energy_and_score(target, x, s, max_batch=max_batch)
        return -e.double(), score

    return fn


KERNELS: dict[str, type[Kernel]] = {"hmc": HMC, "mala": MALA, "ula": ULA, "uhmc": UHMC, "rwm": RWM}


def build(spec: Mapping[str, Any] | None) -> Kernel | None:
    """A kernel from `{kind: <a KERNELS name> | none, **its arguments}` (e.g. the command line's `sample.mcmc`).

    None-valued arguments take the kernel's default; `kind: none` (or an empty spec) means no kernel (None).
    An argument the kernel does not take is an error naming the ones it does.
    """
    if not spec:
        return None
    spec = dict(spec)
    kind = str(spec.pop("kind", "hmc")).lower()
    if kind in ("none", "null", ""):
        return None
    if kind not in KERNELS:
        raise ValueError(f"unknown mcmc kind {kind!r}; use one of {', '.join(KERNELS)} or none")
    cls = KERNELS[kind]
    known = {f.name for f in dataclasses.fields(cls) if f.name != "_"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} takes no {', '.join(unknown)} (it takes {', '.join(sorted(known))}); "
                         f"on the command line select the kernel with sample/mcmc={kind} rather than "
                         f"sample.mcmc.kind={kind}")
    return cls(**{k: v for k, v in spec.items() if v is not None})
