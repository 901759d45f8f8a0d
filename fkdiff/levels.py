"""Energy levels across sigma: the heat-equation (time-score) target, its distillation term, and level diagnostics.

Why. The projection loss (DESIGN.md section 4) fixes grad_x E only, i.e. E up to a constant on every region where
p_sigma has mass. At small sigma the modes of p_sigma separate and the *relative levels* of the regions are pinned by
nothing, yet SMC weights (and so the mode masses of a composition) are energy differences (DESIGN.md section 8).

The heat equation pins them. For VE diffusion p_sigma = p_0 * N(0, sigma^2 I) solves d p / d sigma = sigma Lap p, so
with E = -log p_sigma:

    sigma dE/dsigma = sigma^2 (Lap E - |grad E|^2)                                                        (1)

and by Tweedie (grad E = (x - D) / sigma^2, Lap E = (d - div D) / sigma^2) the teacher supplies the target

    T(x, sigma) = sigma dE/dsigma = -( |D_T(x, sigma) - x|^2 / sigma^2 + div D_T(x, sigma) - d )           (2)

(no autograd through the teacher: div D_T by central differences, exact along the d axes or Hutchinson along
Rademacher probes). The student's own `sigma dE_theta/dsigma` comes from the same autograd call as grad_x E_theta (sigma
enters the graph). `LevelLoss` matches the two on *differences between two samples at the same sigma*, so the
student's free per-sigma constant cancels:

    L_level = w(step) E_sigma [ lambda_L(sigma) ((q_i - q_j)^2 / 2) ],   q = sigma dE_theta/dsigma - T        (3)

Integrated over ln sigma from where the modes overlap (and the projection loss pins the levels) down to sigma_min,
(3) transports correct relative levels to every sigma: E(x_i, s) - E(x_j, s) = [the same at S] - int_s^S (T_i - T_j)
dln sigma. Hence lambda_L is flat in ln sigma below `sigma_max` (an error in the time score costs the same at every
ln sigma) and the level term's pairs are drawn log-uniformly there (`PairSigmaLaw`).

Diagnostics (per sigma bucket):
- `mode_offset_error_by_bucket`: the error of the energy-level offsets between the teacher's modes (what sets the
  mode masses under SMC), against an exact energy (the pairwise relative-energy rms is
  `fkdiff.distillation.energy_gap_error_by_bucket`);
- `time_score_error_by_bucket`: the pairwise time-score error (q_i - q_j) against the teacher's T (2), for teachers
  without an energy (images), and `integrated_level_error_by_bucket`: the relative-energy error itself, with the
  teacher's relative energy from (2) integrated along ln sigma plus a line integral of its score at sigma_ref
  (`teacher_relative_energy`);
- `residual_by_bucket`: the distillation residual, its excess over an exactly conservative control, and the
  teacher's Jacobian asymmetry (the non-conservative part);
- `product_check_2d`: the students' product at sigma_min by quadrature on a grid (cluster masses, log-overlap error)
  against the exact product of the analytic teachers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from fkdiff.diffusion import append_dims, as_sigma
from fkdiff.distillation import DenoiserMatchingLoss  # the projection loss the level term rides on (LevelMatchingLoss)

__all__ = ["teacher_time_score", "energy_grad_and_time_score", "time_score", "PairSigmaLaw", "LevelLoss",
           "LevelOutput", "LevelMatchingLoss", "LevelMatchingOutput", "teacher_regions", "mode_offset_error_by_bucket", "time_score_error_by_bucket",
           "teacher_relative_energy", "integrated_level_error_by_bucket", "residual_by_bucket", "level_report",
           "log_integral_2d", "exact_log_overlap", "product_check_2d", "product_check_smc"]


def _call(denoiser: Callable, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    return denoiser(x, sigma) if cond is None else denoiser(x, sigma, cond)


def _bucket_names(edges: Sequence[float]) -> list[str]:
    return [f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:])]


def _log_uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp().to(like)


# ---------------------------------------------------------------------------------------------------------------------
# the teacher's time score (2) and the student's (1)


def teacher_time_score(teacher: Callable, x: Tensor, sigma: Tensor, cond: Any = None, *,
                       divergence: str = "exact", num_probes: int = 1, step: float | None = None,
                       generator: torch.Generator | None = None, denoised: Tensor | None = None) -> Tensor:
    """T(x, sigma) = sigma dE/dsigma = -( |D(x) - x|^2 / sigma^2 + div D(x) - d ) from a denoiser, eq. (2). `[B]`.

    div D by central differences with step `step * sigma` (relative: D varies on the scale sigma):
    `divergence="exact"` along every axis (2d teacher calls; for small d), `"hutchinson"` along `num_probes`
    Rademacher probes v (2 calls each; unbiased, variance 2 sum_{i != j} J_ij^2 per probe with J = dD/dx).
    The differences are taken in the teacher's `dtype` when it has one (analytic teachers: float64), else in x's;
    `step` defaults to 1e-4 in float64 and 1e-2 in lower precision.
    `denoised`: D(x, sigma) if already computed. No autograd through the teacher. x `[B, *event]`, sigma `[B]`.
    """
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    out_dtype = x.dtype
    wd = getattr(teacher, "dtype", None)
    wd = wd if isinstance(wd, torch.dtype) and wd.is_floating_point else x.dtype
    x, sigma = x.detach().to(wd), sigma.detach().to(wd)
    denoised = None if denoised is None else denoised.to(wd)
    step = float(step) if step is not None else (1e-4 if wd == torch.float64 else 1e-2)
    s = append_dims(sigma, x.ndim)
    d = x[0].numel()
    h = step * s
    with torch.no_grad():
        dn = _call(teacher, x, sigma, cond).to(x.dtype) if denoised is None else denoised.detach()
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if divergence == "exact":
            flat = x.flatten(1)
            for i in range(d):
                e = torch.zeros_like(flat)
                e[:, i] = 1.0
                e = e.reshape(x.shape) * h
                dp, dm = _call(teacher, x + e, sigma, cond), _call(teacher, x - e, sigma, cond)
                div += (dp - dm).flatten(1)[:, i].to(x.dtype) / (2 * h.flatten())
        else:
            for _ in range(int(num_probes)):
                v = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
                dp, dm = _call(teacher, x + h * v, sigma, cond), _call(teacher, x - h * v, sigma, cond)
                div += ((dp - dm).to(x.dtype) * v).flatten(1).sum(1) / (2 * h.flatten())
            div /= int(num_probes)
        sq = (dn - x).flatten(1).pow(2).sum(1) / sigma**2
    return (-(sq + div - d)).to(out_dtype)


def energy_grad_and_time_score(student: Any, x: Tensor, sigma: Tensor, cond: Any = None,
                               create_graph: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(E `[B]`, grad_x E `[B, *event]`, sigma dE/dsigma `[B]`) of an energy model from one autograd call.

    sigma `[B]` enters the graph, so the time score costs nothing beyond the gradient the denoiser needs. With
    `create_graph` both derivatives keep their graph (training: the losses differentiate them w.r.t. theta).
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        sg = as_sigma(sigma, xg).detach().requires_grad_(True)
        e = student.energy(xg, sg) if cond is None else student.energy(xg, sg, cond)
        gx, gs = torch.autograd.grad(e.sum(), (xg, sg), create_graph=create_graph)
    if not create_graph:
        e, gx, gs = e.detach(), gx.detach(), gs.detach()
    return e, gx, sg.detach() * gs


def time_score(student: Any, x: Tensor, sigma: Tensor, cond: Any = None, create_graph: bool = True) -> Tensor:
    """sigma dE/dsigma `[B]` of an energy model alone (one forward, one backward to sigma only)."""
    with torch.enable_grad():
        sg = as_sigma(sigma, x).detach().requires_grad_(True)
        e = student.energy(x.detach(), sg) if cond is None else student.energy(x.detach(), sg, cond)
        (gs,) = torch.autograd.grad(e.sum(), sg, create_graph=create_graph)
    out = sg.detach() * gs
    return out if create_graph else out.detach()


# ---------------------------------------------------------------------------------------------------------------------
# the distillation term (3)


@dataclass
class PairSigmaLaw:
    """The noise levels of the level term's pairs: ln sigma ~ U[ln lo, ln hi] (flat in ln sigma, see eq. (3))."""

    lo: float = 0.002
    hi: float = 1.0

    def __post_init__(self):
        if not 0 < self.lo < self.hi:
            raise ValueError(f"level term: need 0 < sigma_lo < sigma_hi, got {self.lo}, {self.hi}")

    def draw(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """`[n]` float64 noise levels."""
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return (math.log(self.lo) + u * (math.log(self.hi) - math.log(self.lo))).exp()


class LevelOutput(NamedTuple):
    loss: Tensor     # [P] w lambda_L (q_a - q_b)^2 / 2 per pair (w includes the warm-up ramp)
    sigma: Tensor    # [P] the pair's common sigma
    dq: Tensor       # [P] q_a - q_b (detached): the pair's time-score error, nats per unit ln sigma
    target: Tensor   # [P] T_a - T_b (detached)


class LevelLoss:
    """The level term (3): pairs of samples at a common sigma, student time score against the teacher's (2).

    Pair j (j < P, `num_pairs` per global batch; default: half the batch) joins rows j and j + B/2 of the batch. It
    gets one sigma from `PairSigmaLaw(sigma_lo, sigma_hi)` and each row its own eps. With `shard = (rank, world)` the
    pairs' noise is drawn for the whole global batch and sliced per rank (rank r takes pairs r, r + w, ..., which join
    its local rows i and i + B_local/2), so the term does not depend on the process count. `weight` is w in (3); it
    ramps linearly from 0 over `warmup_steps`. `divergence`: "exact" (central differences along every axis; the
    default for d <= `exact_max_dim`) or "hutchinson" (`num_probes` Rademacher probes).
    """

    def __init__(self, weight: float = 1.0, sigma_lo: float = 0.002, sigma_hi: float = 1.0, *,
                 num_pairs: int | None = None, divergence: str = "auto", num_probes: int = 1, exact_max_dim: int = 8,
                 warmup_steps: int = 0, fd_step: float | None = None):
        if weight < 0:
            raise ValueError(f"level term: weight must be >= 0, got {weight}")
        if divergence not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"level term: divergence must be auto, exact or hutchinson, got {divergence!r}")
        if num_pairs is not None and int(num_pairs) < 1:
            raise ValueError(f"level term: num_pairs must be >= 1 (or null: half the batch), got {num_pairs}")
        self.weight, self.law = float(weight), PairSigmaLaw(float(sigma_lo), float(sigma_hi))
        self.num_pairs = None if num_pairs is None else int(num_pairs)
        self.divergence, self.num_probes, self.exact_max_dim = divergence, int(num_probes), int(exact_max_dim)
        self.warmup_steps, self.fd_step = int(warmup_steps), fd_step

    def ramp(self, step: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)

    def draw(self, x0: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(x0 rows a `[P_r, *event]`, rows b, sigma `[P_r]`, eps_a, eps_b) of this rank's P_r pairs."""
        rank, world = shard
        b = x0.shape[0]
        if b % 2:
            raise ValueError(f"level term: the per-process batch must be even to form pairs, got {b}")
        p = self.num_pairs if self.num_pairs is not None else b * world // 2
        if p % world or p // world > b // 2:
            raise ValueError(f"level term: num_pairs={p} must be a multiple of the {world} processes and at most half "
                             f"the global batch ({b * world})")
        pr = p // world
        sigma = self.law.draw(p, generator)[rank::world].to(x0)
        shape = (p, *x0.shape[1:])
        eps_a = torch.randn(shape, generator=generator, dtype=x0.dtype)[rank::world].to(x0.device)
        eps_b = torch.randn(shape, generator=generator, dtype=x0.dtype)[rank::world].to(x0.device)
        return x0[:pr], x0[b // 2:b // 2 + pr], sigma, eps_a, eps_b

    def __call__(self, student: Any, teacher: Callable, x0: Tensor, cond: Any, generator: torch.Generator,
                 shard: tuple[int, int] = (0, 1), step: int = 0) -> LevelOutput:
        if teacher is None:
            raise ValueError("the level term needs a teacher (its time score is the target)")
        xa, xb, sig, eps_a, eps_b = self.draw(x0, generator, shard)
        pr, half = xa.shape[0], x0.shape[0] // 2
        c = None if cond is None else torch.cat([cond[:pr], cond[half:half + pr]])
        sigma = torch.cat([sig, sig])
        x = torch.cat([xa, xb]) + append_dims(sigma, x0.ndim) * torch.cat([eps_a, eps_b])
        div = _divergence_kind(self.divergence, x0[0].numel(), self.exact_max_dim)
        target = teacher_time_score(teacher, x, sigma, c, divergence=div, num_probes=self.num_probes,
                                    step=self.fd_step, generator=generator)
        q = time_score(student, x, sigma, c, create_graph=torch.is_grad_enabled()) - target
        dq = q[:pr] - q[pr:]
        w = self.weight * self.ramp(step)
        return LevelOutput(w * 0.5 * dq.pow(2), sig, dq.detach(), (target[:pr] - target[pr:]).detach())


class LevelMatchingOutput(NamedTuple):
    loss: Tensor         # [B] lambda(sigma) |D_theta - target|^2, as DenoiserMatchingLoss
    sigma: Tensor        # [B]
    x_noisy: Tensor      # [B, *event]
    denoised: Tensor     # [B, *event]
    target: Tensor       # [B, *event]
    level_loss: Tensor   # [P] w (q_a - q_b)^2 / 2 per pair, eq. (3)
    level_sigma: Tensor  # [P]
    dq: Tensor           # [P] q_a - q_b (detached)


class LevelMatchingLoss(DenoiserMatchingLoss):
    """The projection loss plus the level term (3) on the same forward pass (one autograd call gives grad_x E for
    the denoiser and sigma dE/dsigma for the time score).

    P pairs per global batch (`num_pairs`) take rows j and j + B/2 (rank-local rows i and i + B_local/2, as
    `LevelLoss`); their common sigma is drawn log-uniformly in [sigma_lo, sigma_hi] instead of from the training
    law, so the projection loss sees the mixture (1 - 2P/B) LogNormal(p_mean, p_std) + (2P/B) LogUniform, i.e.
    more mass at small sigma (where the levels are set). Returns `LevelMatchingOutput`: the per-row projection
    loss and the per-pair level loss (the training step adds their means).
    """

    def __init__(self, sigma_data: float, target: str = "teacher", p_mean: float = -1.2, p_std: float = 1.2,
                 weighting: str = "edm", *, weight: float = 0.1, sigma_lo: float = 0.002, sigma_hi: float = 1.0,
                 num_pairs: int = 64, divergence: str = "auto", num_probes: int = 1, exact_max_dim: int = 8,
                 fd_step: float | None = None):
        super().__init__(sigma_data, target, p_mean, p_std, weighting)
        if weight < 0:
            raise ValueError(f"level term: weight must be >= 0, got {weight}")
        if int(num_pairs) < 1:
            raise ValueError(f"level term: num_pairs must be >= 1, got {num_pairs}")
        if divergence not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"level term: divergence must be auto, exact or hutchinson, got {divergence!r}")
        self.level_weight, self.law, self.num_pairs = float(weight), PairSigmaLaw(sigma_lo, sigma_hi), int(num_pairs)
        self.divergence, self.num_probes, self.exact_max_dim = divergence, int(num_probes), int(exact_max_dim)
        self.fd_step = fd_step

    def pair_rows(self, batch: int, world: int) -> tuple[int, int]:
        """(P_r pairs on this rank, B_local / 2)."""
        p = self.num_pairs
        if batch % 2 or p % world or p // world > batch // 2:
            raise ValueError(f"level term: num_pairs={p} must be a multiple of the {world} processes and at most "
                             f"half the per-process batch ({batch}, which must be even)")
        return p // world, batch // 2

    def draw(self, x0: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
        sigma, eps = super().draw(x0, generator, shard)
        rank, world = shard
        pr, half = self.pair_rows(x0.shape[0], world)
        sig = self.law.draw(self.num_pairs, generator)[rank::world].to(sigma)
        sigma = sigma.clone()
        sigma[:pr], sigma[half:half + pr] = sig, sig
        return sigma, eps

    def __call__(self, student, teacher, x0, cond, generator, shard=(0, 1)) -> LevelMatchingOutput:
        if teacher is None:
            raise ValueError("the level term needs a teacher (its time score is the target)")
        sigma, eps = self.draw(x0, generator, shard)
        x_noisy = x0 + append_dims(sigma, x0.ndim) * eps
        with torch.no_grad():
            d_teacher = _call(teacher, x_noisy, sigma, cond).to(x0.dtype)
        target = d_teacher if self.target == "teacher" else x0
        train = student.training and torch.is_grad_enabled()
        _, grad, ts = energy_grad_and_time_score(student, x_noisy, sigma, cond, create_graph=train)
        denoised = x_noisy - append_dims(sigma, x0.ndim) ** 2 * grad
        loss = self.weight(sigma) * (denoised - target).flatten(1).pow(2).sum(1)
        pr, half = self.pair_rows(x0.shape[0], shard[1])
        rows = torch.cat([torch.arange(pr), half + torch.arange(pr)]).to(x0.device)
        c = None if cond is None else cond[rows]
        div = _divergence_kind(self.divergence, x0[0].numel(), self.exact_max_dim)
        t = teacher_time_score(teacher, x_noisy[rows], sigma[rows], c, divergence=div, num_probes=self.num_probes,
                               step=self.fd_step, generator=generator, denoised=d_teacher[rows])
        q = ts[rows] - t.to(ts.dtype)
        dq = q[:pr] - q[pr:]
        return LevelMatchingOutput(loss, sigma, x_noisy, denoised, target, self.level_weight * 0.5 * dq.pow(2),
                                   sigma[:pr], dq.detach())


# ---------------------------------------------------------------------------------------------------------------------
# 2D composition check: the product of two energies at one sigma by quadrature


def _energy_on(model: Any, pts: Tensor, sigma: float, chunk: int) -> Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, pts.shape[0], chunk):
            p = pts[i:i + chunk]
            dt = getattr(model, "dtype", None)
            p = p.to(dt) if isinstance(dt, torch.dtype) else p.float()
            out.append(model.energy(p, sigma).double())
    return torch.cat(out)


def _grid(lim: float, h: float) -> tuple[Tensor, float]:
    n = int(round(2 * lim / h))
    t = -lim + h * (torch.arange(n, dtype=torch.float64) + 0.5)  # cell midpoints
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], 1), h * h


