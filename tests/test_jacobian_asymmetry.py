"""The Hutchinson estimate of a Jacobian's asymmetry (fkdiff.distillation: jacobian_asymmetry,
denoiser_asymmetry_by_sigma) against exact Jacobians: linear maps with a known antisymmetric part, a row-dependent nonlinear map, and an energy
student, whose denoiser Jacobian is I - sigma^2 Hess E (symmetric). Tolerances: 4 Monte Carlo standard errors."""

import math

import torch

from fkdiff.distillation import denoiser_asymmetry_by_sigma, jacobian_asymmetry
from fkdiff.energy import build_student

D = 6


def _parts(gen, antisym_scale: float):
    s = torch.randn(D, D, generator=gen, dtype=torch.float64)
    k = torch.randn(D, D, generator=gen, dtype=torch.float64)
    return (s + s.T) / 2, antisym_scale * (k - k.T) / 2


def _se_of_mean_square(m: torch.Tensor, n: int) -> float:
    """Standard error of the mean of n draws of |M v|^2, v ~ N(0, I): var |M v|^2 = 2 |M^T M|_F^2."""
    return math.sqrt(2 * float((m.T @ m).pow(2).sum()) / n)


def test_linear_map_with_a_known_antisymmetric_part(gen):
    sym, anti = _parts(gen, 0.5)
    a = sym + anti
    x = torch.randn(3000, D, generator=gen, dtype=torch.float64)
    asym, scale = jacobian_asymmetry(lambda z: z @ a.T, x, gen, num_probes=2)
    n = 2 * x.shape[0]
    exact_asym = float((a - a.T).pow(2).sum())  # = 4 |K|_F^2
    assert abs(exact_asym - 4 * float(anti.pow(2).sum())) < 1e-9
    assert abs(asym.mean().item() - exact_asym) < 4 * _se_of_mean_square(a - a.T, n)
    assert abs(scale.mean().item() - float(a.pow(2).sum())) < 4 * _se_of_mean_square(a, n)
    # the symmetric part alone: zero up to round-off, at every row and probe
    asym0, scale0 = jacobian_asymmetry(lambda z: z @ sym.T, x, gen)
    assert (asym0 <= 1e-24 * scale0).all() and (scale0 > 0).all()


def test_row_dependent_nonlinear_map(gen):
    """fn(x) = tanh(x) A^T: J_b = A diag(sech^2 x_b), a different Jacobian on every row."""
    sym, anti = _parts(gen, 0.3)
    a = sym + anti
    x = torch.randn(3000, D, generator=gen, dtype=torch.float64)
    asym, scale = jacobian_asymmetry(lambda z: torch.tanh(z) @ a.T, x, gen)
    jac = a[None] * (1 - torch.tanh(x) ** 2)[:, None, :]  # [B, D, D]
    exact_asym = (jac - jac.transpose(1, 2)).pow(2).sum((1, 2))
    exact_scale = jac.pow(2).sum((1, 2))
    for est, exact in ((asym, exact_asym), (scale, exact_scale)):
        err = est - exact
        assert abs(err.mean().item()) < 4 * err.std().item() / math.sqrt(err.numel())
    # the estimator is not blind to the asymmetry: it sits well away from zero
    assert asym.mean().item() > 10 * exact_asym.std().item() / math.sqrt(x.shape[0])


def test_relative_asymmetry_per_sigma_of_a_linear_denoiser(gen):
    sym, anti = _parts(gen, 0.4)
    a = torch.eye(D, dtype=torch.float64) + 0.3 * (sym + anti)
    x0 = torch.randn(2000, D, generator=gen, dtype=torch.float64)
    sigmas = [0.1, 1.0, 10.0]
    res = denoiser_asymmetry_by_sigma(lambda x, s: x @ a.T, x0, sigmas, gen, max_batch=512)
    exact = math.sqrt(float((a - a.T).pow(2).sum()) / float(a.pow(2).sum()))
    assert res["sigma"] == sigmas and len(res["rel"]) == 3
    for rel, se in zip(res["rel"], res["rel_se"]):
        assert 0 < se < 0.1 * exact
        assert abs(rel - exact) < 4 * se


def test_energy_student_is_symmetric_and_a_plain_network_is_not(gen):
    """An energy student's denoiser x - sigma^2 grad E (called with create_graph) has a symmetric Jacobian: the
    estimate is round-off; an unconstrained network (the student's own backbone output as a denoiser) is not."""
    torch.manual_seed(0)
    student = build_student((D,), 1.0, "l2", backbone={"kind": "mlp"}).double().eval()
    x0 = torch.randn(256, D, generator=gen, dtype=torch.float64)
    sigmas = [0.05, 0.5, 5.0]
    res = denoiser_asymmetry_by_sigma(student, x0, sigmas, gen)
    assert max(res["rel"]) < 1e-10 and min(res["jac_fro2"]) > 0
    net = student.f  # f(u, c_noise): a plain vector field, no gradient structure

    def plain(x, s):
        return net(x, torch.log(s) / 4)

    res = denoiser_asymmetry_by_sigma(plain, x0, sigmas, gen)
    assert min(r - 4 * se for r, se in zip(res["rel"], res["rel_se"])) > 0.05
