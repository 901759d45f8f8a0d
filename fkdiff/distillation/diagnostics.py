"""What distillation measures, per sigma bucket (DESIGN.md section 4; docs/conventions.md):

- the distillation residual |D_theta - D_teacher|^2 / dim (what no energy can represent, plus fitting error);
- the teacher's Jacobian asymmetry |J - J^T|_F^2, J = d s_teacher / dx, by Hutchinson: E_v |J v - J^T v|^2 with
  v ~ N(0, I), one jvp and one vjp per probe (Thornton et al. fig. 4); zero for a conservative teacher;
- the relative asymmetry of any denoiser's Jacobian per sigma, |J - J^T|_F / |J|_F with J = dD(x, sigma)/dx on noised
  data (`jacobian_asymmetry`, `denoiser_asymmetry_by_sigma`): a DSM teacher's, and ~0 for an energy student (its J is
  I - sigma^2 Hess E: symmetric by construction);
- at the end of a run against an exact (analytic) teacher: the excess denoiser error over the optimum, and the error
  of the student's *relative* energies between samples (what SMC weights depend on).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import Tensor

from fkdiff.diffusion import append_dims
from fkdiff.distillation.loss import denoise

__all__ = ["bucketize", "bucket_names", "per_bucket_mean", "teacher_asymmetry", "jacobian_asymmetry",
           "denoiser_asymmetry_by_sigma", "denoiser_error_by_bucket", "energy_gap_error_by_bucket"]


def bucketize(sigma: Tensor, edges: Sequence[float]) -> Tensor:
    """Bucket index in [0, len(edges) - 2] of each sigma (values outside the edges go to the end buckets). `[B]`."""
    e = torch.as_tensor(list(edges), dtype=sigma.dtype, device=sigma.device)
    return (torch.bucketize(sigma, e[1:-1], right=True)).clamp(0, len(edges) - 2)


def bucket_names(edges: Sequence[float]) -> list[str]:
    return [f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:])]


def per_bucket_mean(values: Tensor, sigma: Tensor, edges: Sequence[float]) -> dict[str, Tensor]:
    """{bucket name: mean of values in it} for the buckets that hold at least one sample."""
    idx = bucketize(sigma, edges)
    return {name: values[idx == i].mean() for i, name in enumerate(bucket_names(edges)) if (idx == i).any()}


def teacher_asymmetry(teacher: Callable, x: Tensor, sigma: Tensor, cond: Any = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of |J - J^T|_F^2 with J = d s_teacher/dx, s = (D(x) - x)/sigma^2, one probe per sample.

    Returns (asym `[B]` = |J v - J^T v|^2, scale `[B]` = |J v|^2 (estimates |J|_F^2), for a relative asymmetry).
    `jacobian_asymmetry` of the score with one probe (one vjp and one double-vjp jvp).
    A teacher with an exact `energy` (analytic teachers, whose closed-form denoiser is x - sigma^2 grad E to ~1e-13)
    is differentiated through its energy: autograd through the Box's closed-form score is NaN far outside the box at
    small sigma (an inf * 0 in the Mills ratio's derivative), through its energy it is finite.
    """
    s2 = append_dims(sigma, x.ndim) ** 2
    energy = getattr(teacher, "energy", None)

    def score_fn(z: Tensor) -> Tensor:
        if callable(energy) and cond is None:
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(energy(zz, sigma).sum(), zz, create_graph=True)
            return -g
        return (denoise(teacher, z, sigma, cond) - z) / s2

    asym, scale = jacobian_asymmetry(score_fn, x, generator, num_probes=1)
    return asym.to(x.dtype), scale.to(x.dtype)