def log_integral_2d(energies: Tensor, cell: float, mask: Tensor | None = None) -> float:
    """log of the midpoint-rule integral of exp(-E) over the grid cells (optionally only where `mask`)."""
    e = energies if mask is None else energies[mask]
    return float(torch.logsumexp(-e, 0) + math.log(cell)) if e.numel() else -math.inf


def exact_log_overlap(a: Any, b: Any, sigma: float) -> float:
    """log int q_a,sigma q_b,sigma dx for two analytic teachers: GaussianMixture x GaussianMixture (`gmm_product`) or
    GaussianMixture x Box in closed form: with tau^2 = s_k^2 + 2 sigma^2 per axis (isotropic components only),
    int N(x; mu_k, (s_k^2 + sigma^2) I) box_sigma(x) dx = prod_i (Phi((h_i - mu_ki)/tau) - Phi((l_i - mu_ki)/tau)) / (h_i - l_i).
    """
    from teachers.analytic import Box, GaussianMixture, gmm_product
    from fkdiff.special import log_ndtr_diff

    if isinstance(a, Box) and isinstance(b, GaussianMixture):
        a, b = b, a
    if isinstance(a, GaussianMixture) and isinstance(b, GaussianMixture):
        return gmm_product(a, b, sigma)[1]
    if isinstance(a, GaussianMixture) and isinstance(b, Box):
        lam = a.lam
        if not torch.allclose(lam, lam[:, :1].expand_as(lam)):
            raise ValueError("exact_log_overlap(GaussianMixture, Box) needs isotropic components")
        tau = (lam[:, :1] + 2 * sigma**2).sqrt()  # [K, 1]
        lo, hi = b.low.to(a.dtype), b.high.to(a.dtype)
        per = log_ndtr_diff((lo - a.means) / tau, (hi - a.means) / tau).sum(1) - b.log_volume
        return float(torch.logsumexp(a.log_weights + per, 0))
    raise TypeError(f"no closed form for {type(a).__name__} x {type(b).__name__}")


