"""The diffusion Feynman–Kac model (DESIGN.md section 5; Thornton et al. 2025; Del Moral, Doucet & Jasra 2006).

Levels sigma_0 > sigma_1 > ... > sigma_{T-1} (index t = SMC level, the engine's order: level 0 is sigma_max, the
last level sigma_min; `sigmas[t]` its noise level), Delta_t = sigma_{t-1}^2 - sigma_t^2. `noise_levels` makes or
checks that schedule (the EDM rho-schedule by default). Built from a target (energy E, optional score), a proposal
score field u (default: the target's own score) and potentials w_j:

    gamma_t(x) = exp(-E(x, sigma_t)) prod_j w_{j,t}(x)
    M_0 = N(0, s0^2 I)   (s0 = init_std, default sigma_max)
    M_t(x_t | x_{t-1}) = N(x_{t-1} + Delta_t u(x_{t-1}, sigma_{t-1}), v_t I),
        v_t = Delta_t sigma_t^2 / sigma_{t-1}^2 (ancestral, default) or Delta_t (Euler–Maruyama)
    L_{t-1}(x_{t-1} | x_t) = N(x_{t-1}; x_t, Delta_t I)       (the forward noising step, backward kernel)

mode="sampler" (SMC sampler, exact for every gamma_t):
    log G_0 = log gamma_0(x_0) - log M_0(x_0)
    log G_t = log gamma_t(x_t) - log gamma_{t-1}(x_{t-1}) + log L_{t-1}(x_{t-1} | x_t) - log M_t(x_t | x_{t-1})
so Z_hat estimates Z = ∫ gamma_{T-1}, and the weighted particles target gamma_t / Z_t at every level.

mode="twisted" (telescoping potentials on the proposal's own path law):
    log G_0 = sum_j log w_{j,0}(x_0),   log G_t = sum_j log w_{j,t}(x_t) - log w_{j,t-1}(x_{t-1})
so the final law is the proposal's terminal law tilted by prod_j w_{j,T-1}; Z_hat estimates E[prod_j w_{j,T-1}].

mode="none" (no weights: log G_t = 0, the particles follow the proposal's path law; `weighted = False`, so the
engine reports no log Z): naive reverse diffusion with the target's score, and with MCMC at every level annealed
MCMC (fkdiff.samplers). The target may then be any score field (a denoiser, a score-only object); MCMC needs its
energy. Without final_denoise the last level is not evaluated (no score is needed there) unless MCMC asks for it.

The returned samples are x_out = D(x, sigma_{T-1}) = x + sigma_{T-1}^2 score_target(x) with `final_denoise=True`
(Tweedie, the target's denoiser), else x. Potentials at the last level see x_out (`Level.x_out`), so a hard
constraint such as `Box` is enforced on the returned points (no violations).

MCMC rejuvenation targets log gamma_t in both modes (in "twisted" mode this assumes the proposal's level-t marginal
is exp(-E(x, sigma_t)), i.e. proposal = target with an accurate score; otherwise it is an approximation).

Every particle with a NaN energy, NaN/+inf log-potential, -inf energy, a non-finite score or proposal move gets a
NaN incremental log-weight, which the engine turns into weight zero and counts. Positions stay finite: a move that
produced a non-finite position keeps the parent position (with weight zero). All randomness for a level is drawn
for the whole population at once, by `randn(shape, generator=, dtype=, device=)` (default `torch.randn`; the noise
seam, as EDM's `randn_like`: e.g. noise drawn for the whole population and sliced to a shard); evaluations are
chunked by `max_batch`, which therefore never changes results.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fkdiff.diffusion import checked_sigma, sigma_schedule
from fkdiff.smc.fk import Particles
from fkdiff.smc.potentials import Level, Potential, as_potential
from fkdiff.targets import energy_and_score, has_energy
from fkdiff.targets import score as score_of

__all__ = ["DiffusionFK", "noise_levels", "MODES"]

MODES = ("sampler", "twisted", "none")

_LOG2PI = math.log(2 * math.pi)


def noise_levels(num_levels: int | None = None, sigma_max: float | None = None, sigma_min: float | None = None, *,
                 rho: float = 7.0, sigmas: Tensor | None = None) -> Tensor:
    """`[T]` float64 strictly decreasing positive noise levels (CPU): the EDM rho-schedule from sigma_max to sigma_min
    with `num_levels` levels, or the given `sigmas` checked (and their count checked against `num_levels` if given)."""
    if sigmas is None:
        if num_levels is None or sigma_max is None or sigma_min is None:
            raise ValueError("give num_levels, sigma_max and sigma_min, or the noise levels `sigmas`")
        levels = _whole(num_levels, "num_levels")
        if levels < 2 and float(sigma_min) != float(sigma_max):
            raise ValueError(f"num_levels={levels}: one level cannot go from sigma_max={sigma_max} down to "
                             f"sigma_min={sigma_min} (it would return D(x, sigma_max)); give num_levels >= 2")
        return sigma_schedule(levels, float(sigma_min), float(sigma_max), rho=rho, dtype=torch.float64)
    sig = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).cpu()
    if num_levels is not None and sig.numel() != int(num_levels):
        raise ValueError(f"sigmas has {sig.numel()} levels but num_levels={num_levels}")
    if sig.numel() < 1 or not torch.isfinite(sig).all() or (sig <= 0).any():
        raise ValueError("sigmas must be a non-empty 1-D tensor of positive finite noise levels")
    if sig.numel() > 1 and not (sig[1:] < sig[:-1]).all():
        raise ValueError("sigmas must be strictly decreasing (sigma_max first)")
    return sig


def _floating(dtype: torch.dtype | None) -> bool:
    return dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)


def _whole(value: Any, name: str) -> int:
    """`value` as an int when it is a whole number (2, 2.0, a 0-d integer tensor); a ValueError naming `name` for 2.5,
    '3', True and the like (int() would silently truncate)."""
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not (math.isfinite(as_float) and as_float == int(as_float)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(as_float)


def _rowfinite(t: Tensor) -> Tensor:
    return torch.isfinite(t).flatten(1).all(1)


def _bc(mask: Tensor, x: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (x.ndim - 1)))


def _rowsum64(t: Tensor) -> Tensor:
    return t.double().flatten(1).sum(1)


class DiffusionFK:
    """Feynman–Kac model of reverse diffusion towards `target` (see the module docstring).

    target      any object with energy(x, sigma) -> [B] (optionally score); `sigma` passed as a [B] tensor
    sigmas      `[T]` decreasing noise levels (float64)
    shape       event shape, particles are `[N, *shape]`
    proposal    score field driving M_t (a target, or a denoiser D(x, sigma)); None = the target's score
    potentials  sequence of `Potential` or callables fn(x, sigma) -> [N] (log w)
    mode        "sampler", "twisted" or "none" (no weights)
    randn       the noise source randn(shape, generator=, dtype=, device=) (default torch.randn)

    `DiffusionFK.on_levels(target, num_levels=, sigma_max=, sigma_min=, ...)` builds it on the EDM rho-schedule.
    """

    def __init__(
        self,
        target: Any,
        sigmas: Tensor,
        *,
        shape: Sequence[int],
        proposal: Any = None,
        potentials: Sequence[Any] = (),
        mode: str = "sampler",
        final_denoise: bool = True,
        proposal_variance: str = "ancestral",
        init_std: float | None = None,
        max_batch: int | None = None,
        dtype: torch.dtype = torch.float64,
        eval_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        randn: Callable[..., Tensor] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        self.has_energy = has_energy(target)
        if mode != "none" and not self.has_energy:
            raise TypeError(f"{type(target).__name__} has no energy(x, sigma) method; SMC weights need energies")
        if mode == "none" and potentials:
            raise ValueError("mode='none' has no weights, so potentials would do nothing; use mode='sampler'")
        if proposal_variance not in ("ancestral", "euler"):
            raise ValueError(f"proposal_variance must be 'ancestral' or 'euler', got {proposal_variance!r}")
        sig = noise_levels(sigmas=sigmas)
        if max_batch is not None and int(max_batch) < 1:
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch}")
        self.target, self.proposal = target, proposal
        self.weighted = mode != "none"
        self.randn = torch.randn if randn is None else randn
        self.potentials: list[Potential] = [as_potential(p) for p in potentials]
        self.sigmas = sig
        self._sigma_values = sig.tolist()  # host floats, read once (sig is a CPU tensor): no tensor reads per level
        self.T = sig.numel()
        self.shape = tuple(_whole(s, "shape entries") for s in shape)
        if not self.shape or min(self.shape) < 1:
            raise ValueError(f"shape is the event shape of one particle, e.g. (2,) or (1, 8, 8): a non-empty tuple of "
                             f"positive sizes, got {tuple(shape)}")
        if dtype is None or not (_floating(dtype) and _floating(eval_dtype)):
            raise ValueError(f"dtype and eval_dtype must be floating-point torch dtypes (particles are continuous), got "
                             f"dtype={dtype}, eval_dtype={eval_dtype}")
        for p in self.potentials:
            p.check_event_shape(self.shape)
        self.event_size = math.prod(self.shape)
        self.mode, self.final_denoise, self.proposal_variance = mode, bool(final_denoise), proposal_variance
        self.init_std = float(sig[0]) if init_std is None else float(init_std)
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        self.max_batch = max_batch
        self.dtype = dtype
        self.eval_dtype = eval_dtype if eval_dtype is not None else dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @classmethod
    def on_levels(cls, target: Any, *, num_levels: int | None = None, sigma_max: float | None = None,
                  sigma_min: float | None = None, rho: float = 7.0, sigmas: Tensor | None = None,
                  **kwargs) -> "DiffusionFK":
        """The model on `noise_levels(num_levels, sigma_max, sigma_min, rho=rho, sigmas=sigmas)`."""
        return cls(target, noise_levels(num_levels, sigma_max, sigma_min, rho=rho, sigmas=sigmas), **kwargs)

    # -- evaluation counts (per particle) ------------------------------------------------------------
    def _evaluates(self, t: int) -> bool:
        """Whether M0 / M_t evaluate the target at level t (always, except the last level of mode "none" without
        final_denoise, where nothing needs the score)."""
        return self.weighted or self.final_denoise or t < self.T - 1

    def num_evals(self, t: int) -> int:
        """Target/proposal evaluations per particle made by M0 / M_t at level t."""
        return int(self._evaluates(t)) + int(self.proposal is not None and t < self.T - 1)

    # -- level-t evaluation ------------------------------------------------------------------------------
    def _sigma(self, t: int) -> float:
        return self._sigma_values[t]

    def _sigma_batch(self, t: int, x: Tensor) -> Tensor:
        """sigma_t as the `[N]` tensor the models get, in x's dtype; the levels were validated once (noise_levels),
        so it is marked as checked and no model validates it again (no host sync per evaluation on a GPU)."""
        return checked_sigma(torch.full((x.shape[0],), self._sigma(t), dtype=x.dtype, device=x.device))

    def _delta_var(self, t: int) -> tuple[float, float]:
        s_prev, s_t = self._sigma(t - 1), self._sigma(t)
        delta = s_prev * s_prev - s_t * s_t
        v = delta * (s_t * s_t) / (s_prev * s_prev) if self.proposal_variance == "ancestral" else delta
        return delta, v

    def _potentials(self, x: Tensor, level: Level, with_grad: bool) -> tuple[Tensor, Tensor | None]:
        logpot = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        grad = torch.zeros_like(x) if with_grad else None
        for p in self.potentials:
            if with_grad:
                fn = getattr(p, "log_potential_and_grad", None)
                lw, g = fn(x, level) if callable(fn) else Potential.log_potential_and_grad(p, x, level)
                grad = grad + g.to(x.dtype)
            else:
                with torch.no_grad():
                    lw = p.log_potential(x, level)
            lw = lw.detach().double()
            if lw.shape != (x.shape[0],):
                raise ValueError(f"{type(p).__name__}.log_potential must return shape [N]=[{x.shape[0]}], "
                                 f"got {tuple(lw.shape)}")
            logpot = logpot + lw
        return logpot, grad

    def evaluate(self, t: int, x: Tensor, *, with_grad: bool = False, with_proposal: bool = True) -> dict:
        """Everything the model caches about positions x `[N, *event]` at level t (float64 scalars per particle).

        Keys: energy, score (the target's), logpot, log_gamma (NaN where invalid), bad (bool), x_out (last level only),
        u (proposal score, if t < T-1 and with_proposal), grad (grad log gamma, if with_grad).
        """
        sigma = self._sigma(t)
        final = t == self.T - 1
        xe = x.to(self.eval_dtype)
        sig = self._sigma_batch(t, xe)
        if self.has_energy:
            e, score = energy_and_score(self.target, xe, sig, max_batch=self.max_batch)
        else:  # mode "none" on a score field: no energy (its log gamma is unknown and unused)
            score = score_of(self.target, xe, sig, max_batch=self.max_batch)
            e = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        e, score = e.double(), score.to(x.dtype)
        s_ok = _rowfinite(score)
        score = torch.where(_bc(s_ok, score), score, torch.zeros_like(score))
        x_out = None
        if final:
            x_out = x + (sigma * sigma) * score if self.final_denoise else x
        level = Level(index=t, num_levels=self.T, sigma=sigma, final=final, energy=e, score=score, x_out=x_out)
        logpot, pot_grad = self._potentials(x, level, with_grad)
        bad = torch.isnan(e) | (e == -math.inf) | torch.isnan(logpot) | (logpot == math.inf)
        alive = ~bad & (e < math.inf) & (logpot > -math.inf)
        bad = bad | (alive & ~s_ok)
        out = {"energy": e, "score": score, "logpot": logpot, "x_out": x_out}
        if final and x_out is not None:
            ok = _rowfinite(x_out)
            bad = bad | (alive & ~ok)
            out["x_out"] = torch.where(_bc(ok, x), x_out, x)
        if with_proposal and not final:
            if self.proposal is None:
                u = score
            else:
                u = score_of(self.proposal, xe, sig, max_batch=self.max_batch).to(x.dtype)
                u_ok = _rowfinite(u)
                bad = bad | (alive & ~u_ok)
                u = torch.where(_bc(u_ok, u), u, torch.zeros_like(u))
            out["u"] = u
        log_gamma = -e + logpot
        out["log_gamma"] = torch.where(bad, torch.full_like(log_gamma, math.nan), log_gamma)
        out["bad"] = bad
        if with_grad:
            g = score + pot_grad
            out["grad"] = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
        return out

    def _particles(self, x: Tensor, ev: dict, log_M: Tensor) -> Particles:
        keys = ("energy", "score", "logpot", "log_gamma", "bad", "x_out", "u")
        return Particles(x, {**{k: ev.get(k) for k in keys}, "log_M": log_M})

    def _arrive(self, t: int, x: Tensor) -> dict:
        """The evaluation at level t of particles arriving at x (none where `_evaluates(t)` is False)."""
        if self._evaluates(t):
            return self.evaluate(t, x)
        zero = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        return {"energy": None, "score": None, "logpot": zero, "log_gamma": zero, "x_out": x, "u": None,
                "bad": torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)}

    # -- the FK symbols -------------------------------------------------------------------------------------
    def M0(self, num: int, generator: torch.Generator | None) -> Particles:
        """x_0 = init_std * eps, eps ~ N(0, I) `[num, *shape]`."""
        eps = self.randn((num, *self.shape), generator=generator, dtype=self.dtype, device=self.device)
        x = self.init_std * eps
        log_M = -0.5 * _rowsum64(eps**2) - 0.5 * self.event_size * (_LOG2PI + 2 * math.log(self.init_std))
        return self._particles(x, self._arrive(0, x), log_M)

    def M(self, t: int, prev: Particles, generator: torch.Generator | None) -> Particles:
        """x_t = x_{t-1} + Delta_t u(x_{t-1}, sigma_{t-1}) + sqrt(v_t) eps (whole population's eps drawn at once)."""
        delta, v = self._delta_var(t)
        eps = self.randn(prev.x.shape, generator=generator, dtype=self.dtype, device=self.device)
        mean = prev.x + delta * prev["u"]
        x = mean + math.sqrt(v) * eps
        ok = _rowfinite(x)
        x = torch.where(_bc(ok, x), x, prev.x)
        log_M = -0.5 * _rowsum64(eps**2) - 0.5 * self.event_size * (_LOG2PI + math.log(v))
        ev = self._arrive(t, x)
        ev["bad"] = ev["bad"] | ~ok  # without asking the device whether any row failed (no host sync)
        ev["log_gamma"] = torch.where(ok, ev["log_gamma"], torch.full_like(ev["log_gamma"], math.nan))
        return self._particles(x, ev, log_M)

    def logG(self, t: int, prev: Particles | None, cur: Particles) -> Tensor:
        """Incremental log-weight `[N]` float64 (NaN marks an invalid particle)."""
        nan = torch.full_like(cur["log_gamma"], math.nan)
        if self.mode == "none":  # no weights; zero where the target's density is zero
            lg = torch.where(cur["log_gamma"] == -math.inf, cur["log_gamma"], torch.zeros_like(cur["log_gamma"]))
        elif self.mode == "twisted":
            lg = cur["logpot"] if t == 0 else cur["logpot"] - prev["logpot"]
        elif t == 0:
            lg = cur["log_gamma"] - cur["log_M"]
        else:
            delta, _ = self._delta_var(t)
            log_L = -0.5 * _rowsum64((prev.x - cur.x) ** 2) / delta - 0.5 * self.event_size * (_LOG2PI + math.log(delta))
            lg = cur["log_gamma"] - prev["log_gamma"] + log_L - cur["log_M"]
        return torch.where(cur["bad"], nan, lg)

    def finalize(self, particles: Particles) -> Tensor:
        """The returned samples `[N, *shape]`: x_out = D(x, sigma_min) (final_denoise) or x."""
        x_out = particles.get("x_out")
        return particles.x if x_out is None else x_out

    # -- rejuvenation ------------------------------------------------------------------------------------
    def mcmc_target(self, t: int, particles: Particles) -> "_MCMCTarget":
        """log gamma_t for a kernel. A score field (no energy; mode "none" only) has log gamma 0 here: only an
        unadjusted kernel (fkdiff.mcmc.ULA / UHMC, which read the score alone) may move on it (checked by run_smc)."""
        if not self.has_energy and self.mode != "none":
            raise TypeError(f"MCMC targets exp(-E(x, sigma)): {type(self.target).__name__} has no energy(x, sigma)")
        return _MCMCTarget(self, t, particles)


class _MCMCTarget:
    """log gamma_t for an MCMC kernel, memoising every evaluation so that the moved particles' cached energies and
    scores are taken from the evaluation that produced them (a Metropolis kernel returns, row by row, either the
    old position or one it evaluated): no extra target evaluation after the move."""

    _FIELDS = ("energy", "score", "logpot", "log_gamma", "bad", "x_out")

    def __init__(self, fk: DiffusionFK, t: int, particles: Particles):
        self.extra_evals = 0.0
        if particles["score"] is None:  # a level the model did not evaluate (see DiffusionFK._evaluates): now
            ev = fk.evaluate(t, particles.x, with_proposal=False)
            particles = particles.replace(**{k: ev[k] for k in self._FIELDS})
            self.extra_evals = 1.0
        self.fk, self.t, self.particles = fk, t, particles
        level = Level(index=t, num_levels=fk.T, sigma=fk._sigma(t), final=t == fk.T - 1,
                      energy=particles["energy"], score=particles["score"], x_out=particles.get("x_out"))
        _, pot_grad = fk._potentials(particles.x, level, with_grad=True)
        lg = particles["log_gamma"]
        self.logp = torch.where(torch.isnan(lg), torch.full_like(lg, -math.inf), lg)
        self.grad = torch.nan_to_num(particles["score"] + pot_grad, nan=0.0, posinf=0.0, neginf=0.0)
        self._memo: list[tuple[Tensor, dict]] = [(particles.x, {k: particles.get(k) for k in self._FIELDS})]

    def logdensity_fn(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(log gamma_t(x) `[N]` float64, -inf where invalid; grad_x log gamma_t `[N, *event]`)."""
        ev = self.fk.evaluate(self.t, x.detach(), with_grad=True, with_proposal=False)
        if x.shape[0] == self.particles.num:
            self._memo.append((x.detach(), {k: ev.get(k) for k in self._FIELDS}))
        lg = ev["log_gamma"]
        return torch.where(torch.isnan(lg), torch.full_like(lg, -math.inf), lg), ev["grad"]

    def particles_at(self, x_new: Tensor, *, evaluated: bool = False) -> Particles:
        """The cached bundle at the kernel's output positions `[N, *event]`. `evaluated`: the kernel guarantees every
        row is the current position or one it evaluated here (`fkdiff.mcmc.Kernel.returns_evaluated`), so the
        check for rows never evaluated (a host read) is skipped; otherwise such rows are evaluated now."""
        n = x_new.shape[0]
        src = torch.full((n,), -1, dtype=torch.long, device=x_new.device)
        for j in range(len(self._memo) - 1, -1, -1):
            xm = self._memo[j][0]
            hit = (src < 0) & (xm == x_new).flatten(1).all(1)
            src[hit] = j
        fields: dict[str, Tensor | None] = {}
        for k in self._FIELDS:
            ref = self._memo[0][1][k]
            if ref is None:
                fields[k] = None
                continue
            out = ref
            for j in range(1, len(self._memo)):  # selects, not masked writes: no host sync per memo entry
                out = torch.where(_bc(src == j, out), self._memo[j][1][k], out)
            fields[k] = out.clone() if out is ref else out
        miss = src < 0
        if not evaluated and miss.any():  # a kernel that returned positions it never evaluated: evaluate those rows now
            ev = self.fk.evaluate(self.t, x_new[miss], with_proposal=False)
            for k in self._FIELDS:
                if fields[k] is not None:
                    fields[k][miss] = ev[k]
            self.extra_evals += float(miss.sum()) / n
        u = None
        if self.t < self.fk.T - 1:
            if self.fk.proposal is None:
                u = fields["score"]
            else:
                xe = x_new.to(self.fk.eval_dtype)
                u = score_of(self.fk.proposal, xe, self.fk._sigma_batch(self.t, xe),
                             max_batch=self.fk.max_batch).to(x_new.dtype)
                ok = _rowfinite(u)
                alive = ~fields["bad"]
                fields["bad"] = fields["bad"] | (alive & ~ok)
                fields["log_gamma"] = torch.where(alive & ~ok, torch.full_like(fields["log_gamma"], math.nan),
                                                  fields["log_gamma"])
                u = torch.where(_bc(ok, u), u, torch.zeros_like(u))
                self.extra_evals += 1.0
        return Particles(x_new, {**fields, "u": u, "log_M": self.particles.get("log_M")})