def jacobian_asymmetry(fn: Callable[[Tensor], Tensor], x: Tensor, generator: torch.Generator,
                       num_probes: int = 1) -> tuple[Tensor, Tensor]:
    """Hutchinson estimates, per row, of |J - J^T|_F^2 and |J|_F^2, with J = d fn(x)_b / d x_b the row's Jacobian.

    `fn` maps `x [B, *event]` to `[B, *event]` row by row (rows do not interact) and must be differentiable twice
    (an energy student's denoiser: call it with create_graph=True). Estimator: for probes v ~ N(0, I) drawn from
    `generator`, E_v |M v|^2 = tr(M^T M) = |M|_F^2, so with M = J - J^T and M = J,
        asym_b  = mean over probes of |J v - J^T v|^2     (unbiased for |J - J^T|_F^2)
        scale_b = mean over probes of |J v|^2             (unbiased for |J|_F^2)
    J^T v is one vjp of y = fn(x); J v is the double-vjp jvp: g(u) = J^T u = d<y, u>/dx (graph kept), then
    J v = d<g(u), v>/du (g is linear in u); one forward pass serves every probe. Plain autograd only (no forward
    mode), so networks whose forward calls torch.autograd.grad (energy students) work. Returns (asym `[B]`,
    scale `[B]`), float64, detached; the relative asymmetry of a batch is sqrt(asym.mean() / scale.mean()).
    """
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    x = x.detach().requires_grad_(True)
    # fused attention kernels (flash / memory-efficient) have no double backward: the math kernel
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        y = fn(x)
        if y.shape != x.shape:
            raise ValueError(f"fn must map x {tuple(x.shape)} to the same shape, got {tuple(y.shape)}")
        u = torch.zeros_like(y, requires_grad=True)
        (jtu,) = torch.autograd.grad(y, x, u, create_graph=True)
        asym = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        scale = torch.zeros_like(asym)
        for _ in range(num_probes):
            v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            (jtv,) = torch.autograd.grad(y, x, v, retain_graph=True)
            (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
            asym += (jv - jtv).detach().flatten(1).double().pow(2).sum(1)
            scale += jv.detach().flatten(1).double().pow(2).sum(1)
    return asym / num_probes, scale / num_probes


def denoiser_asymmetry_by_sigma(denoiser: Callable, x0: Tensor, sigmas: Sequence[float], generator: torch.Generator,
                                cond: Any = None, num_probes: int = 1, max_batch: int = 256) -> dict[str, list]:
    """Relative asymmetry of the denoiser's Jacobian, |J - J^T|_F / |J|_F with J = dD(x, sigma)/dx, per sigma.

    At every sigma in `sigmas`, every row of `x0 [N, *event]` (held-out data; `cond` its conditions) is noised once,
    x = x0 + sigma eps (eps ~ N(0, I) from `generator`), and `jacobian_asymmetry` (Hutchinson, `num_probes` Gaussian
    probes a row) estimates a_i ~ |J_i - J_i^T|_F^2 and s_i ~ |J_i|_F^2. Reported per sigma:
        rel     = sqrt(sum_i a_i / sum_i s_i)   (Thornton et al. fig. 4 shows |J - J^T|^2 of a DSM score network; the
                  score's Jacobian is (J - I) / sigma^2, with the same antisymmetric part up to 1 / sigma^2)
        rel_se  = its delta-method standard error over the rows: se(R) = std_i(a_i - R s_i) / (sqrt(N) mean_i s_i),
                  R = rel^2, se(rel) = se(R) / (2 rel)
        asym_fro2, jac_fro2 = the means of a_i and s_i (per row, summed over event dims).
    A conservative denoiser (D = x - sigma^2 grad E: an energy student, an exact GMM) has J = I - sigma^2 Hess E,
    symmetric: rel is float round-off there. An `fkdiff.energy.EnergyStudent` is called with create_graph=True.
    """
    from fkdiff.energy import EnergyStudent

    out: dict[str, list] = {"sigma": [float(s) for s in sigmas], "rel": [], "rel_se": [], "asym_fro2": [],
                            "jac_fro2": []}
    for s in out["sigma"]:
        a_all, s_all = [], []
        for i in range(0, x0.shape[0], max_batch):
            xb = x0[i:i + max_batch]
            cb = None if cond is None else cond[i:i + max_batch]
            sig = torch.full((xb.shape[0],), s, dtype=xb.dtype, device=xb.device)
            x = xb + s * torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
            if isinstance(denoiser, EnergyStudent):
                def fn(z, sig=sig, cb=cb):
                    return denoiser(z, sig, cb, create_graph=True)
            else:
                def fn(z, sig=sig, cb=cb):
                    return denoise(denoiser, z, sig, cb)
            a, sc = jacobian_asymmetry(fn, x, generator, num_probes)
            a_all.append(a), s_all.append(sc)
        a, sc = torch.cat(a_all), torch.cat(s_all)
        ratio = float(a.mean() / sc.mean().clamp_min(1e-300))
        se_ratio = float((a - ratio * sc).std() / (math.sqrt(a.numel()) * sc.mean().clamp_min(1e-300))) \
            if a.numel() > 1 else float("nan")
        rel = math.sqrt(max(ratio, 0.0))
        out["rel"].append(rel)
        out["rel_se"].append(se_ratio / (2 * rel) if rel > 0 else float("nan"))
        out["asym_fro2"].append(float(a.mean()))
        out["jac_fro2"].append(float(sc.mean()))
    return out


def _log_uniform(lo: float, hi: float, n: int, generator: torch.Generator) -> Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp()


def denoiser_error_by_bucket(student: Callable, reference: Callable, x0: Tensor, edges: Sequence[float],
                             generator: torch.Generator, cond: Any = None, max_batch: int = 4096) -> dict[str, list]:
    """Excess denoiser error of `student` over the exact/reference denoiser, per sigma bucket.

    In bucket [lo, hi), every x0 row gets its own sigma, log-uniform in [lo, hi), and x = x0 + sigma eps. Then
    excess = E|D_student(x) - D_ref(x)|^2 and optimal = E|D_ref(x) - x0|^2 (the reference's own denoising error, the
    minimum when D_ref is the exact denoiser), per sample summed over event dims, and ratio = excess / optimal.
    `x0 [N, *event]`. Returns {"bucket", "lo", "hi", "excess", "optimal", "ratio"}, lists aligned with the buckets.
    """
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]),
           "excess": [], "optimal": [], "ratio": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        exc, opt = [], []
        for i in range(0, x0.shape[0], max_batch):
            xb = x0[i:i + max_batch]
            cb = None if cond is None else cond[i:i + max_batch]
            sig = _log_uniform(lo, hi, xb.shape[0], generator).to(xb)
            eps = torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
            x = xb + append_dims(sig, xb.ndim) * eps
            with torch.no_grad():
                d_ref = denoise(reference, x, sig, cb).to(xb.dtype)
            d_st = denoise(student, x, sig, cb).detach().to(xb.dtype)
            exc.append((d_st - d_ref).flatten(1).pow(2).sum(1))
            opt.append((d_ref - xb).flatten(1).pow(2).sum(1))
        e, o = torch.cat(exc).mean().item(), torch.cat(opt).mean().item()
        out["excess"].append(e)
        out["optimal"].append(o)
        out["ratio"].append(e / max(o, 1e-300))
    return out


