"""What distillation measures, per sigma bucket (DESIGN.md section 4; docs/conventions.md):

- the distillation residual |D_theta - D_teacher|^2 / dim (what no energy can represent, plus fitting error);
- the teacher's Jacobian asymmetry |J - J^T|_F^2, J = d s_teacher / dx, by Hutchinson: E_v |J v - J^T v|^2 with
  v ~ N(0, I), one jvp and one vjp per probe (Thornton et al. fig. 4); zero for a conservative teacher;
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

__all__ = ["bucketize", "bucket_names", "per_bucket_mean", "teacher_asymmetry", "denoiser_error_by_bucket",
           "energy_gap_error_by_bucket"]


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
    One jvp (forward mode) and one vjp per probe; falls back to the double-vjp jvp if forward mode is unsupported.
    """
    s2 = append_dims(sigma, x.ndim) ** 2

    def score_fn(z: Tensor) -> Tensor:
        return (denoise(teacher, z, sigma, cond) - z) / s2

    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x = x.detach()
    # fused attention kernels (flash / memory-efficient) have neither forward AD nor double backward: the math kernel
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        try:
            _, jv = torch.func.jvp(score_fn, (x,), (v,))
        except (NotImplementedError, RuntimeError):
            _, jv = torch.autograd.functional.jvp(score_fn, x, v)
        _, vjp_fn = torch.func.vjp(score_fn, x)
        (jtv,) = vjp_fn(v)
    return (jv - jtv).flatten(1).pow(2).sum(1).detach(), jv.flatten(1).pow(2).sum(1).detach()


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
