"""The SMC engine for any Feynman–Kac model (Chopin & Papaspiliopoulos 2020, alg. 10.3 with adaptive resampling;
Del Moral, Doucet & Jasra 2006 for the resample-move sampler; DESIGN.md section 5).

One step at level t (`smc_step`, a pure function of the carried `SMCState`):

    propagate   X_t^n ~ M_t(. | X_{t-1}^n)                   (M_0 at t = 0)
    weight      l_t^n = l_{t-1}^n + log G_t(X_{t-1}^n, X_t^n)   (unnormalised, since the last resampling)
                log Z_t = log Z_{t-1} + logsumexp(l_t) - logsumexp(l_{t-1})  =  log Z_{t-1} + log sum_n W_{t-1}^n G_t^n
    resample    if ESS(l_t) < kappa N: A ~ R(W_t), X_t = X_t^A, l_t = 0        (kappa = ess_threshold)
    move        optionally X_t ~ K_t(X_t, .), an MCMC kernel invariant for pi_t (rejuvenation)

Weights that are not resampled are carried (never overwritten) to the next level, so log Z is the standard
adaptive-resampling estimator whatever kappa is (kappa = 0: importance sampling on the path space, kappa = 1:
resampling at every level). A NaN/+inf log G is an invalid particle: its weight becomes zero and it is counted;
if every weight is zero the engine raises `SMCError` naming the level.

Variance of log Z: the genealogy ("Eve index") estimator of Lee & Whiteley (2018, Biometrika), valid with adaptive
resampling (Du & Guyader 2021):  Var(Z_hat) / Z_hat^2 ≈ 1 - (N/(N-1))^{m+1} (1 - sum_i S_i^2), with m the number
of resampling events and S_i the final normalised weight descending from initial particle i; Var(log Z_hat) is
approximated by the same number (delta method). It degenerates when few initial particles have descendants left
(`num_eves` small); then it is unreliable (reported, with a warning).

Population hooks: the step touches the whole population only through a `Population` (gather the N log-weights,
keep this process's rows, move particles to their ancestors' places, read one particle). The default keeps all N
particles in this process; `fkdiff.smc.distributed` shards them over `torch.distributed` ranks with the same loop.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from fkdiff.smc.fk import FeynmanKac, Particles
from fkdiff.smc.resampling import get_resampler
from fkdiff.smc.weights import Weights

__all__ = ["SMCError", "SMCDegeneracyWarning", "SMCState", "StepInfo", "SMCResult", "Population", "Collector",
           "COLLECTORS", "smc_step", "run_smc"]


class SMCError(RuntimeError):
    """The sampler cannot continue (e.g. every particle has weight zero at some level)."""


class SMCDegeneracyWarning(UserWarning):
    """The particle system collapsed (tiny ESS or few unique ancestors): estimates are unreliable."""


class SMCState(NamedTuple):
    """What the engine carries from level to level."""

    particles: Particles | None
    log_w: Tensor  # [N] float64 unnormalised log-weights since the last resampling
    log_Z: float
    eve: Tensor  # [N] int64 index of each particle's level-0 ancestor
    num_resampled: int
    mcmc_state: Any


class StepInfo(NamedTuple):
    """What one level did: the material the per-level `COLLECTORS` read. Every field is global (identical on all
    processes of a sharded population)."""

    t: int
    weights: Weights  # the whole population's weights after weighting, before resampling
    ancestors: Tensor | None  # [N] global ancestor indices if this level resampled, else None
    log_Z_increment: float  # log sum_n W_{t-1}^n G_t^n
    acceptance: float | Tensor  # mean MCMC acceptance over the alive particles (NaN without MCMC; a 0-d device
    # tensor after a move, moved to the host with the other per-level values after the loop)
    step_size: float | Tensor  # MCMC step size (NaN without MCMC; a 0-d device tensor when adapted)
    num_evals: float  # target/proposal evaluations per particle at this level (propagation + MCMC)
    cess: float = math.nan  # conditional ESS of the incremental weights / N (Zhou, Johansen & Aston 2016)

    @property
    def resampled(self) -> bool:
        return self.ancestors is not None


def _sum(v: Tensor) -> Tensor:
    return v.sum(0)


def _mean(v: Tensor) -> Tensor:
    return v.mean(0)


def _any(v: Tensor) -> Tensor:
    return v.sum(0) > 0


def _combined_increments(v: Tensor) -> Tensor:
    """Island runs: increments of the combined estimate log Z_t = logmeanexp_r log Z_{r,t}, from `[R, T]` increments."""
    cum = torch.logsumexp(torch.cumsum(v, 1), 0) - math.log(v.shape[0])
    return torch.diff(cum, prepend=cum.new_zeros(1))


@dataclass(frozen=True)
class Collector:
    """One per-level diagnostic (nchopin/particles' collectors): `fn(StepInfo)` is recorded at every level into
    `result.levels[name]`, a `[T]` tensor of `dtype` (also readable as `result.<name>`). `islands` combines the
    `[R, T]` values of R independent islands (fkdiff.smc.distributed, island=True) into `[T]`. `only`: "mcmc" (None
    when no MCMC kernel ran) or "weighted" (None for a model without weights, e.g. the baselines)."""

    name: str
    fn: Callable[[StepInfo], float]
    dtype: torch.dtype = torch.float64
    islands: Callable[[Tensor], Tensor] = _sum
    only: str | None = None


# A new per-level diagnostic is one entry here: it then appears in every result, in island runs and in the CLI's
# diagnostics.json.
COLLECTORS: tuple[Collector, ...] = (
    Collector("ess", lambda i: i.weights.ess),
    Collector("resampled", lambda i: i.resampled, torch.bool, _any),
    Collector("unique_ancestors", lambda i: (torch.bincount(i.ancestors, minlength=i.weights.num) > 0).sum()
              if i.resampled else i.weights.num_alive, torch.int64),  # bincount: no data-dependent shape (no sync)
    Collector("num_invalid", lambda i: i.weights.num_invalid, torch.int64),
    Collector("num_alive", lambda i: i.weights.num_alive, torch.int64),
    Collector("log_Z_increments", lambda i: i.log_Z_increment, islands=_combined_increments, only="weighted"),
    Collector("acceptance", lambda i: i.acceptance, islands=_mean, only="mcmc"),
    Collector("step_size", lambda i: i.step_size, islands=_mean, only="mcmc"),
    Collector("num_evals", lambda i: i.num_evals, islands=_mean),
    Collector("cess", lambda i: i.cess, islands=_mean, only="weighted"),
)


class Population:
    """Population-level operations of the SMC step, all N particles in this process.

    Subclasses (`fkdiff.smc.distributed.ShardedPopulation`) hold a shard of the particles per process; every method
    is then a collective that all processes call in the same order, and every returned global value is identical on
    all of them. Rows are in global particle order (process 0's shard first).
    """

    def local_size(self, num_particles: int) -> int:
        """Particles held here `n` when the population has `num_particles` (N) in all."""
        return num_particles

    def offset(self, num_particles: int) -> int:
        """Global index of this process's first particle."""
        return 0

    def gather(self, t: Tensor) -> Tensor:
        """`[n, ...]` rows held here -> `[N, ...]` rows of the whole population."""
        return t

    def shard(self, t: Tensor) -> Tensor:
        """`[N, ...]` rows of the whole population -> `[n, ...]` rows held here."""
        return t

    def select(self, particles: Particles, eve: Tensor, ancestors: Tensor) -> tuple[Particles, Tensor]:
        """Resampling move: the rows held here become the global `ancestors` `[N]` of them (global indices)."""
        return particles.index(ancestors), eve[ancestors]

    def row(self, t: Tensor, index: int) -> Tensor:
        """Row `index` (global) of the population's `t` `[n, ...]`, available here."""
        return t[index]

    def resample(self, w: Weights, resampler, ess_threshold: float,
                 generator: torch.Generator | None) -> tuple[Tensor | None, Tensor | None]:
        """Adaptive resampling of the whole population's weights `w`: (global ancestors `[N]`, or None when it does
        not resample; the log-weights held here afterwards, or None for zeros). Default: resample all N together
        when ESS < kappa N (kappa = ess_threshold; >= 1: every level)."""
        if ess_threshold >= 1.0 or w.ess < ess_threshold * w.num:
            return resampler(w.lw, w.num, generator), None
        return None, None

    def log_Z_relative_variance(self, final: Weights, eve: Tensor, num_resampled: int) -> tuple[float, float]:
        """(estimate of Var(Z_hat) / Z_hat^2 ~ Var(log Z_hat), degrees of freedom of that estimate (inf: normal
        interval)): the Lee & Whiteley (2018) genealogy estimator, 1 - (N/(N-1))^{m+1} (1 - sum_i S_i^2), S_i the
        final weight descending from initial particle i, m the number of resampling events."""
        n = final.num
        s = torch.zeros(n, dtype=torch.float64).index_add_(0, eve.to(torch.long).cpu(), final.W.cpu())
        return 1.0 - (n / (n - 1)) ** (num_resampled + 1) * (1.0 - float((s**2).sum())), math.inf

    def run(self, fk: FeynmanKac, num_particles: int, *, generator: torch.Generator | None, **engine) -> "SMCResult":
        """Run the engine on `fk` with this population (what `fkdiff.smc.sample` calls); `engine`: run_smc's options."""
        return run_smc(fk, num_particles, generator=generator, population=self, **engine)


LOCAL = Population()


def _mcmc_step_size(mstate: Any, info: Any) -> float | Tensor:
    """The kernel's step size: a float, or a 0-d device tensor (kept there; read after the loop)."""
    for obj, name in ((info, "step_size"), (mstate, "step_size")):
        v = getattr(obj, name, None)
        if isinstance(v, Tensor) and v.numel() == 1:
            return v.detach().reshape(())
        if isinstance(v, (int, float)):
            return float(v)
    return math.nan


def smc_step(
    fk: FeynmanKac,
    t: int,
    state: SMCState,
    *,
    num_particles: int,
    generator: torch.Generator | None,
    resampler,
    ess_threshold: float,
    mcmc: Any = None,
    population: Population | None = None,
    resample_generator: torch.Generator | None = None,
) -> tuple[SMCState, StepInfo]:
    """One SMC level: M_t (propagate), G_t (weight), R_t (adaptive resampling), then optional MCMC move K_t.

    fk            the Feynman–Kac model (M0 / M / logG, optional mcmc_target)
    state         carried state (particles None at t = 0)
    resampler     resample(log_weights [N], num, generator) -> ancestors [num]
    ess_threshold resample when ESS < ess_threshold * N (>= 1: every level; 0: never)
    mcmc          kernel(x, logdensity_fn, *, generator, state, logp, grad) -> (x, state, info), or None (run_smc
                  passes an fkdiff.mcmc kernel already bound to the population: `kernel.for_population(population)`)
    population    where the particles live (default: all here); `num_particles` is the number held here
    resample_generator  draws the ancestors (default: generator); must be identical on all processes when sharded
    """
    pop = LOCAL if population is None else population
    n = num_particles
    prev = state.particles
    cur = fk.M0(n, generator) if t == 0 else fk.M(t, prev, generator)
    log_g = fk.logG(t, prev, cur).to(torch.float64)
    prev_lw = state.log_w
    # particles already dead stay dead (their log G may be NaN: -inf - -inf); they are not counted again
    lw = torch.where(prev_lw == -math.inf, prev_lw, prev_lw + log_g)
    if pop is not LOCAL:  # one collective for both weight vectors of the whole population
        both = pop.gather(torch.stack([prev_lw, lw], 1))
        prev_lw, lw = both[:, 0].contiguous(), both[:, 1].contiguous()
    n = lw.numel()  # N, the whole population
    prev_norm = torch.logsumexp(prev_lw, 0)
    extra = {"prev_norm": prev_norm}
    if weighted_model(fk):
        extra["cess"] = _cess(prev_lw - prev_norm, lw - prev_lw)
    mstate = state.mcmc_state
    w = Weights(lw, extra)  # the level's one host read: ESS (the resampling decision), log Z terms, counts
    if w.all_dead:
        sigma = getattr(fk, "sigmas", None)
        where = f"level {t}" + (f" (sigma = {float(sigma[t]):.6g})" if sigma is not None else "")
        raise SMCError(
            f"all {n} particles have zero weight at {where}: {w.num_invalid} had NaN/inf weights or energies, the "
            "rest had weight zero (e.g. every particle violates a hard constraint)"
        )
    log_Z = state.log_Z + w.log_norm - w.extra["prev_norm"]
    cess = w.extra.get("cess", math.nan)
    lw = pop.shard(w.lw)  # sanitised: NaN/+inf -> -inf, so nothing invalid is carried to the next level
    particles, eve, num_res, anc = cur, state.eve, state.num_resampled, None
    anc, lw_after = pop.resample(w, resampler, ess_threshold,
                                 generator if resample_generator is None else resample_generator)
    resampled = anc is not None
    if resampled:
        particles, eve = pop.select(cur, eve, anc)
        lw = torch.zeros_like(lw) if lw_after is None else lw_after
        num_res += 1
    acc, step, evals = math.nan, math.nan, float(fk.num_evals(t)) if hasattr(fk, "num_evals") else 1.0
    if mcmc is not None:
        target = fk.mcmc_target(t, particles)
        x_new, mstate, info = mcmc(particles.x, target.logdensity_fn, generator=generator, state=mstate,
                                   logp=target.logp, grad=target.grad)
        if getattr(mcmc, "returns_evaluated", False):  # structural: no check for positions never evaluated
            particles = target.particles_at(x_new.detach(), evaluated=True)
        else:
            particles = target.particles_at(x_new.detach())
        alive = lw > -math.inf
        a = info.acceptance.detach().double()
        if pop is not LOCAL:
            both = pop.gather(torch.stack([a, alive.to(a.dtype)], 1))
            a, alive = both[:, 0].contiguous(), both[:, 1] > 0
        # mean acceptance of the particles alive, NaN if none: a device scalar, read after the loop
        acc = torch.where(alive.any(), (a * alive).sum() / alive.sum().clamp(min=1), torch.full_like(a[0], math.nan))
        step = _mcmc_step_size(mstate, info)
        evals += float(info.num_evals) + float(getattr(target, "extra_evals", 0.0))
    new_state = SMCState(particles, lw, log_Z, eve, num_res, mstate)
    return new_state, StepInfo(t=t, weights=w, ancestors=anc if resampled else None,
                               log_Z_increment=log_Z - state.log_Z, acceptance=acc, step_size=step, num_evals=evals,
                               cess=cess)


def _level_tensor(values: list, dtype: torch.dtype) -> Tensor:
    """`[T]` CPU tensor of a collector's per-level values: Python numbers, or 0-d device tensors (kept on the device
    during the loop so that a level makes no host read for them) moved to the host together, once, after the loop."""
    if not any(isinstance(v, Tensor) for v in values):
        return torch.tensor(values, dtype=dtype)
    device = next(v.device for v in values if isinstance(v, Tensor))
    return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]).to(
        "cpu", dtype)