def energy_gap_error_by_bucket(student: Any, reference: Any, x0: Tensor, edges: Sequence[float],
                               generator: torch.Generator, max_batch: int = 4096) -> dict[str, list]:
    """Error of the student's *relative* energies, per sigma bucket: what SMC weights depend on.

    The denoiser error sees only grad E, i.e. E up to a constant on every region where p_sigma has mass; between
    separated modes at small sigma the loss does not pin the energy levels, and those levels set the mode masses of
    a composition. In bucket [lo, hi) pairs (x_i, x_j) are drawn from p_sigma at a common sigma (log-uniform per
    pair) and rms = sqrt(E[((E_s(x_i) - E_s(x_j)) - (E_ref(x_i) - E_ref(x_j)))^2]) in nats (the per-sigma additive
    constant cancels); `reference` must have an exact `energy` (analytic teachers). `x0 [N, *event]`, N even.
    """
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "rms_nats": []}
    n = x0.shape[0] // 2
    for lo, hi in zip(edges[:-1], edges[1:]):
        sq = []
        for i in range(0, n, max_batch):
            a, b = x0[i:min(i + max_batch, n)], x0[n + i:n + min(i + max_batch, n)]
            sig = _log_uniform(lo, hi, a.shape[0], generator).to(a)
            xa = a + append_dims(sig, a.ndim) * torch.randn(a.shape, generator=generator, dtype=a.dtype)
            xb = b + append_dims(sig, b.ndim) * torch.randn(b.shape, generator=generator, dtype=b.dtype)
            with torch.no_grad():
                d_st = (student.energy(xa, sig) - student.energy(xb, sig)).double()
                d_ref = (reference.energy(xa.double(), sig.double()) - reference.energy(xb.double(), sig.double()))
            sq.append((d_st - d_ref.double()) ** 2)
        out["rms_nats"].append(float(torch.cat(sq).mean().sqrt()))
    return out