def product_check_2d(models: Sequence[Any], exact: Sequence[Any], sigma: float = 0.002, *,
                     region_fn: Callable[[Tensor], Tensor] | None = None, lim: float = 1.5, h: float = 0.0025,
                     chunk: int = 1 << 16) -> dict:
    """The product of two 2D energy models at `sigma` against the exact product of two analytic teachers.

    Quadrature by the midpoint rule on a grid of spacing h over [-lim, lim]^2 (each model's normaliser and the
    product's integral on the same grid; h <= sigma resolves the sharpest analytic edge: the Riemann error of a
    sigma-smoothed step is ~exp(-2 pi^2 sigma^2 / h^2)). `region_fn(x) -> bool [B]` marks one cluster (default: the
    upper half plane, y > 0: ring x strip's upper cluster). Returns
      log_overlap: log int p_a p_b (models normalised on the grid), exact_log_overlap (closed form) and
      exact_log_overlap_grid (the exact teachers on the same grid: the quadrature's own error), log_overlap_error;
      region_mass: the product's mass in the region, exact_region_mass, region_mass_error;
      model_log_normalisers: log int exp(-E) of each model on the grid (what turns an SMC log Z into a log-overlap).
    """
    region_fn = region_fn or (lambda x: x[:, 1] > 0)
    pts, cell = _grid(lim, h)
    mask = region_fn(pts)
    out: dict[str, Any] = {"sigma": float(sigma), "lim": lim, "h": h}
    for key, pair in (("model", models), ("exact", exact)):
        ea, eb = (_energy_on(m, pts, sigma, chunk) for m in pair)
        log_za, log_zb = log_integral_2d(ea, cell), log_integral_2d(eb, cell)
        e = ea + eb
        log_prod = log_integral_2d(e, cell)
        out[f"{key}_log_overlap_grid"] = log_prod - log_za - log_zb
        out[f"{key}_log_normalisers"] = [log_za, log_zb]
        out[f"{key}_region_mass"] = math.exp(log_integral_2d(e, cell, mask) - log_prod)
    out["log_overlap"] = out.pop("model_log_overlap_grid")
    out["region_mass"] = out.pop("model_region_mass")
    out["exact_log_overlap"] = exact_log_overlap(exact[0], exact[1], sigma)
    out["exact_region_mass"] = out.pop("exact_region_mass")
    out["log_overlap_error"] = out["log_overlap"] - out["exact_log_overlap"]
    out["region_mass_error"] = out["region_mass"] - out["exact_region_mass"]
    return out