def weighted_model(fk: Any) -> bool:
    return bool(getattr(fk, "weighted", True))


def _cess(prev_log_W: Tensor, log_g: Tensor) -> Tensor:
    """Conditional ESS of the incremental weights as a fraction of N (Zhou, Johansen & Aston 2016):
    (sum_n W_{t-1}^n G_t^n)^2 / sum_n W_{t-1}^n (G_t^n)^2 in (0, 1]; 1 when G is constant over the particles; 0 when
    no particle has a finite weight. A 0-d device tensor (read with the level's weights: no host read here)."""
    ok = (prev_log_W > -math.inf) & torch.isfinite(log_g)
    neg = torch.full_like(log_g, -math.inf)
    a, g = torch.where(ok, prev_log_W, neg), torch.where(ok, log_g, torch.zeros_like(log_g))
    value = torch.exp(2 * torch.logsumexp(a + g, 0) - torch.logsumexp(a + 2 * g, 0))
    return torch.where(ok.any(), value, torch.zeros_like(value))


@dataclass
class SMCResult:
    """Output of a run of the engine: SMC, or an unweighted sampler run by the same loop (fkdiff.samplers).

    samples           `[N, *shape]` final particles (the returned points, e.g. denoised); zero-weight particles are
                      replaced by copies of the heaviest one (weight still zero), so no sample is NaN or infeasible
    log_weights       `[N]` float64 normalised log-weights (logsumexp = 0); -inf for dropped particles
    log_Z             estimate of log Z (the final target's normaliser, relative to the energies as given), or None
                      when the model has no weights (an unweighted sampler estimates no normaliser)
    log_Z_var         estimated Var(log Z_hat) (Lee & Whiteley genealogy estimator; see `num_eves`), or None
    levels            per-level diagnostics, name -> `[T]` tensor (or None where it does not apply), one entry per
                      `COLLECTORS` item, also readable as attributes:
        ess               ESS after weighting at each level (before resampling)
        resampled         bool
        unique_ancestors  distinct ancestors at each resampling (alive particles where not resampled)
        num_invalid       particles dropped at each level for NaN/inf weights or energies
        num_alive         particles with positive weight after weighting
        log_Z_increments  log sum_n W_{t-1}^n G_t^n (None without weights)
        acceptance        mean MCMC acceptance (None without MCMC)
        step_size         MCMC step size (None without MCMC)
        num_evals         target/proposal evaluations per particle (propagation + MCMC)
        cess              conditional ESS of the incremental weights / N, (sum W G)^2 / sum W G^2 (None without
                          weights): how much the level's own weights degenerate (what the budget-driven schedule
                          of fkdiff.smc.adaptive measures)
    sigmas            `[T]` noise levels (if the model has them)
    wall_time         seconds
    num_eves          distinct level-0 ancestors among the final particles
    warnings          degeneracy messages (also issued as SMCDegeneracyWarning)
    log_Z_dof         degrees of freedom of log_Z_var (inf: Lee-Whiteley, normal interval; R - 1 for R islands,
                      fkdiff.smc.Islands: Student t interval)
    plan              what a budget-driven run chose (fkdiff.smc.adaptive): budget, used_evaluations (pilot
                      included), num_levels, schedule, mode, formulation, mcmc, estimator, pilot; None otherwise
    """

    samples: Tensor
    log_weights: Tensor
    log_Z: float | None
    log_Z_var: float | None
    levels: dict[str, Tensor | None]
    sigmas: Tensor | None
    wall_time: float
    num_eves: int
    warnings: list[str] = field(default_factory=list)
    log_Z_dof: float = math.inf
    plan: dict | None = None

    def __getattr__(self, name: str):
        levels = self.__dict__.get("levels")
        if levels is not None and name in levels:
            return levels[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    @property
    def num_particles(self) -> int:
        return self.samples.shape[0]

    @property
    def nfe(self) -> float:
        """Target/proposal evaluations per particle over the run (propagation + MCMC)."""
        return float(self.levels["num_evals"].sum())

    @property
    def weights(self) -> Tensor:
        """`[N]` normalised weights."""
        return self.log_weights.exp()

    @property
    def min_ess(self) -> float:
        return float(self.ess.min())

    @property
    def final_ess(self) -> float:
        return float(1.0 / (self.weights**2).sum())

    @property
    def min_unique_ancestors(self) -> int:
        return int(self.unique_ancestors.min())

    @property
    def total_invalid(self) -> int:
        return int(self.num_invalid.sum())

    @property
    def log_Z_se(self) -> float | None:
        return None if self.log_Z_var is None else math.sqrt(max(self.log_Z_var, 0.0))

    def log_Z_ci(self, level: float = 0.95) -> tuple[float, float]:
        """Confidence interval for log Z: normal, or Student t with `log_Z_dof` degrees of freedom when the variance
        was estimated from a few independent islands (fkdiff.smc.Islands)."""
        if self.log_Z is None:
            raise ValueError("log Z was not estimated: this sampler's particles carry no weights")
        if math.isfinite(self.log_Z_dof):
            from scipy.stats import t as student_t

            z = float(student_t.ppf(0.5 + level / 2, self.log_Z_dof))
        else:
            z = math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(level, dtype=torch.float64)))
        return self.log_Z - z * self.log_Z_se, self.log_Z + z * self.log_Z_se

    def resample(self, generator: torch.Generator | None = None, num: int | None = None,
                 scheme: str = "systematic") -> Tensor:
        """Equally weighted samples `[num, *shape]` (default num = N) drawn from the weighted particles."""
        anc = get_resampler(scheme)(self.log_weights, self.num_particles if num is None else num, generator)
        return self.samples[anc.to(self.samples.device)]

    def mean(self) -> Tensor:
        """Weighted mean of the samples `[*shape]` (float64)."""
        w = self.weights.to(self.samples.device)
        alive = w > 0
        return (w[alive, None] * self.samples[alive].double().flatten(1)).sum(0).reshape(self.samples.shape[1:])

    def summary(self) -> dict:
        """Scalar diagnostics as a plain dict (`log_Z` / `log_Z_se` None: not estimated, see `log_Z_estimated`)."""
        return {
            "log_Z": self.log_Z, "log_Z_se": self.log_Z_se, "log_Z_estimated": self.log_Z is not None,
            "min_ess": self.min_ess, "final_ess": self.final_ess,
            "min_unique_ancestors": self.min_unique_ancestors, "num_resampled": int(self.resampled.sum()),
            "num_eves": self.num_eves, "total_invalid": self.total_invalid, "nfe": self.nfe,
            "mean_acceptance": None if self.acceptance is None else float(self.acceptance.nanmean()),
            "wall_time": self.wall_time,
        }

    def report(self) -> str:
        """One line for people: log Z (or that it was not estimated), minimum ESS, evaluations, time."""
        lz = ("log Z not estimated (the particles carry no importance weights)" if self.log_Z is None
              else f"log Z = {self.log_Z:.4f} +- {self.log_Z_se:.4f}")
        return (f"{lz}, min ESS = {self.min_ess:.1f}/{self.num_particles}, nfe = {self.nfe:.0f}, "
                f"{self.wall_time:.1f} s")

    __str__ = report


