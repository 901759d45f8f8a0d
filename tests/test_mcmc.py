"""MCMC kernels (fkdiff.mcmc): invariance judged by Monte Carlo standard error, per-particle accept, adaptation,
NaN/-inf safety, and the documented bias of the unadjusted kernels.

How the tolerances are derived. Every test starts N particles from *exact, independent* draws of the target and
runs the kernel; if the kernel leaves the target invariant, each particle is still an exact draw (the chains share
only the population step size, a median over N particles, whose dependence on any one particle is O(1/N)). So for
any per-particle statistic f, the population mean is an average of N i.i.d. values: one value per chain, no
autocorrelation to correct for, and its standard error is sd(f)/sqrt(N), estimated from the particles themselves.
We require |z| = |mean f - E f| / (sd f / sqrt N) < Z_TOL = 4.0: P(|z| > 4) = 6.3e-5 per statistic under the null,
so the ~120 statistics in this file produce a false alarm with probability < 1% (seeds are fixed anyway).
The same statistics *fail* on a broken kernel: `test_ula_bias_...` shows that the unadjusted kernel at the step size
the adjusted one uses is rejected with |z| far above the tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from fkdiff import mcmc
from teachers.analytic import GaussianMixture

Z_TOL = 4.0
N = 4000

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
SIGMA = torch.tensor([[1.0, 0.3], [0.3, 0.16]], dtype=torch.float64)  # anisotropic: eigenvalues 0.064 and 1.096


def gaussian_logdensity(mu=MU, cov=SIGMA):
    prec = torch.linalg.inv(cov)

    def fn(x):
        d = x - mu.to(x)
        pd = d @ prec.to(x)
        return -0.5 * (d * pd).sum(1).double(), -pd

    return fn


def gaussian_sample(n, gen, mu=MU, cov=SIGMA):
    return mu + torch.randn(n, mu.numel(), generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T


def gaussian_stats(x, mu=MU, cov=SIGMA):
    """Per-particle statistics `[N, 5]` and their exact expectations: centred coordinates and second moments."""
    d = x - mu
    stats = torch.stack([d[:, 0], d[:, 1], d[:, 0] ** 2, d[:, 0] * d[:, 1], d[:, 1] ** 2], 1)
    truth = torch.tensor([0.0, 0.0, cov[0, 0], cov[0, 1], cov[1, 1]], dtype=torch.float64)
    return stats, truth


SMOOTH = 0.05  # the GMM is evaluated at this noise level, its law is gmm.smoothed(SMOOTH)


def make_gmm():
    means = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.2]]
    covs = [[[0.09, 0.0], [0.0, 0.09]], [[0.2, 0.05], [0.05, 0.1]], [[0.06, 0.0], [0.0, 0.06]]]
    return GaussianMixture(means, covs, [0.5, 0.3, 0.2])


def gmm_stats(x, law: GaussianMixture):
    """Coordinates, centred second moments and component responsibilities r_k(x); E r_k = w_k exactly."""
    mu, cov = law.mean(), law.covariance()
    d = x - mu
    r = law.component_probs(x, 1e-8)  # responsibilities under `law` itself (sigma -> 0 adds 1e-16 to covs)
    stats = torch.cat([d, torch.stack([d[:, 0] ** 2, d[:, 0] * d[:, 1], d[:, 1] ** 2], 1), r], 1)
    truth = torch.cat([torch.zeros(2, dtype=torch.float64), torch.stack([cov[0, 0], cov[0, 1], cov[1, 1]]),
                       law.weights])
    return stats, truth


def zscores(stats, truth):
    n = stats.shape[0]
    return (stats.mean(0) - truth) / (stats.std(0) / math.sqrt(n))


KERNELS = {
    "hmc": lambda: mcmc.HMC(),
    "hmc_5steps_damping0": lambda: mcmc.HMC(num_steps=5, damping=0.0),
    "hmc_5steps_damping0.9": lambda: mcmc.HMC(num_steps=5, damping=0.9),
    # fixed step with frequent rejections and strong damping: this one catches a missing momentum flip on rejection
    # (alg. 3), which shifts the Gaussian's second moments by ~19 standard errors
    "hmc_10steps_damping0.95_fixed": lambda: mcmc.HMC(num_steps=10, damping=0.95, step_size=0.45),
    "hmc_L1": lambda: mcmc.HMC(num_leapfrog=1, num_steps=2),
    "mala": lambda: mcmc.MALA(),
    "mala_3steps": lambda: mcmc.MALA(num_steps=3),
    "rwm_3steps": lambda: mcmc.RWM(num_steps=3),
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_invariance_anisotropic_gaussian(name, gen):
    kernel = KERNELS[name]()
    x0 = gaussian_sample(N, gen)
    x, state, infos = mcmc.run(kernel, x0, gaussian_logdensity(), num_iters=8, generator=gen)
    z = zscores(*gaussian_stats(x))
    assert z.abs().max() < Z_TOL, f"{name}: z-scores {z.tolist()}"
    # the chains moved (an identity "kernel" would pass the moment checks trivially)
    assert (x != x0).any(1).double().mean() > 0.9
    acc = torch.tensor([i.mean_acceptance for i in infos])
    assert 0.2 < acc.mean() < 1.0
    assert torch.isfinite(x).all() and not x.requires_grad


@pytest.mark.parametrize("name", list(KERNELS))
def test_invariance_gmm(name, gen):
    gmm = make_gmm()
    law = gmm.smoothed(SMOOTH)
    kernel = KERNELS[name]()
    x0 = law.sample(N, gen)
    f = mcmc.target_logdensity(gmm, SMOOTH)
    x, state, infos = mcmc.run(kernel, x0, f, num_iters=8, generator=gen)
    z = zscores(*gmm_stats(x, law))
    assert z.abs().max() < Z_TOL, f"{name}: z-scores {z.tolist()}"
    assert (x != x0).any(1).double().mean() > 0.9


def quartic_logdensity(x):
    """logp = -|x|^2/2 - |x|^4/4: near-Gaussian in the bulk, stiff far out (gradient ~ |x|^3)."""
    r2 = (x**2).sum(1, keepdim=True)
    return (-0.5 * r2 - 0.25 * r2**2)[:, 0].double(), -(1 + r2) * x


@pytest.mark.parametrize("cls", [mcmc.HMC, mcmc.MALA])
def test_per_particle_accept_and_median_step(cls, gen):
    """A particle far out in a stiff tail is rejected (its explicit step overshoots by orders of magnitude) while
    the others accept; the population step size ignores it (median, not mean, of the squared gradients)."""
    f = quartic_logdensity
    x0 = 0.6 * torch.randn(1000, 2, generator=gen, dtype=torch.float64)
    kernel = cls()
    _, _, info_clean = kernel(x0, f, generator=gen, state=kernel.init_state())
    x0[0] = torch.tensor([8.0, -8.0], dtype=torch.float64)
    x, _, info = kernel(x0, f, generator=gen, state=kernel.init_state())
    assert info.acceptance[0] < 1e-6
    assert torch.equal(x[0], x0[0])
    assert info.acceptance[1:].mean() > 0.6
    assert (x[1:] != x0[1:]).any(1).double().mean() > 0.6
    assert torch.isfinite(x).all()
    assert abs(info.step_size / info_clean.step_size - 1) < 0.02
    # a mean over particles would have let the one far particle (|grad|^2 ~ 1e6) set everyone's step
    mean_scale = 1 / math.sqrt(float(f(x0)[1].pow(2).mean()))
    assert mean_scale < 0.2 * mcmc.population_scale(f(x0)[1])


def truncated_logdensity(cut, bad):
    """Standard 2D normal restricted to x_0 < cut; outside: logp = -inf (grad finite) or NaN (grad NaN)."""

    def fn(x):
        out = x[:, 0] > cut
        logp = -0.5 * (x**2).sum(1).double()
        grad = -x.clone()
        if bad == "-inf":
            logp = torch.where(out, torch.full_like(logp, -math.inf), logp)
        else:
            logp = torch.where(out, torch.full_like(logp, math.nan), logp)
            grad[out] = math.nan
        return logp, grad

    return fn


@pytest.mark.parametrize("bad", ["-inf", "nan"])
@pytest.mark.parametrize("cls", [mcmc.HMC, mcmc.MALA, mcmc.ULA, mcmc.UHMC, mcmc.RWM])
def test_nonfinite_proposals_rejected(cls, bad, gen):
    cut = 0.3
    x0 = torch.randn(3 * N, 2, generator=gen, dtype=torch.float64)
    x0 = x0[x0[:, 0] <= cut][:N]
    kernel = cls(step_size=0.8)  # large steps: many proposals land outside
    x, _, infos = mcmc.run(kernel, x0, truncated_logdensity(cut, bad), num_iters=6, generator=gen)
    assert torch.isfinite(x).all()
    assert (x[:, 0] <= cut).all()
    assert sum(i.num_nonfinite for i in infos) > 0.05 * N
    assert all(torch.isfinite(i.logp).all() and torch.isfinite(i.grad).all() for i in infos)
    if kernel.adjusted:
        # E[X | X <= a] = -phi(a) / Phi(a) for a standard normal; second coordinate untouched N(0, 1)
        a = torch.tensor(cut, dtype=torch.float64)
        trunc_mean = -torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi) / torch.special.ndtr(a)
        stats = torch.stack([x[:, 0], x[:, 1], x[:, 1] ** 2], 1)
        z = zscores(stats, torch.stack([trunc_mean, torch.tensor(0.0, dtype=torch.float64),
                                        torch.tensor(1.0, dtype=torch.float64)]))
        assert z.abs().max() < Z_TOL, z.tolist()


def test_nonfinite_current_state_is_left(gen):
    """A particle currently at logp = -inf accepts any finite proposal (ratio +inf), never produces NaN."""
    f = gaussian_logdensity(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    x0 = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    logp, grad = f(x0)
    logp[:10] = -math.inf
    x, _, info = mcmc.MALA(step_size=0.5)(x0, f, generator=gen, state=mcmc.MALA().init_state(), logp=logp, grad=grad)
    assert (info.acceptance[:10] == 1).all()
    assert torch.isfinite(info.logp).all()


@pytest.mark.parametrize("cls,init", [(mcmc.MALA, 0.02), (mcmc.MALA, 20.0), (mcmc.HMC, 0.02), (mcmc.HMC, 20.0),
                                      (mcmc.RWM, 0.02), (mcmc.RWM, 20.0)])
def test_adaptation_converges_to_target(cls, init, gen):
    """log c <- log c + gain (acc - target): from a step 25x too small or 40x too large the acceptance reaches the
    target. On a 2D GMM the HMC acceptance is not monotone in the step size (leapfrog resonances), hence the wider
    band for HMC; the mean over the last 15 calls is judged."""
    gmm = make_gmm()
    law = gmm.smoothed(SMOOTH)
    kernel = cls(init_scale=init)
    x0 = law.sample(2000, gen)
    x, state, infos = mcmc.run(kernel, x0, mcmc.target_logdensity(gmm, SMOOTH), num_iters=45, generator=gen)
    acc = sum(i.mean_acceptance for i in infos[-15:]) / 15
    tol = 0.05 if cls is mcmc.MALA else 0.1
    assert abs(acc - kernel.target_accept) < tol, (acc, [round(i.mean_acceptance, 2) for i in infos])
    assert state.num_calls == 45
    assert state.step_size == infos[-1].step_size
    # and without adaptation the scale stays where it was
    _, state_fixed, infos_fixed = mcmc.run(kernel, x0, mcmc.target_logdensity(gmm, SMOOTH), num_iters=3,
                                           generator=gen, adapt=False)
    assert state_fixed.log_scale == kernel.init_state().log_scale


def test_fixed_step_size_is_not_adapted(gen):
    f = gaussian_logdensity()
    kernel = mcmc.HMC(step_size=0.123)
    x, state, info = kernel(gaussian_sample(100, gen), f, generator=gen, state=kernel.init_state())
    assert info.step_size == 0.123 and state.log_scale == kernel.init_state().log_scale
    assert kernel.adjusted and not mcmc.ULA().adjusted and not mcmc.UHMC().adjusted and mcmc.MALA().adjusted


def test_damping_keeps_momentum(gen):
    """Partial refresh (alg. 3): with damping 0.9 the momentum persists across steps, so at a small step the particles
    travel ballistically (displacement ~ K eps) instead of diffusively (~ sqrt(K) eps)."""
    mu, cov = torch.zeros(2, dtype=torch.float64), 25 * torch.eye(2, dtype=torch.float64)
    f = gaussian_logdensity(mu, cov)
    x0 = gaussian_sample(2000, gen, mu, cov)
    msd = {}
    for damping in (0.0, 0.9):
        kernel = mcmc.HMC(num_steps=10, num_leapfrog=1, step_size=0.1, damping=damping)
        x, _, info = kernel(x0, f, generator=gen, state=kernel.init_state())
        assert info.acceptance.mean() > 0.99
        msd[damping] = float(((x - x0) ** 2).sum(1).mean())
    assert msd[0.9] > 3 * msd[0.0], msd


def test_num_evals_counted_and_reused(gen):
    calls = []
    base = gaussian_logdensity()

    def f(x):
        calls.append(x.shape[0])
        return base(x)

    x0 = gaussian_sample(50, gen)
    kernel = mcmc.HMC(num_steps=2, num_leapfrog=3)
    _, _, info = kernel(x0, f, generator=gen, state=kernel.init_state())
    assert info.num_evals == 7 == len(calls)
    calls.clear()
    logp, grad = base(x0)
    _, _, info = kernel(x0, f, generator=gen, state=kernel.init_state(), logp=logp, grad=grad)
    assert info.num_evals == 6 == len(calls)
    calls.clear()
    x, _, infos = mcmc.run(mcmc.MALA(num_steps=2), x0, f, num_iters=3, generator=gen)
    assert len(calls) == 1 + 3 * 2 == sum(i.num_evals for i in infos)


def test_deterministic_and_independent_of_max_batch():
    gmm = make_gmm()
    x0 = gmm.sample(300, torch.Generator().manual_seed(0))
    out = []
    for max_batch in (None, 64):
        g = torch.Generator().manual_seed(5)
        f = mcmc.target_logdensity(gmm, 0.1, max_batch=max_batch)
        x, state, _ = mcmc.run(mcmc.HMC(num_steps=2), x0, f, num_iters=3, generator=g)
        out.append((x, state))
    assert torch.equal(out[0][0], out[1][0]) and out[0][1] == out[1][1]


def test_ula_bias_documents_the_unadjusted_flag(gen):
    """ULA on N(0, s^2 I) is the AR(1) x' = (1 - eps^2 / (2 s^2)) x + eps z, whose stationary variance is
    s^2 / (1 - eps^2 / (4 s^2)) != s^2: at eps = s that is 4/3 s^2. The test reproduces that exact bias, and shows
    that the invariance statistics used above reject it by far, while MALA at the same step stays unbiased."""
    s = 1.0
    eps = 1.0
    mu, cov = torch.zeros(2, dtype=torch.float64), s**2 * torch.eye(2, dtype=torch.float64)
    f = gaussian_logdensity(mu, cov)
    x0 = gaussian_sample(N, gen, mu, cov)
    x_ula, _, infos = mcmc.run(mcmc.ULA(step_size=eps), x0, f, num_iters=30, generator=gen)
    assert all(i.acceptance.eq(1).all() for i in infos)  # unadjusted: acceptance reported as 1
    assert infos[-1].mh_acceptance.mean() < 0.9  # ...while MALA would have rejected part of the moves
    sq = x_ula**2  # [N, 2]; E = 4/3 under ULA's stationary law (AR coefficient 1/2: converged after 30 steps)
    stat = torch.cat([sq[:, 0], sq[:, 1]])[:, None]
    # the two coordinates of a particle are independent under both laws, so 2N i.i.d. values
    z_biased = zscores(stat, torch.tensor([s**2 / (1 - eps**2 / (4 * s**2))], dtype=torch.float64))
    z_exact = zscores(stat, torch.tensor([s**2], dtype=torch.float64))
    assert z_biased.abs().max() < Z_TOL
    assert z_exact.abs().max() > 3 * Z_TOL
    x_mala, _, _ = mcmc.run(mcmc.MALA(step_size=eps), x0, f, num_iters=30, generator=gen)
    assert zscores(*gaussian_stats(x_mala, mu, cov)).abs().max() < Z_TOL
    # U-HMC at a large step is biased too (no closed form quoted: the check is that the invariance test rejects it)
    x_uhmc, _, _ = mcmc.run(mcmc.UHMC(step_size=1.2), x0, f, num_iters=20, generator=gen)
    assert zscores(*gaussian_stats(x_uhmc, mu, cov)).abs().max() > 2 * Z_TOL


def test_unadjusted_at_adjusted_step_fails_invariance(gen):
    """Power check of the invariance test itself: the same statistics on the anisotropic Gaussian reject ULA run at
    the (adapted) step size MALA uses there."""
    f = gaussian_logdensity()
    x0 = gaussian_sample(N, gen)
    _, state, _ = mcmc.run(mcmc.MALA(), x0, f, num_iters=20, generator=gen)
    eps = state.step_size
    x, _, _ = mcmc.run(mcmc.ULA(step_size=eps), x0, f, num_iters=30, generator=gen)
    assert zscores(*gaussian_stats(x)).abs().max() > 2 * Z_TOL


def test_validation():
    with pytest.raises(ValueError):
        mcmc.HMC(num_steps=0)
    with pytest.raises(ValueError):
        mcmc.HMC(damping=1.0)
    with pytest.raises(ValueError):
        mcmc.MALA(step_size=-1.0)
    with pytest.raises(ValueError):
        mcmc.MALA(target_accept=1.5)
    # the public signature HMC(num_steps, num_leapfrog, step_size=None, ...): the first two positional, rest keyword
    assert (mcmc.HMC(2, 5).num_steps, mcmc.HMC(2, 5).num_leapfrog) == (2, 5)
    assert mcmc.HMC().target_accept == 0.7  # Du et al. appendix C.2
    with pytest.raises(TypeError):
        mcmc.HMC(1, 3, 0.1)


def test_kernel_is_a_pure_move_and_the_adapter_reduces_over_the_population(gen):
    """The blackjax split: `kernel.step(chain, logdensity_fn, step_size, generator)` is a pure move (same inputs, same
    output; no adaptation state), and `StepSizeAdapter` picks the step from every row its `gather` returns (here a
    population whose other shard has 100x the gradients) and adapts from the whole population's acceptance."""
    f = gaussian_logdensity()
    kernel = mcmc.MALA()
    chain = kernel.init(gaussian_sample(300, gen), f)
    assert isinstance(chain, mcmc.ChainState) and chain.logp.shape == (300,) and chain.grad.shape == (300, 2)
    out = [kernel.step(chain, f, 0.3, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(out[0][0].x, out[1][0].x) and isinstance(out[0][1], mcmc.MoveInfo)
    assert out[0][1].num_evals == 1 and out[0][1].acceptance.shape == (300,)

    other = [None, None]  # the rows "held by another process": mean squared gradients, then acceptances

    def gather(t):
        other_rows = 1e4 * t if other[0] is None else torch.zeros_like(t)  # first call: msg; second: acceptance
        other[0] = other_rows
        return torch.cat([t, other_rows])

    state = kernel.init_state()
    x, new_state, info = mcmc.StepSizeAdapter(kernel, gather)(chain.x, f, generator=gen, state=state,
                                                              logp=chain.logp, grad=chain.grad)
    msg = chain.grad.double().pow(2).mean(1)
    expect = math.exp(state.log_scale) * mcmc.scale_from_mean_squared_grad(torch.cat([msg, 1e4 * msg]))
    assert info.step_size == pytest.approx(expect, rel=1e-12)
    assert info.step_size < 0.5 * math.exp(state.log_scale) * mcmc.population_scale(chain.grad)
    # adaptation from the mean over both shards (the other shard accepted nothing)
    assert new_state.acceptance == pytest.approx(float(info.mh_acceptance.mean()) / 2, rel=1e-12)
    assert new_state.log_scale == pytest.approx(state.log_scale + kernel.adapt_gain * (new_state.acceptance -
                                                                                        kernel.target_accept))
    # a kernel called directly is the adapter over the rows given
    x1, s1, i1 = kernel(chain.x, f, generator=torch.Generator().manual_seed(3), state=state)
    x2, s2, i2 = mcmc.StepSizeAdapter(kernel)(chain.x, f, generator=torch.Generator().manual_seed(3), state=state)
    assert torch.equal(x1, x2) and s1 == s2 and i1.step_size == i2.step_size