def product_check_smc(models: Sequence[Any], exact: Sequence[Any], sigma: float = 0.002, *,
                      log_normalisers: Sequence[float], region_fn: Callable[[Tensor], Tensor] | None = None,
                      num_particles: int = 2000, num_steps: int = 100, sigma_max: float = 10.0,
                      generator: torch.Generator | None = None) -> dict:
    """The same check by Feynman-Kac SMC (`fkdiff.smc.sample` on `compose.product(*models)`, 1 HMC step of 3 leapfrog
    per level, as README's example): region mass of the weighted particles, and log-overlap = log Z - sum of the
    models' log normalisers (`log_normalisers`, e.g. `product_check_2d(...)["model_log_normalisers"]`; SMC's log Z is
    log int exp(-E_a - E_b) for the energies as given)."""
    from fkdiff import compose, mcmc, smc

    region_fn = region_fn or (lambda x: x[:, 1] > 0)
    res = smc.sample(compose.product(*models), num_particles, shape=(2,), num_steps=num_steps, sigma_max=sigma_max,
                     sigma_min=sigma, mcmc=mcmc.HMC(1, 3), generator=generator)
    w = torch.softmax(res.log_weights.double(), 0)
    mass = float((w * region_fn(res.samples).double()).sum())
    log_overlap = float(res.log_Z) - float(sum(log_normalisers))
    exact_lo = exact_log_overlap(exact[0], exact[1], sigma)
    return {"region_mass": mass, "log_overlap": log_overlap, "log_overlap_error": log_overlap - exact_lo,
            "log_Z": float(res.log_Z), "log_Z_se": float(res.log_Z_se), "min_ess": float(res.min_ess),
            "num_particles": num_particles, "num_steps": num_steps}