def _degeneracy_messages(ess: Tensor, unique: Tensor, resampled: Tensor, num_eves: int, n: int,
                         collapse_fraction: float) -> list[str]:
    floor = max(2.0, collapse_fraction * n)
    msgs = []
    if float(ess.min()) < floor:
        t = int(torch.argmin(ess))
        msgs.append(f"ESS collapsed to {float(ess.min()):.1f} of {n} particles at level {t}: weights are degenerate; "
                    "use more levels, MCMC rejuvenation (e.g. fkdiff.mcmc.HMC) or more particles")
    if bool(resampled.any()):
        u = unique[resampled]
        if float(u.min()) < floor:
            t = int(torch.nonzero(resampled)[int(torch.argmin(u))])
            msgs.append(f"only {int(u.min())} unique ancestors of {n} particles survived resampling at level {t}")
    if num_eves < floor:
        msgs.append(f"only {num_eves} level-0 ancestors survive: the log Z variance estimate is unreliable")
    return msgs


def run_smc(
    fk: FeynmanKac,
    num_particles: int,
    *,
    generator: torch.Generator | None = None,
    resample: str = "systematic",
    ess_threshold: float = 0.5,
    mcmc: Any = None,
    progress: bool = False,
    collapse_fraction: float = 0.02,
    population: Population | None = None,
    resample_generator: torch.Generator | None = None,
) -> SMCResult:
    """Run SMC on any Feynman–Kac model through its T levels and collect the diagnostics (see `SMCResult`).

    Warns (SMCDegeneracyWarning) when the minimum ESS, the unique-ancestor count or the number of surviving level-0
    ancestors falls below max(2, collapse_fraction * N).

    With a sharded `population` (fkdiff.smc.distributed), `num_particles` is the global N, the returned `samples` and
    `log_weights` are this process's rows (normalised over all N) and every diagnostic is global.
    """
    pop = LOCAL if population is None else population
    from fkdiff.smc.diffusion_fk import _whole

    n = _whole(num_particles, "num_particles")
    if n < 2:
        raise ValueError(f"num_particles must be >= 2, got {num_particles}")
    if not (0.0 <= ess_threshold) or math.isnan(ess_threshold):
        raise ValueError(f"ess_threshold must be >= 0, got {ess_threshold}")
    if mcmc is not None and not callable(getattr(fk, "mcmc_target", None)):
        raise TypeError(f"{type(fk).__name__} has no mcmc_target(t, particles): it does not support MCMC rejuvenation")
    if mcmc is not None and getattr(fk, "has_energy", True) is False and getattr(getattr(mcmc, "kernel", mcmc),
                                                                               "adjusted", True):
        raise TypeError(f"MCMC targets exp(-E(x, sigma)): {type(getattr(fk, 'target', fk)).__name__} has no energy(x, "
                        f"sigma), so a Metropolis-adjusted kernel ({type(getattr(mcmc, 'kernel', mcmc)).__name__}) "
                        "cannot run on it; an unadjusted one (fkdiff.mcmc.ULA, UHMC) moves by the score alone")
    resampler = get_resampler(resample, check=False)  # Weights: sanitised, and not all dead (checked in the level)
    if mcmc is not None and callable(getattr(mcmc, "for_population", None)):
        mcmc = mcmc.for_population(pop)  # step size chosen and adapted over the whole population (fkdiff.mcmc)
    t0 = time.perf_counter()
    device = getattr(fk, "device", None)
    n_here, first = pop.local_size(n), pop.offset(n)
    state = SMCState(
        particles=None,
        log_w=torch.zeros(n_here, dtype=torch.float64, device=device),
        log_Z=0.0,
        eve=torch.arange(first, first + n_here, device=device),
        num_resampled=0,
        mcmc_state=mcmc.init_state() if mcmc is not None and hasattr(mcmc, "init_state") else None,
    )
    levels = range(fk.T)
    if progress:
        from tqdm.auto import tqdm

        levels = tqdm(levels, desc="SMC", leave=False)
    with_mcmc = mcmc is not None
    weighted = bool(getattr(fk, "weighted", True))
    recorded = [c for c in COLLECTORS if (c.only != "mcmc" or with_mcmc) and (c.only != "weighted" or weighted)]
    values: dict[str, list] = {c.name: [] for c in recorded}
    for t in levels:
        state, info = smc_step(fk, t, state, num_particles=n_here, generator=generator, resampler=resampler,
                               ess_threshold=ess_threshold, mcmc=mcmc, population=pop,
                               resample_generator=resample_generator)
        for c in recorded:
            values[c.name].append(c.fn(info))
    per_level: dict[str, Tensor | None] = {c.name: None for c in COLLECTORS}
    per_level.update({c.name: _level_tensor(values[c.name], c.dtype) for c in recorded})
    final = Weights(pop.gather(state.log_w))
    samples = fk.finalize(state.particles) if hasattr(fk, "finalize") else state.particles.x
    if bool((final.lw == -math.inf).any()):
        # zero-weight particles (dropped, or outside a hard constraint) are returned as copies of the heaviest
        # particle, still with weight zero: estimates are unchanged and no returned point is NaN or infeasible
        heaviest = pop.row(samples, int(torch.argmax(final.lw))).clone()
        samples = samples.clone()
        samples[pop.shard(final.lw) == -math.inf] = heaviest
    # Lee & Whiteley (2018) genealogy variance estimate of Z_hat / Z
    eve = pop.gather(state.eve)
    s = torch.zeros(n, dtype=torch.float64).index_add_(0, eve.to(torch.long).cpu(), final.W.cpu())
    num_eves = int((s > 0).sum())
    rel_var, dof = pop.log_Z_relative_variance(final, eve, state.num_resampled)
    msgs = _degeneracy_messages(per_level["ess"], per_level["unique_ancestors"], per_level["resampled"], num_eves, n,
                                collapse_fraction)
    for m in msgs:
        warnings.warn(m, SMCDegeneracyWarning, stacklevel=2)
    return SMCResult(
        samples=samples.detach(),
        log_weights=pop.shard(final.log_W),
        log_Z=state.log_Z if weighted else None,
        log_Z_var=max(rel_var, 0.0) if weighted else None,
        levels=per_level,
        sigmas=getattr(fk, "sigmas", None),
        wall_time=time.perf_counter() - t0,
        num_eves=num_eves,
        warnings=msgs,
        log_Z_dof=dof,
    )
