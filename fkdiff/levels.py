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
enters the graph). The level term (`fkdiff.distillation.LevelMatchingLoss`) matches the two on *differences between
two samples at the same sigma*, so the student's free per-sigma constant cancels:

    L_level = w(step) E_sigma [ lambda_L(sigma) ((q_i - q_j)^2 / 2) ],   q = sigma dE_theta/dsigma - T        (3)

Integrated over ln sigma from where the modes overlap (and the projection loss pins the levels) down to sigma_min,
(3) transports correct relative levels to every sigma: E(x_i, s) - E(x_j, s) = [the same at S] - int_s^S (T_i - T_j)
dln sigma. Hence lambda_L is flat in ln sigma below `sigma_max` (an error in the time score costs the same at every
ln sigma) and the level term's pairs are drawn log-uniformly there (`PairSigmaLaw`).

This module holds the math: the time scores (1)-(2), the pairs' sigma law, the teacher's relative energy from its
denoiser alone (`teacher_relative_energy`) and the 2D composition check. The term (3) is
`fkdiff.distillation.level_loss`, the per-bucket diagnostics are `fkdiff.distillation.level_diagnostics`:
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

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from fkdiff.diffusion import append_dims, as_sigma

__all__ = ["teacher_time_score", "energy_grad_and_time_score", "time_score", "PairSigmaLaw", "divergence_kind",
           "teacher_relative_energy", "log_integral_2d", "exact_log_overlap", "product_check_2d", "product_check_smc"]


def _call(denoiser: Callable, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    return denoiser(x, sigma) if cond is None else denoiser(x, sigma, cond)


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


def _double_backward_kernels(create_graph: bool):
    """Attention through the math kernel when the derivatives keep their graph (the fused flash / memory-efficient
    kernels have no double backward); a no-op otherwise."""
    return sdpa_kernel(SDPBackend.MATH) if create_graph else contextlib.nullcontext()


def energy_grad_and_time_score(student: Any, x: Tensor, sigma: Tensor, cond: Any = None,
                               create_graph: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """(E `[B]`, grad_x E `[B, *event]`, sigma dE/dsigma `[B]`) of an energy model from one autograd call.

    sigma `[B]` enters the graph, so the time score costs nothing beyond the gradient the denoiser needs. With
    `create_graph` both derivatives keep their graph (training: the losses differentiate them w.r.t. theta).
    """
    with torch.enable_grad(), _double_backward_kernels(create_graph):
        xg = x.detach().requires_grad_(True)
        sg = as_sigma(sigma, xg).detach().requires_grad_(True)
        e = student.energy(xg, sg) if cond is None else student.energy(xg, sg, cond)
        gx, gs = torch.autograd.grad(e.sum(), (xg, sg), create_graph=create_graph)
    if not create_graph:
        e, gx, gs = e.detach(), gx.detach(), gs.detach()
    return e, gx, sg.detach() * gs


def time_score(student: Any, x: Tensor, sigma: Tensor, cond: Any = None, create_graph: bool = True) -> Tensor:
    """sigma dE/dsigma `[B]` of an energy model alone (one forward, one backward to sigma only)."""
    with torch.enable_grad(), _double_backward_kernels(create_graph):
        sg = as_sigma(sigma, x).detach().requires_grad_(True)
        e = student.energy(x.detach(), sg) if cond is None else student.energy(x.detach(), sg, cond)
        (gs,) = torch.autograd.grad(e.sum(), sg, create_graph=create_graph)
    out = sg.detach() * gs
    return out if create_graph else out.detach()


# ---------------------------------------------------------------------------------------------------------------------
# the level term's sigma law (3)


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


def divergence_kind(divergence: str, d: int, exact_max_dim: int = 8) -> str:
    """"exact" or "hutchinson" for a divergence setting ("auto": exact for d <= exact_max_dim)."""
    return divergence if divergence != "auto" else ("exact" if d <= exact_max_dim else "hutchinson")


# ---------------------------------------------------------------------------------------------------------------------
# the teacher's relative energy from its denoiser alone: (2) integrated along ln sigma


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
    div = divergence_kind(divergence, xa[0].numel())
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