# ---------------------------------------------------------------------------------------------------------------------
# level diagnostics


def teacher_regions(teacher: Any, x0: Tensor, num_slabs: int = 4) -> Tensor | None:
    """A region label `[N]` (long) for each clean sample x0 of an analytic teacher, or None.

    GaussianMixture: its most responsible component at sigma -> 0 (its modes). Box: `num_slabs` equal slabs along the
    box's longest axis (a box has no modes, but drift of the energy along a long box moves mass between its parts,
    e.g. between the two clusters of ring x strip).
    """
    from teachers.analytic import Box, GaussianMixture

    if isinstance(teacher, GaussianMixture):
        return teacher.component_probs(x0.to(teacher.dtype), 1e-4).argmax(1)
    if isinstance(teacher, Box):
        width = teacher.high - teacher.low
        k = int(width.argmax())
        u = (x0[:, k].to(teacher.dtype) - teacher.low[k]) / width[k]
        return (u * num_slabs).floor().clamp(0, num_slabs - 1).long()
    return None


def mode_offset_error_by_bucket(student: Any, reference: Any, x0: Tensor, labels: Tensor, edges: Sequence[float],
                                generator: torch.Generator, *, num_sigmas: int = 3, cond: Any = None,
                                max_batch: int = 4096) -> dict[str, list]:
    """Error of the energy-level offsets between the teacher's modes, per sigma bucket (what sets SMC mode masses).

    At `num_sigmas` log-spaced sigma in each bucket, x = x0 + sigma eps for all N rows and the error
    err(x) = E_student(x) - E_ref(x); its mean over the rows of mode k is delta_k (the per-sigma constant is common to
    all modes). Reported: offset_rms = sqrt(sum_k pi_k (delta_k - sum_j pi_j delta_j)^2) with pi_k the rows' mode
    fractions (rms over the sigmas of the bucket), and offset_span = max_k delta_k - min_k delta_k (worst over the
    sigmas): exp(offset_span) is the worst factor by which SMC on the student misweights one mode against another.
    `reference` needs an exact `energy`; `labels [N]` from `teacher_regions`. x0 `[N, *event]`.
    """
    out = {"bucket": _bucket_names(edges), "offset_rms": [], "offset_span": []}
    labels = labels.to(x0.device)
    ks = labels.unique()
    pi = torch.stack([(labels == k).double().mean() for k in ks])
    for lo, hi in zip(edges[:-1], edges[1:]):
        ms, spans = [], []
        for j in range(num_sigmas):
            sig = math.exp(math.log(lo) + (j + 0.5) / num_sigmas * (math.log(hi) - math.log(lo)))
            err = []
            for i in range(0, x0.shape[0], max_batch):
                xb = x0[i:i + max_batch]
                cb = None if cond is None else cond[i:i + max_batch]
                x = xb + sig * torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
                s = torch.full((xb.shape[0],), sig, dtype=xb.dtype, device=xb.device)
                with torch.no_grad():
                    es = student.energy(x, s) if cb is None else student.energy(x, s, cb)
                    er = reference.energy(x.double(), s.double()) if cb is None else reference.energy(x, s, cb)
                err.append(es.double() - er.double())
            err = torch.cat(err)
            delta = torch.stack([err[labels == k].mean() for k in ks])
            ms.append(float((pi * (delta - (pi * delta).sum()) ** 2).sum()))
            spans.append(float(delta.max() - delta.min()))
        out["offset_rms"].append(math.sqrt(sum(ms) / len(ms)))
        out["offset_span"].append(max(spans))
    return out


