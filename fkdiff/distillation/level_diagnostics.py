"""Energy levels per sigma bucket (issue 9; the math in fkdiff/levels.py): what SMC needs of a student's energies.

- `mode_offset_error_by_bucket`: the error of the energy-level offsets between the teacher's modes (what sets the
  mode masses under SMC), against an exact energy (`teacher_regions` labels the modes of the analytic teachers);
- `time_score_error_by_bucket`: the pairwise time-score error against the teacher's T (no teacher energy needed), and
  `integrated_level_error_by_bucket`: the relative-energy error itself, with the teacher's relative energy from its
  heat equation (`fkdiff.levels.teacher_relative_energy`);
- `residual_by_bucket`: the distillation residual, its excess over an exactly conservative control, and the
  teacher's Jacobian asymmetry (the non-conservative part);
- `level_report`: every one that applies, for report.json.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fkdiff.diffusion import append_dims
from fkdiff.distillation.diagnostics import bucket_names, teacher_asymmetry
from fkdiff.distillation.loss import denoise
from fkdiff.levels import divergence_kind, teacher_relative_energy, teacher_time_score, time_score

__all__ = ["teacher_regions", "mode_offset_error_by_bucket", "time_score_error_by_bucket",
           "integrated_level_error_by_bucket", "residual_by_bucket", "level_report"]


def _log_uniform(n: int, lo: float, hi: float, generator: torch.Generator | None, like: Tensor) -> Tensor:
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp().to(like)


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
    out = {"bucket": bucket_names(edges), "offset_rms": [], "offset_span": []}
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
    div = divergence_kind(divergence, x0[0].numel())
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "rms": [], "rms_raw": [],
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
    div = divergence_kind(divergence, x0[0].numel())
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "rms": [],
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
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "residual": [],
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
                dt = denoise(teacher, x, sig, cb).to(x.dtype)
            ds = denoise(student, x, sig, cb).detach().to(x.dtype)
            res.append((ds - dt).flatten(1).pow(2).sum(1) / d)
            if control is not None:
                with torch.no_grad():
                    ct = denoise(control[1], x, sig, cb).to(x.dtype)
                cs = denoise(control[0], x, sig, cb).detach().to(x.dtype)
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
