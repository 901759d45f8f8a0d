"""Composition algebra (fkdiff.compose): energies and scores against closed forms from analytic teachers."""

import math

import pytest
import torch

from fkdiff import compose
from teachers.analytic import GaussianMixture, gmm_product
from teachers.presets import gaussian, ring8

SIGMAS = [0.002, 0.3, 2.0, 80.0]



class EnergyOnly:
    """Any object with just an energy (score by autograd inside fkdiff)."""

    def __init__(self, inner):
        self.inner = inner

    def energy(self, x, sigma):
        return self.inner.energy(x, sigma)


def _gmm_b():
    return GaussianMixture([[0.7, 0.7], [-1.0, 0.0]], torch.stack([0.3 * torch.eye(2), 0.2 * torch.eye(2)]).double(),
                           [0.3, 0.7])


def _x(gen, n=64, scale=1.5):
    return scale * torch.randn(n, 2, generator=gen, dtype=torch.float64)


def _autograd_score(target, x, sigma):
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(target.energy(xg, sigma).sum(), xg)
    return -g


@pytest.mark.parametrize("sigma", SIGMAS)
def test_product_matches_gmm_product(sigma, gen):
    a, b = ring8(radius=1.0, std=0.15), _gmm_b()
    prod = compose.product(a, b)
    r, log_z = gmm_product(a, b, sigma)  # q_a q_b = Z r  =>  E_prod = -log Z - log r
    x = _x(gen)
    assert torch.allclose(prod.energy(x, sigma), -log_z - r.log_prob(x, 1e-12), atol=1e-8)
    assert torch.allclose(prod.score(x, sigma), a.score(x, sigma) + b.score(x, sigma), atol=1e-12)
    # energy-only components: same energy, score by autograd
    prod2 = compose.product(EnergyOnly(a), EnergyOnly(b))
    assert torch.allclose(prod2.score(x, sigma), prod.score(x, sigma), atol=1e-8)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_mixture_is_the_concatenated_gmm(sigma, gen):
    a, b = ring8(radius=1.0, std=0.15), _gmm_b()
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    mix = compose.mixture(a, b, weights=[1.0, 3.0])  # normalised to [0.25, 0.75]
    exact = GaussianMixture(torch.cat([a.means, b.means]), torch.cat([a.covs, b.covs]),
                            torch.cat([w[0] * a.weights, w[1] * b.weights]))
    x = torch.cat([_x(gen), torch.tensor([[40.0, -35.0], [1e3, 1e3]], dtype=torch.float64)])  # far tails too
    assert torch.allclose(mix.energy(x, sigma), exact.energy(x, sigma), rtol=1e-10, atol=1e-8)
    s = mix.score(x, sigma)
    assert torch.isfinite(s).all()
    assert torch.allclose(s, exact.score(x, sigma), rtol=1e-8, atol=1e-8)
    # the score is the gradient of the energy (also for energy-only components)
    mix2 = compose.mixture(EnergyOnly(a), EnergyOnly(b), weights=[1.0, 3.0])
    assert torch.allclose(mix2.score(x[:64], sigma), _autograd_score(mix, x[:64], sigma), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_negation_tempered_conditional(sigma, gen):
    a, b, c = ring8(radius=1.0, std=0.15), _gmm_b(), gaussian([0.5, -0.5], 0.4)
    x = _x(gen)
    neg = compose.negation(a, b, alpha=0.5)
    assert torch.allclose(neg.energy(x, sigma), a.energy(x, sigma) - 0.5 * b.energy(x, sigma), atol=1e-12)
    assert torch.allclose(neg.score(x, sigma), _autograd_score(neg, x, sigma), atol=1e-8)
    tmp = compose.tempered(a, 2.5)
    assert torch.allclose(tmp.energy(x, sigma), 2.5 * a.energy(x, sigma), atol=1e-12)
    assert torch.allclose(tmp.score(x, sigma), 2.5 * a.score(x, sigma), atol=1e-12)
    # Du et al. eq. 13: E(x) + sum_i w_i (E(x|y_i) - E(x)); with one condition and w = 1 it is the conditional itself
    cond = compose.conditional(a, [b, c], weights=[1.0, 2.0])
    e = a.energy(x, sigma) + (b.energy(x, sigma) - a.energy(x, sigma)) + 2.0 * (c.energy(x, sigma) - a.energy(x, sigma))
    assert torch.allclose(cond.energy(x, sigma), e, atol=1e-10)
    assert torch.allclose(cond.score(x, sigma), _autograd_score(cond, x, sigma), atol=1e-8)
    one = compose.conditional(a, [b])
    assert torch.allclose(one.energy(x, sigma), b.energy(x, sigma), atol=1e-10)


def test_nesting_and_denoiser(gen):
    a, b, c = ring8(radius=1.0, std=0.15), _gmm_b(), gaussian([0.5, -0.5], 0.4)
    t = compose.mixture(compose.product(a, c), compose.negation(b, c, alpha=0.3), weights=[0.6, 0.4])
    x = _x(gen)
    sig = torch.full((64,), 0.7, dtype=torch.float64)  # sigma as a [B] tensor, as fkdiff.smc passes it
    assert torch.allclose(t.score(x, sig), _autograd_score(t, x, sig), rtol=1e-7, atol=1e-8)
    # denoiser D = x + sigma^2 score (Tweedie); for a single component it is the teacher's exact denoiser
    p = compose.product(a)
    assert torch.allclose(p(x, 0.7), a(x, 0.7), atol=1e-10)


def test_errors():
    a = ring8()
    with pytest.raises(ValueError):
        compose.mixture(a, a, weights=[1.0, -1.0])
    with pytest.raises(ValueError):
        compose.tempered(a, 0.0)
    with pytest.raises(ValueError):
        compose.product()
    with pytest.raises(TypeError):
        compose.product(a, object())
    with pytest.raises(ValueError):
        compose.conditional(a, [a], weights=[1.0, 2.0])
    # a score-only component: the score composes, the energy says why it cannot
    class ScoreOnly:
        def score(self, x, sigma):
            return a.score(x, sigma)

    p = compose.product(a, ScoreOnly())
    x = torch.zeros(3, 2, dtype=torch.float64)
    assert torch.allclose(p.score(x, 1.0), 2 * a.score(x, 1.0))
    with pytest.raises(TypeError, match="no energy"):
        p.energy(x, 1.0)
    assert math.isfinite(float(compose.mixture(a, weights=None).energy(x, 1.0)[0]))


def test_energy_and_score_is_one_pass_per_component():
    """SMC/MCMC evaluate (E, score) together: each component's network runs once, not once for E and again for
    the score (regression: the overhead benchmark measured 1.6-1.8x reverse diffusion before the fused path)."""
    from fkdiff import targets
    from teachers import columns_left, ring8

    class Counting:
        def __init__(self, t):
            self.t, self.calls = t, 0

        def energy(self, x, sigma):
            self.calls += 1
            return self.t.energy(x, sigma)

        def energy_and_grad(self, x, sigma):
            self.calls += 1
            return self.t.energy(x, sigma), -self.t.score(x, sigma)

    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.5
    for make in (compose.product, lambda a, b: compose.mixture(a, b, weights=[1, 2]),
                 lambda a, b: compose.negation(a, b, 0.5), lambda a, b: compose.conditional(a, [b], [0.7])):
        a, b = Counting(ring8()), Counting(columns_left())
        t = make(a, b)
        e, s = targets.energy_and_score(t, x, 0.2)
        assert (a.calls, b.calls) == (1, 1)
        torch.testing.assert_close(e, t.energy(x, 0.2))
        torch.testing.assert_close(s, t.score(x, 0.2))
    a = Counting(ring8())
    targets.energy_and_score(compose.tempered(a, 3.0), x, 0.2, max_batch=16)
    assert a.calls == 4  # one per chunk


def test_conditioned_binds_labels_and_vectors():
    """compose.conditioned(model, y): a class label is broadcast to `[B]` int64, a condition vector to `[B, c]`."""
    seen = []

    class Conditional:
        def energy(self, x, sigma, cond=None):
            seen.append(cond)
            return (x**2).sum(1) + cond.double().reshape(x.shape[0], -1).sum(1)

        def score(self, x, sigma, cond=None):
            seen.append(cond)
            return -2 * x

    x = torch.zeros(3, 2, dtype=torch.float64)
    lab = compose.conditioned(Conditional(), 4)
    assert torch.equal(lab.energy(x, 0.5), torch.full((3,), 4.0, dtype=torch.float64))
    assert seen[-1].dtype == torch.int64 and seen[-1].shape == (3,)
    vec = compose.conditioned(Conditional(), [0.25, 0.5])
    assert torch.equal(vec.energy(x, 0.5), torch.full((3,), 0.75, dtype=torch.float64))
    assert seen[-1].shape == (3, 2) and seen[-1].dtype == torch.float64
    # a bound model composes like any target
    p = compose.product(lab, vec)
    assert torch.equal(p.score(x + 1, 0.5), -4 * (x + 1))


def test_linear_operators_are_one_formula(gen):
    """Product, negation, temperature and conditioning are `Linear` with their coefficients; the one formula
    E = sum_j c_j E_j (score alike) holds for any coefficients."""
    a, b, c = ring8(radius=1.0, std=0.15), _gmm_b(), gaussian([0.5, -0.5], 0.4)
    assert compose.product(a, b, c).coefficients == (1.0, 1.0, 1.0)
    assert compose.negation(a, b, alpha=0.3).coefficients == (1.0, -0.3)
    assert compose.tempered(a, 2.5).coefficients == (2.5,)
    assert compose.conditional(a, [b, c], weights=[1.0, 2.0]).coefficients == (-2.0, 1.0, 2.0)
    lin = compose.Linear([a, b], [0.5, -2.0])
    x = _x(gen)
    for sigma in (0.05, 3.0):
        assert torch.allclose(lin.energy(x, sigma), 0.5 * a.energy(x, sigma) - 2.0 * b.energy(x, sigma), atol=1e-12)
        assert torch.allclose(lin.score(x, sigma), _autograd_score(lin, x, sigma), atol=1e-8)
        e, s = lin.energy_and_score(x, sigma)
        assert torch.equal(e, lin.energy(x, sigma)) and torch.equal(s, lin.score(x, sigma))
    with pytest.raises(ValueError, match="2 finite coefficients"):
        compose.Linear([a, b], [1.0])


def test_conditioned_denoiser_is_a_score_field():
    """A conditional *denoiser* (a teacher: D(x, sigma, cond), no energy) with its condition bound is a score field:
    score = (D - x) / sigma^2 with the condition passed through; neither it nor a composition of such has an energy,
    so samplers that need energies refuse it (has_energy False), while a composition with an energy student keeps
    its energy."""
    from fkdiff import targets
    from fkdiff.targets import has_energy

    class Denoiser:  # D(x, sigma, cond) = x / (1 + sigma^2) + cond: the denoiser of N(cond, I)
        def __call__(self, x, sigma, cond=None):
            s = sigma.reshape(-1, 1)
            return x / (1 + s**2) + cond * s**2 / (1 + s**2)

    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = compose.conditioned(Denoiser(), torch.tensor([1.0, -2.0], dtype=torch.float64))
    sig = torch.full((5,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(c.score(x, sig), -(x - torch.tensor([1.0, -2.0], dtype=torch.float64)) / (1 + 0.49))
    eq13 = compose.conditional(compose.conditioned(Denoiser(), torch.full((2,), 0.0, dtype=torch.float64)), [c, c])
    assert not has_energy(c) and not has_energy(eq13) and not has_energy(compose.product(c, c))
    torch.testing.assert_close(eq13.score(x, sig), (-x + 2 * torch.tensor([1.0, -2.0], dtype=torch.float64)) / 1.49)
    with pytest.raises(TypeError, match="has no energy"):
        targets.energy(eq13, x, 0.7)
    assert has_energy(compose.product(ring8(), ring8()))