def _time_score_pairs(student: Any, teacher: Callable, xa: Tensor, xb: Tensor, sig: Tensor, ca: Any, cb: Any,
                      divergence: str, num_probes: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(dq1, dq2, dT) `[P]`: pair differences of q = sigma dE/dsigma - T with two independent divergence estimates
    (equal when the divergence is exact), and of the target T itself."""
    def one(x, c):
        t1 = teacher_time_score(teacher, x, sig, c, divergence=divergence, num_probes=num_probes, generator=generator)
        t2 = t1 if divergence == "exact" else teacher_time_score(teacher, x, sig, c, divergence=divergence,
                                                                  num_probes=num_probes, generator=generator)
        ts = time_score(student, x, sig, c, create_graph=False).to(t1.dtype)
        return ts - t1, ts - t2, t1
    qa1, qa2, ta = one(xa, ca)
    qb1, qb2, tb = one(xb, cb)
    return qa1 - qb1, qa2 - qb2, ta - tb


def _divergence_kind(divergence: str, d: int, exact_max_dim: int = 8) -> str:
    return divergence if divergence != "auto" else ("exact" if d <= exact_max_dim else "hutchinson")


def time_score_error_by_bucket(student: Any, teacher: Callable, x0: Tensor, edges: Sequence[float],
                               generator: torch.Generator, *, cond: Any = None, divergence: str = "auto",
                               num_probes: int = 4, max_batch: int = 1024) -> dict[str, list]:
    """The student's time score against the teacher's (2), per sigma bucket: no energy needed (image teachers).

    Pairs (x_a, x_b) at a common sigma (log-uniform per pair in the bucket); q = sigma dE_theta/dsigma - T, and
    dq = q_a - q_b (the per-sigma constant cancels) is the rate, in nats per unit ln sigma, at which the pair's
    relative energy drifts from the teacher's as sigma changes. With a Hutchinson divergence, T is estimated twice
    with independent probes and rms = sqrt(max(0, E[dq1 dq2])) is free of the probe noise (cross-fitted);
    rms_raw = sqrt(E[dq1^2]) includes it, and noise_rms = sqrt(E[(dq1 - dq2)^2] / 2) is its size.
    target_rms = sqrt(E[(T_a - T_b)^2]) is the scale of the target (what a student with a sigma-independent relative
    energy would score). x0 `[N, *event]` (N even; rows a = first half, b = second half), cond rows alike.
    """
    div = _divergence_kind(divergence, x0[0].numel())
    out = {"bucket": _bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "rms": [], "rms_raw": [],
           "noise_rms": [], "target_rms": [], "divergence": div, "num_probes": num_probes}
    n = x0.shape[0] // 2
    for lo, hi in zip(edges[:-1], edges[1:]):
        c12, c11, noise, tt = [], [], [], []
        for i in range(0, n, max_batch):
            j = min(i + max_batch, n)
            a, b = x0[i:j], x0[n + i:n + j]
            ca = None if cond is None else cond[i:j]
            cb = None if cond is None else cond[n + i:n + j]
            sig = _log_uniform(a.shape[0], lo, hi, generator, a)
            xa = a + append_dims(sig, a.ndim) * torch.randn(a.shape, generator=generator, dtype=a.dtype).to(a.device)
            xb = b + append_dims(sig, b.ndim) * torch.randn(b.shape, generator=generator, dtype=b.dtype).to(b.device)
            dq1, dq2, dt = _time_score_pairs(student, teacher, xa, xb, sig, ca, cb, div, num_probes, generator)
            c12.append((dq1 * dq2).double()), c11.append(dq1.double() ** 2)
            noise.append(0.5 * (dq1 - dq2).double() ** 2), tt.append(dt.double() ** 2)
        out["rms"].append(math.sqrt(max(0.0, float(torch.cat(c12).mean()))))
        out["rms_raw"].append(math.sqrt(float(torch.cat(c11).mean())))
        out["noise_rms"].append(math.sqrt(float(torch.cat(noise).mean())))
        out["target_rms"].append(math.sqrt(float(torch.cat(tt).mean())))
    return out


def _gauss_legendre(n: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes and weights on [0, 1]."""
    import numpy as np

    t, w = np.polynomial.legendre.leggauss(n)
    return torch.as_tensor((t + 1) / 2, dtype=dtype), torch.as_tensor(w / 2, dtype=dtype)


def teacher_relative_energy(teacher: Callable, xa: Tensor, xb: Tensor, sigma: Tensor, *, sigma_ref: float = 5.0,
                            cond: Any = None, num_sigma_nodes: int = 24, num_path_nodes: int = 16,
                            divergence: str = "auto", num_probes: int = 4,
                            generator: torch.Generator | None = None) -> Tensor:
    """The teacher's relative energy E_T(x_a, sigma) - E_T(x_b, sigma) `[P]` from its denoiser alone.

    Heat equation (2) along ln sigma at the fixed points, from sigma_ref down to sigma, plus the line integral of
    the teacher's score between the points at sigma_ref, where p_sigma_ref is smooth along the segment:

        dE_T(sigma) = -int_0^1 (x_a - x_b) . s_T(x_b + t (x_a - x_b), sigma_ref) dt
                      - int_{ln sigma}^{ln sigma_ref} (T(x_a, s) - T(x_b, s)) d ln s

    both by Gauss-Legendre. For a conservative teacher this is exact up to quadrature (and Hutchinson noise). The pair
    shares `cond` (one condition per pair, `[P]` rows or None). xa, xb `[P, *event]`, sigma `[P]` (<= sigma_ref).
    """
    div = _divergence_kind(divergence, xa[0].numel())
    wd = getattr(teacher, "dtype", None)
    wd = wd if isinstance(wd, torch.dtype) and wd.is_floating_point else xa.dtype
    xa, xb, sigma = xa.detach().to(wd), xb.detach().to(wd), sigma.detach().to(wd)
    t, w = _gauss_legendre(num_path_nodes, wd)
    sref = torch.full_like(sigma, float(sigma_ref))
    line = torch.zeros_like(sigma)
    with torch.no_grad():
        for tk, wk in zip(t.tolist(), w.tolist()):
            x = xb + tk * (xa - xb)
            s_t = (_call(teacher, x, sref, cond).to(wd) - x) / float(sigma_ref) ** 2
            line -= wk * ((xa - xb) * s_t).flatten(1).sum(1)
    u, v = _gauss_legendre(num_sigma_nodes, wd)
    lo, hi = sigma.log(), math.log(float(sigma_ref))
    heat = torch.zeros_like(sigma)
    for uk, vk in zip(u.tolist(), v.tolist()):
        s = (lo + uk * (hi - lo)).exp()
        ta = teacher_time_score(teacher, xa, s, cond, divergence=div, num_probes=num_probes, generator=generator)
        tb = teacher_time_score(teacher, xb, s, cond, divergence=div, num_probes=num_probes, generator=generator)
        heat += vk * (hi - lo) * (ta - tb).to(wd)
    return line - heat


def integrated_level_error_by_bucket(student: Any, teacher: Callable, x0: Tensor, edges: Sequence[float],
                                     generator: torch.Generator, *, sigma_ref: float = 5.0, cond: Any = None,
                                     num_sigma_nodes: int = 24, num_path_nodes: int = 16, divergence: str = "auto",
                                     num_probes: int = 4, max_batch: int = 1024) -> dict[str, list]:
    """The student's relative-energy error against the teacher's *without a teacher energy* (image teachers).

    Pairs at a common sigma in each bucket below sigma_ref; error = (E_theta(x_a) - E_theta(x_b)) - (teacher's, by
    `teacher_relative_energy`). rms in nats, as `energy_gap_error_by_bucket` reports against an exact energy; with a
    Hutchinson divergence the teacher's estimate is made twice with independent probes and rms is cross-fitted
    (sqrt(max(0, E[err1 err2]))), noise_rms = sqrt(E[(err1 - err2)^2] / 2) the size of the probe noise.
    Pairs share their condition: row b takes row a's cond. Buckets above sigma_ref report NaN.
    """
    div = _divergence_kind(divergence, x0[0].numel())
    out = {"bucket": _bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "rms": [],
           "noise_rms": [], "sigma_ref": float(sigma_ref), "divergence": div, "num_probes": num_probes}
    n = x0.shape[0] // 2
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > sigma_ref:
            out["rms"].append(float("nan")), out["noise_rms"].append(float("nan"))
            continue
        c12, noise = [], []
        for i in range(0, n, max_batch):
            j = min(i + max_batch, n)
            a, b = x0[i:j], x0[n + i:n + j]
            c = None if cond is None else cond[i:j]
            sig = _log_uniform(a.shape[0], lo, hi, generator, a)
            xa = a + append_dims(sig, a.ndim) * torch.randn(a.shape, generator=generator, dtype=a.dtype).to(a.device)
            xb = b + append_dims(sig, b.ndim) * torch.randn(b.shape, generator=generator, dtype=b.dtype).to(b.device)
            with torch.no_grad():
                es = (student.energy(xa, sig) - student.energy(xb, sig)) if c is None else (
                    student.energy(xa, sig, c) - student.energy(xb, sig, c))
            kw = dict(sigma_ref=sigma_ref, cond=c, num_sigma_nodes=num_sigma_nodes, num_path_nodes=num_path_nodes,
                      divergence=div, num_probes=num_probes, generator=generator)
            e1 = es.double() - teacher_relative_energy(teacher, xa, xb, sig, **kw).double()
            e2 = e1 if div == "exact" else es.double() - teacher_relative_energy(teacher, xa, xb, sig, **kw).double()
            c12.append(e1 * e2), noise.append(0.5 * (e1 - e2) ** 2)
        out["rms"].append(math.sqrt(max(0.0, float(torch.cat(c12).mean()))))
        out["noise_rms"].append(math.sqrt(float(torch.cat(noise).mean())))
    return out


def residual_by_bucket(student: Callable, teacher: Callable, x0: Tensor, edges: Sequence[float],
                       generator: torch.Generator, *, cond: Any = None, control: tuple | None = None,
                       asymmetry: bool = True, max_batch: int = 4096) -> dict[str, list]:
    """The non-conservative part, per sigma bucket: distillation residual, its excess over a control, asymmetry.

    residual = E|D_student - D_teacher|^2 / d at x = x0 + sigma eps (sigma log-uniform per row in the bucket): the
    teacher's rotational part r (in denoiser units sigma^2 r, with div(p_sigma r) = 0) plus the student's fitting
    error. `control = (control_student, control_teacher)`: a student distilled the same way from an exactly
    conservative teacher; excess = residual - its residual on the same (x, sigma) estimates |sigma^2 r|^2 / d alone
    (the residual by itself over-reports r where the fitting error dominates, e.g. small sigma between modes).
    asymmetry_rel = E|J v - J^T v|^2 / E|J v|^2 of the teacher's score Jacobian (fkdiff.distillation.teacher_asymmetry).
    """
    from fkdiff.distillation import teacher_asymmetry  # the diagnostics module of the distillation path

    out = {"bucket": _bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "residual": [],
           "asymmetry_rel": []}
    if control is not None:
        out["control_residual"], out["excess_residual"] = [], []
    d = x0[0].numel()
    for lo, hi in zip(edges[:-1], edges[1:]):
        res, ctl, asym, scale = [], [], [], []
        for i in range(0, x0.shape[0], max_batch):
            xb = x0[i:i + max_batch]
            cb = None if cond is None else cond[i:i + max_batch]
            sig = _log_uniform(xb.shape[0], lo, hi, generator, xb)
            x = xb + append_dims(sig, xb.ndim) * torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
            with torch.no_grad():
                dt = _call(teacher, x, sig, cb).to(x.dtype)
            ds = _call(student, x, sig, cb).detach().to(x.dtype)
            res.append((ds - dt).flatten(1).pow(2).sum(1) / d)
            if control is not None:
                with torch.no_grad():
                    ct = _call(control[1], x, sig, cb).to(x.dtype)
                cs = _call(control[0], x, sig, cb).detach().to(x.dtype)
                ctl.append((cs - ct).flatten(1).pow(2).sum(1) / d)
            if asymmetry:
                a, s = teacher_asymmetry(teacher, x, sig, cb, generator)
                asym.append(a.double()), scale.append(s.double())
        r = float(torch.cat(res).double().mean())
        out["residual"].append(r)
        if control is not None:
            c = float(torch.cat(ctl).double().mean())
            out["control_residual"].append(c), out["excess_residual"].append(r - c)
        out["asymmetry_rel"].append(float(torch.cat(asym).mean() / torch.cat(scale).mean().clamp_min(1e-300))
                                    if asymmetry else float("nan"))
    return out


def level_report(student: Any, teacher: Any, x0: Tensor, edges: Sequence[float], generator: torch.Generator, *,
                 cond: Any = None, num_probes: int = 2, integrated: bool = False, integrated_samples: int = 64,
                 num_sigma_nodes: int = 12, sigma_ref: float = 5.0) -> dict:
    """Every level diagnostic that applies to this (student, teacher), for report.json:
    `time_score` (always: against the teacher's denoiser), `mode_offsets` (teachers with an exact energy and regions:
    the analytic ones), `integrated` (opt-in, on the first `integrated_samples` rows: the relative-energy error without
    a teacher energy; it costs num_sigma_nodes x (1 + 2 num_probes) x 4 teacher calls per row and bucket), `residual`.
    """
    out: dict[str, Any] = {}
    n = x0.shape[0] - x0.shape[0] % 2
    out["time_score"] = time_score_error_by_bucket(student, teacher, x0[:n], edges, generator,
                                                   cond=None if cond is None else cond[:n], num_probes=num_probes)
    labels = teacher_regions(teacher, x0) if callable(getattr(teacher, "energy", None)) and cond is None else None
    if labels is not None:
        out["mode_offsets"] = mode_offset_error_by_bucket(student, teacher, x0, labels, edges, generator)
    if integrated:
        m = min(n, 2 * (int(integrated_samples) // 2))
        out["integrated"] = integrated_level_error_by_bucket(student, teacher, x0[:m], edges, generator,
                                                             sigma_ref=sigma_ref, cond=None if cond is None else cond[:m],
                                                             num_probes=num_probes, num_sigma_nodes=num_sigma_nodes)
    out["residual"] = residual_by_bucket(student, teacher, x0, edges, generator, cond=cond)
    return out
