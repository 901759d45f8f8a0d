"""EDM conventions (fkdiff.diffusion): schedule, training sigma, loss weight, preconditioning, conversions, shape checks."""

from __future__ import annotations

import math

import pytest
import torch

from fkdiff import diffusion as D

F64 = torch.float64


# ------------------------------------------------------------------------------------------------ schedule


@pytest.mark.parametrize("n,smin,smax,rho", [(18, 0.002, 80.0, 7.0), (5, 0.01, 10.0, 3.0), (2, 0.5, 1.0, 7.0)])
def test_sigma_schedule_formula_and_endpoints(n, smin, smax, rho):
    s = D.sigma_schedule(n, smin, smax, rho=rho)
    assert s.dtype == F64 and s.shape == (n,)
    assert s[0].item() == smax and s[-1].item() == smin  # exact end points
    assert (s[1:] < s[:-1]).all()  # strictly decreasing
    # Karras et al. eq. 5, written independently in Python floats
    ref = [(smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(n)]
    assert torch.allclose(s, torch.tensor(ref, dtype=F64), rtol=1e-13, atol=0)
    # rho-th roots are equally spaced
    r = s ** (1 / rho)
    assert torch.allclose(r.diff(), r.diff()[:1].expand(n - 1), rtol=1e-10)


def test_sigma_schedule_append_zero_and_options():
    s = D.sigma_schedule(10, 0.002, 80.0, append_zero=True)
    assert s.shape == (11,) and s[-1].item() == 0.0 and s[-2].item() == 0.002
    assert torch.equal(s[:-1], D.sigma_schedule(10, 0.002, 80.0))
    assert D.sigma_schedule(1, 0.1, 3.0).tolist() == [3.0]
    assert D.sigma_schedule(4, 0.1, 3.0, dtype=torch.float32).dtype == torch.float32
    # rho = 1 is the linear schedule
    assert torch.allclose(D.sigma_schedule(5, 1.0, 5.0, rho=1.0), torch.tensor([5.0, 4, 3, 2, 1], dtype=F64))
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        D.sigma_schedule(0, 0.1, 1.0)
    with pytest.raises(ValueError, match="0 < sigma_min <= sigma_max"):
        D.sigma_schedule(5, 2.0, 1.0)
    with pytest.raises(ValueError, match="0 < sigma_min <= sigma_max"):
        D.sigma_schedule(5, 0.0, 1.0)


def test_training_sigma_is_log_normal(gen):
    # ln sigma ~ N(P_mean, P_std^2): the sample mean of ln sigma has standard error P_std / sqrt(n), the sample
    # std has standard error ~ P_std / sqrt(2 n); allow 5 of each
    n, pm, ps = 40000, -1.2, 1.2
    s = D.sample_training_sigma(n, pm, ps, generator=gen, dtype=F64)
    assert s.shape == (n,) and (s > 0).all() and s.dtype == F64
    ls = s.log()
    assert abs(ls.mean().item() - pm) < 5 * ps / math.sqrt(n)
    assert abs(ls.std().item() - ps) < 5 * ps / math.sqrt(2 * n)
    again = D.sample_training_sigma(n, pm, ps, generator=torch.Generator().manual_seed(1234), dtype=F64)
    assert torch.equal(again, s)


# ------------------------------------------------------------------------------------------------ preconditioning


def test_edm_precond_identities():
    sigma = torch.logspace(-3, 2, 41, dtype=F64)
    for sd in (0.5, 1.0, 2.3):
        c = D.edm_precond(sigma, sd)
        s2 = sigma**2 + sd**2
        # input at unit variance: Var(c_in x_sigma) = c_in^2 (sd^2 + sigma^2) = 1
        assert torch.allclose(c.c_in**2 * s2, torch.ones_like(sigma), rtol=1e-14)
        # c_skip is the optimal linear denoiser of data with variance sd^2; c_out^2 its posterior variance
        assert torch.allclose(c.c_skip, sd**2 / s2, rtol=1e-14)
        assert torch.allclose(c.c_out**2, sigma**2 * sd**2 / s2, rtol=1e-13)
        assert torch.allclose(c.c_out**2, c.c_skip * sigma**2, rtol=1e-13)
        assert torch.allclose(c.c_out, sigma * sd * c.c_in, rtol=1e-14)
        assert torch.allclose(c.c_noise, sigma.log() / 4, rtol=1e-14)
        # EDM loss weight is 1 / c_out^2 (unit effective target variance)
        assert torch.allclose(D.edm_loss_weight(sigma, sd) * c.c_out**2, torch.ones_like(sigma), rtol=1e-13)
    # limits: identity at sigma -> 0, zero skip at sigma -> inf
    c = D.edm_precond(torch.tensor([1e-8, 1e8], dtype=F64), 0.5)
    assert abs(c.c_skip[0].item() - 1) < 1e-12 and c.c_skip[1].item() < 1e-12


def test_precond_with_zero_network_is_the_gaussian_posterior_mean():
    # with F = 0 the EDM denoiser is c_skip x, the exact E[x0 | x] of x0 ~ N(0, sd^2 I): compare with the
    # analytic Gaussian teacher and with Tweedie on the closed-form score -x / (sd^2 + sigma^2)
    from teachers import gaussian

    sd = 0.7
    g = gaussian([0.0, 0.0, 0.0], sd**2, dtype=F64)
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.logspace(-2, 1.5, 16, dtype=F64)
    c = D.edm_precond(sigma, sd)
    d0 = D.append_dims(c.c_skip, 2) * x
    assert torch.allclose(d0, g(x, sigma), rtol=1e-12, atol=1e-14)
    score = -x / D.append_dims(sd**2 + sigma**2, 2)
    assert torch.allclose(d0, D.denoiser_from_score(score, x, sigma), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------ conversions


def test_conversions_round_trip_and_agree(gen):
    x = torch.randn(8, 3, 4, 4, dtype=F64, generator=gen)
    den = torch.randn(8, 3, 4, 4, dtype=F64, generator=gen)
    sigma = torch.logspace(-3, 2, 8, dtype=F64)
    sb = sigma[:, None, None, None]
    score = D.score_from_denoiser(den, x, sigma)
    assert torch.allclose(score, (den - x) / sb**2, rtol=1e-14)
    assert torch.allclose(D.denoiser_from_score(score, x, sigma), den, rtol=1e-12, atol=1e-12)
    eps = D.eps_from_denoiser(den, x, sigma)
    assert torch.allclose(eps, -sb * score, rtol=1e-12)  # eps = -sigma * score
    assert torch.allclose(D.denoiser_from_eps(eps, x, sigma), den, rtol=1e-12, atol=1e-12)
    # probability-flow ODE: dx/dsigma = -sigma * score = eps (Karras et al. eq. 4 with s = 1, sigma(t) = t)
    assert torch.allclose(D.ode_derivative(x, den, sigma), -sb * score, rtol=1e-12)
    # a float sigma broadcasts to the batch
    assert torch.allclose(D.score_from_denoiser(den, x, 0.3), (den - x) / 0.09, rtol=1e-14)


def test_ode_derivative_transports_gaussian_exactly():
    # for x0 ~ N(0, sd^2), the PF-ODE x(sigma) = x(s1) * sqrt((sd^2 + sigma^2) / (sd^2 + s1^2)); Heun with the exact
    # denoiser reproduces it to second order (a broken ode_derivative sign or scale would not)
    sd = 1.0
    x = torch.tensor([[1.3], [-0.4]], dtype=F64)
    s = D.sigma_schedule(200, 0.05, 5.0)
    y = x.clone()
    for s0, s1 in zip(s[:-1], s[1:]):
        den0 = D.edm_precond(s0.reshape(1), sd).c_skip * y
        d0 = D.ode_derivative(y, den0, float(s0))
        y_e = y + (s1 - s0) * d0
        den1 = D.edm_precond(s1.reshape(1), sd).c_skip * y_e
        y = y + (s1 - s0) * 0.5 * (d0 + D.ode_derivative(y_e, den1, float(s1)))
    ref = x * math.sqrt((sd**2 + 0.05**2) / (sd**2 + 25.0))
    assert torch.allclose(y, ref, rtol=1e-4)  # Heun: O(h^2) global error, ~2e-5 here


def test_vp_sigma_alpha_bar_round_trip():
    abar = torch.linspace(1e-4, 0.9999, 101, dtype=F64)
    sig = D.vp_sigma_from_alpha_bar(abar)
    assert torch.allclose(D.vp_alpha_bar_from_sigma(sig), abar, rtol=1e-12)
    assert torch.allclose(sig, ((1 - abar) / abar).sqrt(), rtol=1e-14)
    assert (sig.diff() < 0).all()  # more signal, less noise


def test_log_normal_pdf_isotropic_matches_torch_distributions(gen):
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    mean = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    var = torch.tensor([0.1, 0.5, 1.0, 2.0, 9.0], dtype=F64)
    got = D.log_normal_pdf_isotropic(x, mean, var)
    ref = torch.distributions.Normal(mean, var.sqrt()[:, None, None]).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(got, ref, rtol=1e-13)
    assert torch.allclose(D.log_normal_pdf_isotropic(x, 0.0, 2.0),
                          torch.distributions.Normal(torch.zeros((), dtype=F64), torch.tensor(2.0, dtype=F64).sqrt()).log_prob(x).flatten(1).sum(1), rtol=1e-13)


# ------------------------------------------------------------------------------------------------ shape/dtype checks


def test_as_sigma_forms_and_errors():
    x = torch.zeros(4, 2, dtype=F64)
    assert D.as_sigma(0.1, x).tolist() == [0.1] * 4  # exact in float64: no float32 rounding on the way
    assert D.as_sigma(0.1, x).dtype == F64
    assert D.as_sigma(torch.tensor(0.5), x).shape == (4,)
    assert D.as_sigma(torch.tensor([0.5]), x).shape == (4,)
    s = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert torch.equal(D.as_sigma(s, x), s.to(F64))
    with pytest.raises(ValueError, match="sigma must be > 0"):
        D.as_sigma(0.0, x)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        D.as_sigma(torch.tensor([0.1, -0.2, 0.3, 0.4]), x)
    with pytest.raises(ValueError, match=r"\[B\]=4"):
        D.as_sigma(torch.ones(3), x)
    with pytest.raises(ValueError, match=r"\[B\]=4"):
        D.as_sigma(torch.ones(4, 1), x)
    with pytest.raises(ValueError, match="finite"):
        D.as_sigma(float("nan"), x)
    with pytest.raises(ValueError, match="finite"):
        D.as_sigma(torch.tensor([0.1, float("inf"), 0.3, 0.4]), x)


def test_sigma_is_validated_once_where_it_enters(monkeypatch):
    """One energy_and_score of a product of two energy students validated sigma 6 times (each a host sync on a
    GPU): now once, where the user's value enters; a whole SMC run validates its levels once up front (noise_levels)
    and never per evaluation. A bad sigma is still refused at every public entry."""
    from fkdiff import compose, smc, targets
    from fkdiff.energy import build_student
    from fkdiff.mcmc import HMC

    calls = []
    check = D.check_sigma
    monkeypatch.setattr(D, "check_sigma", lambda s: (calls.append(tuple(s.shape)), check(s))[1])
    torch.manual_seed(0)
    a, b = (build_student((2,), 0.5, "l2", backbone={"kind": "mlp", "width": 16, "num_blocks": 1}) for _ in range(2))
    prod = compose.product(a, b)
    x = torch.randn(8, 2, dtype=F64)
    e, sc = targets.energy_and_score(prod, x, 0.3)
    assert len(calls) == 1 and e.shape == (8,) and sc.shape == (8, 2)
    calls.clear()
    targets.energy_and_score(prod, x, 0.3, max_batch=3)  # chunks of a checked sigma stay checked
    assert len(calls) == 1
    calls.clear()
    smc.sample(prod, 16, shape=(2,), num_levels=4, sigma_max=5.0, sigma_min=0.01, mcmc=HMC(1, 2),
               generator=torch.Generator().manual_seed(0))
    assert calls == []
    # the values are what a separately validated call gives
    torch.testing.assert_close(e, a.energy(x, 0.3).double() + b.energy(x, 0.3).double())
    for bad in (-0.3, float("nan")):
        with pytest.raises(ValueError, match="sigma must be"):
            prod.energy(x, bad)
        with pytest.raises(ValueError, match="sigma must be"):
            a.energy(x, torch.full((8,), bad))
        with pytest.raises(ValueError, match="sigma must be"):
            targets.energy_and_score(prod, x, bad)


def test_check_batch_and_append_dims_errors():
    D.check_batch(torch.zeros(3, 2), 1)
    D.check_batch(torch.zeros(3, 1, 4, 4), 3)
    with pytest.raises(TypeError, match="floating-point"):
        D.check_batch(torch.zeros(3, 2, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        D.check_batch([[0.0, 1.0]], 1)
    with pytest.raises(ValueError, match="1 event dim"):
        D.check_batch(torch.zeros(3, 2, 2), 1)
    with pytest.raises(ValueError, match="batch dimension"):
        D.check_batch(torch.tensor(1.0))
    t = torch.arange(3.0)
    assert D.append_dims(t, 4).shape == (3, 1, 1, 1)
    assert D.append_dims(torch.tensor(2.0), 2).shape == (1, 1)
    with pytest.raises(ValueError, match="more than the target"):
        D.append_dims(torch.zeros(2, 3, 4), 2)
    # conversions refuse mismatched sigma lengths
    with pytest.raises(ValueError, match=r"\[B\]=2"):
        D.score_from_denoiser(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
