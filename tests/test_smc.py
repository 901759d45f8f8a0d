"""Feynman–Kac SMC (fkdiff.smc) against closed-form and grid-exact answers on 2D analytic targets.

Tolerances. For a mode mass p estimated from N weighted SMC particles the i.i.d. standard error is
sqrt(p (1 - p) / N); SMC particles are correlated through resampling and weights (mass moves between separated modes
only through weights and shared ancestry), which inflates the variance by a factor we bound by INFLATION = 8: the
measured mean ratio of the squared mode-mass error to p (1 - p) / N over 10 seeds was 0.6 (twisted, exact proposal)
to 6.7 (tempered) for the configurations below (`test_calibration`, marked slow, re-measures it). Bounds are Z_TOL = 4.5 standard errors of that inflated variance, i.e.
|error| <= 4.5 * sqrt(INFLATION * p (1 - p) / N) (per-check false-alarm probability < 1e-5 under a normal law).
Moments use the same rule with the exact variance of the coordinate. For log Z the standard deviation over seeds was
measured per configuration (noted next to each check) and the bound is 4.5 times that.
"""

import math
import warnings

import pytest
import torch

from fkdiff import compose, smc
from fkdiff.mcmc import HMC
from teachers.analytic import GaussianMixture, gmm_product
from teachers.presets import gaussian, ring8

INFLATION = 8.0
Z_TOL = 4.5
SMIN = 0.002



def _tol(p, n):
    return Z_TOL * math.sqrt(INFLATION * p * (1 - p) / n)


def _hmc():
    return HMC(num_steps=1, num_leapfrog=3)


def _nearest(x, centers):
    """Index of the nearest center `[N]` for points `[N, 2]`."""
    return torch.cdist(x.double(), centers.double()).argmin(1)


def _masses(x, w, centers):
    idx = _nearest(x, centers)
    return torch.zeros(len(centers), dtype=torch.float64).index_add_(0, idx, w.double())


def _grid(target, sigma, lim=3.0, num=601):
    """Grid-exact log Z, points and normalised cell masses of exp(-E(x, sigma)) on [-lim, lim]^2."""
    g = torch.linspace(-lim, lim, num, dtype=torch.float64)
    h = float(g[1] - g[0])
    pts = torch.cartesian_prod(g, g)
    logp = -target.energy(pts, torch.full((pts.shape[0],), sigma, dtype=torch.float64))
    log_z = float(torch.logsumexp(logp, 0)) + 2 * math.log(h)
    return log_z, pts, torch.softmax(logp, 0)


def _check_masses(res, centers, exact):
    est = _masses(res.samples, res.weights, centers)
    n = res.num_particles
    for k in range(len(centers)):
        p = float(exact[k])
        assert abs(float(est[k]) - p) <= _tol(max(p, 1.0 / n), n), (k, est.tolist(), exact.tolist())
    return est


def _check_moments(res, mean, cov):
    w = res.weights
    x = res.samples.double()
    m = (w[:, None] * x).sum(0)
    c = ((x - m).T * w) @ (x - m)
    n = res.num_particles
    var = torch.diagonal(cov)
    assert ((m - mean).abs() <= Z_TOL * (INFLATION * var / n).sqrt()).all(), (m, mean)
    # Var of the sample variance of a normal coordinate is 2 var^2 / n (mixtures: bounded via the fourth moment)
    assert ((torch.diagonal(c) - var).abs() <= Z_TOL * (INFLATION * 2 * var**2 / n).sqrt() * 1.5).all(), (c, cov)


# --------------------------------------------------------------------------------------------------------------------
# Cases: each runs one SMC configuration and returns the result with its exact answers. The tests check one seed;
# the slow calibration test runs 10 seeds of each case and measures the spreads quoted in the tolerances.


def _gmm_b():
    return GaussianMixture([[0.7, 0.7], [-1.0, 0.0]], torch.stack([0.3 * torch.eye(2), 0.2 * torch.eye(2)]).double(),
                           [0.5, 0.5])


def _exact_masses_from(r, centers, n=200_000):
    x = r.sample(n, generator=torch.Generator().manual_seed(0))
    return _masses(x, torch.full((n,), 1.0 / n), centers)


def case_product_gaussians(gen):
    a = gaussian([1.0, 0.0], [[0.5, 0.2], [0.2, 0.3]])
    b = gaussian([0.0, 1.0], 0.4)
    r, log_z = gmm_product(a, b, SMIN)
    res = smc.sample(compose.product(a, b), 1000, shape=(2,), num_levels=200, sigma_max=20.0, sigma_min=SMIN,
                     mcmc=_hmc(), generator=gen, final_denoise=False)
    return dict(res=res, log_z=log_z, mean=r.mean(), cov=r.covariance())


def case_product_gmms(gen):
    a, b = ring8(radius=1.0, std=0.15), _gmm_b()
    r, log_z = gmm_product(a, b, SMIN)
    res = smc.sample(compose.product(a, b), 1000, shape=(2,), num_levels=200, sigma_max=80.0, sigma_min=SMIN,
                     mcmc=_hmc(), generator=gen, final_denoise=False)
    return dict(res=res, log_z=log_z, mean=r.mean(), cov=r.covariance(), centers=a.means,
                masses=_exact_masses_from(r, a.means))


def _ring4(std=0.15, weights=None):
    return GaussianMixture([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]],
                           (std**2) * torch.eye(2, dtype=torch.float64).expand(4, 2, 2).clone(), weights)


def case_mixture(gen):
    # mixture of normalised components is normalised (log Z = 0); its score is the exact diffused mixture score,
    # so the weights only correct the discretisation
    a, b = _ring4(), _gmm_b()
    mix = compose.mixture(a, b, weights=[0.3, 0.7])
    exact = GaussianMixture(torch.cat([a.means, b.means]), torch.cat([a.covs, b.covs]),
                            torch.cat([0.3 * a.weights, 0.7 * b.weights]))
    res = smc.sample(mix, 1000, shape=(2,), num_levels=100, sigma_max=20.0, sigma_min=SMIN, generator=gen,
                     mcmc=_hmc(), final_denoise=False)
    centers = exact.means
    return dict(res=res, log_z=0.0, mean=exact.mean(), cov=exact.covariance(), centers=centers,
                masses=_exact_masses_from(exact, centers))


def case_negation(gen):
    # q_a / q_b^0.5 with b wider than a's components (integrable at every sigma); the initial N(0, (2 sigma_max)^2)
    # is wider than the composed target at sigma_max (variance 2 sigma^2), so initial weights have finite variance
    a, b = _ring4(), gaussian([1.0, 0.0], 0.16)
    neg = compose.negation(a, b, alpha=0.5)
    log_z, pts, p = _grid(neg, SMIN)
    centers = a.means
    res = smc.sample(neg, 1000, shape=(2,), num_levels=200, sigma_max=20.0, sigma_min=SMIN, mcmc=_hmc(),
                     generator=gen, final_denoise=False, init_std=40.0)
    return dict(res=res, log_z=log_z, centers=centers, masses=_masses(pts, p, centers))


def case_tempered(gen):
    # p^2 of a GMM with unequal weights and widths: mode masses prop. to w_k^2 / |C_k|^(1/2) (grid-exact here)
    a = GaussianMixture([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
                        torch.stack([0.04 * torch.eye(2), 0.02 * torch.eye(2), 0.06 * torch.eye(2)]).double(),
                        [0.5, 0.3, 0.2])
    t = compose.tempered(a, 2.0)
    log_z, pts, p = _grid(t, SMIN)
    res = smc.sample(t, 1000, shape=(2,), num_levels=200, sigma_max=20.0, sigma_min=SMIN, mcmc=_hmc(),
                     generator=gen, final_denoise=False)
    return dict(res=res, log_z=log_z, centers=a.means, masses=_masses(pts, p, a.means))


def _truncated_ring4():
    a = _ring4(weights=[0.4, 0.3, 0.2, 0.1])
    low, high = torch.tensor([-0.5, -1.5], dtype=torch.float64), torch.tensor([1.0, 1.5], dtype=torch.float64)
    # exact: component k keeps P_k(box) = prod_i Phi((h_i - mu_ki)/s) - Phi((l_i - mu_ki)/s)
    s = 0.15
    cdf = torch.special.ndtr
    keep = (cdf((high - a.means) / s) - cdf((low - a.means) / s)).prod(1)
    mass = a.weights * keep
    return a, low, high, math.log(float(mass.sum())), mass / mass.sum()


def case_box(gen, final_denoise=True):
    a, low, high, log_z, masses = _truncated_ring4()
    res = smc.sample(a, 1000, shape=(2,), num_levels=200, sigma_max=20.0, sigma_min=SMIN, mcmc=_hmc(),
                     potentials=[smc.Box(low, high)], generator=gen, final_denoise=final_denoise)
    return dict(res=res, log_z=log_z, centers=a.means, masses=masses, low=low, high=high)


def case_halfspace(gen):
    # the ring4 GMM restricted to the half-plane x + y <= 1, which cuts the modes at (1, 0) and (0, 1) through their
    # centres (each keeps exactly half its mass) and keeps the other two whole (margin 2 / (0.15 sqrt 2) = 9.4 sd)
    a = _ring4(weights=[0.4, 0.3, 0.2, 0.1])
    mass = torch.tensor([0.2, 0.15, 0.2, 0.1], dtype=torch.float64)
    res = smc.sample(a, 1000, shape=(2,), num_levels=200, sigma_max=20.0, sigma_min=SMIN, mcmc=_hmc(),
                     potentials=[smc.Polytope([[1.0, 1.0]], [1.0])], generator=gen)
    return dict(res=res, log_z=math.log(float(mass.sum())), centers=a.means, masses=mass / mass.sum())


def case_twisted_low_temperature(gen):
    # twisted mode: exact GMM proposal, terminal tilt p^(beta - 1) => mode masses of p^beta (grid-exact)
    a = GaussianMixture([[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
                        torch.stack([0.04 * torch.eye(2), 0.02 * torch.eye(2), 0.06 * torch.eye(2)]).double(),
                        [0.5, 0.3, 0.2])
    beta = 2.0
    log_zb, pts, p = _grid(compose.tempered(a, beta), SMIN)
    res = smc.sample(a, 1000, shape=(2,), num_levels=100, sigma_max=20.0, sigma_min=SMIN, mode="twisted",
                     potentials=[smc.LowTemperature(beta)], generator=gen, final_denoise=False)
    # log Z of the twisted model = log E_p[p^(beta-1)] = log ∫ p^beta (energies are normalised)
    return dict(res=res, log_z=log_zb, centers=a.means, masses=_masses(pts, p, a.means))


CASES = {"product_gaussians": case_product_gaussians, "product_gmms": case_product_gmms, "mixture": case_mixture,
         "negation": case_negation, "tempered": case_tempered, "box": case_box, "halfspace": case_halfspace,
         "twisted_low_temperature": case_twisted_low_temperature}
# measured sd of log Z over 10 seeds per case (see test_calibration); the log Z bound is Z_TOL times it
# (twisted: sd 0.011 around a discretisation bias of +0.038 of the proposal's terminal law, covered by 4.5 x 0.02)
# box: re-measured after HMC's default target_accept became 0.7 (the API; was 0.65): sd 0.137 over 30 seeds
# (100-129), mean error +0.016 +- 0.025 (no bias); at 0.7 the GMM product's spread fell (0.10 -> 0.067 over 10 seeds)
# halfspace: sd 0.097 over 10 seeds (100-109), mean error -0.021 (no bias), mean squared mass error / iid 3.8
LOG_Z_SD = {"product_gaussians": 0.075, "product_gmms": 0.10, "mixture": 0.10, "negation": 0.06, "tempered": 0.08,
            "box": 0.14, "halfspace": 0.10, "twisted_low_temperature": 0.02}


def _check_case(name, c):
    res = c["res"]
    assert torch.isfinite(res.samples).all()
    assert float(torch.logsumexp(res.log_weights, 0)) == pytest.approx(0.0, abs=1e-12)
    if "masses" in c:
        _check_masses(res, c["centers"], c["masses"])
    if "mean" in c:
        _check_moments(res, c["mean"], c["cov"])
    assert abs(res.log_Z - c["log_z"]) <= Z_TOL * LOG_Z_SD[name], (name, res.log_Z, c["log_z"])


def test_product_of_two_gaussians(gen):
    c = case_product_gaussians(gen)
    _check_case("product_gaussians", c)
    res = c["res"]
    assert res.samples.shape == (1000, 2)
    assert res.acceptance is not None and 0.3 < float(res.acceptance.mean()) < 0.95
    assert res.nfe == pytest.approx(200 * 4)  # one target evaluation + 3 leapfrog evaluations per level


def test_product_of_two_gmms(gen):
    c = case_product_gmms(gen)
    _check_case("product_gmms", c)
    assert c["res"].min_ess > 100 and c["res"].num_eves > 10


def test_mixture(gen):
    _check_case("mixture", case_mixture(gen))


def test_negation(gen):
    _check_case("negation", case_negation(gen))


def test_tempered(gen):
    _check_case("tempered", case_tempered(gen))


@pytest.mark.parametrize("final_denoise", [True, False])
def test_box(gen, final_denoise):
    c = case_box(gen, final_denoise)
    _check_case("box", c)
    res = c["res"]
    inside = ((res.samples >= c["low"]) & (res.samples <= c["high"])).all(1)
    assert inside.all(), int((~inside).sum())  # no violations, weighted or not
    if not final_denoise:
        a, low, high, _, _ = _truncated_ring4()
        res = smc.sample(a, 200, shape=(2,), num_levels=30, sigma_max=20.0, sigma_min=SMIN,
                         potentials=[smc.Box(low, high)], generator=gen, final_denoise=False)
        assert ((res.samples >= low) & (res.samples <= high)).all(1)[res.weights > 0].all()


def test_twisted_low_temperature(gen):
    c = case_twisted_low_temperature(gen)
    _check_case("twisted_low_temperature", c)
    # the tilt really moved mass: the light, wide mode has 0.2 under p but ~0.06 under p^2
    assert float(c["masses"][2]) < 0.1 and float(_masses(c["res"].samples, c["res"].weights, c["centers"])[2]) < 0.12


def test_halfspace(gen):
    c = case_halfspace(gen)
    _check_case("halfspace", c)
    assert (c["res"].samples.sum(1) <= 1.0).all()  # no violations, weighted or not


def test_polytope_potential_and_gradient():
    """Polytope's smoothed log-potential is sum_i log Phi((b_i - a_i . x) / (sigma |a_i|)); its closed-form gradient
    matches autograd where that is finite and stays finite far outside (where Phi underflows in a naive form)."""
    from fkdiff.smc.potentials import Level, Potential

    pot = smc.Polytope([[1.0, 1.0], [0.0, -2.0]], [1.0, 0.5])
    x = torch.tensor([[0.0, 0.0], [2.0, 3.0], [0.3, -0.2], [40.0, -30.0]], dtype=torch.float64)
    for sigma in (0.002, 0.3, 20.0):
        level = Level(index=0, num_levels=2, sigma=sigma, final=False)
        lw, g = pot.log_potential_and_grad(x, level)
        z1 = (1.0 - x.sum(1)) / (sigma * math.sqrt(2))
        z2 = (0.5 + 2 * x[:, 1]) / (2 * sigma)
        torch.testing.assert_close(lw, torch.special.log_ndtr(z1) + torch.special.log_ndtr(z2))
        lw_ag, g_ag = Potential.log_potential_and_grad(pot, x, level)  # autograd of the same log-potential
        ok = torch.isfinite(g_ag).all(1) & (g_ag.abs() > 0).any(1)
        torch.testing.assert_close(g[ok], g_ag[ok], rtol=1e-8, atol=1e-10)
        assert torch.isfinite(g).all() and torch.isfinite(lw).all()
    # far outside at a small sigma: grad -> -(margin / sigma^2 |a|^2) a per violated row, pointing back inside
    level = Level(index=0, num_levels=2, sigma=0.002, final=False)
    _, g = pot.log_potential_and_grad(x[1:2], level)
    torch.testing.assert_close(g[0], torch.tensor([-1.0, -1.0], dtype=torch.float64) * 4.0 / (0.002**2 * 2),
                               rtol=1e-4, atol=0.0)
    # the last level: the hard indicator on the returned point
    final = Level(index=1, num_levels=2, sigma=0.002, final=True, x_out=x)
    assert pot.log_potential(x, final).tolist() == [0.0, -math.inf, 0.0, -math.inf]
    with pytest.raises(ValueError, match="zero row"):
        smc.Polytope([[0.0, 0.0]], [1.0])
    with pytest.raises(ValueError, match="b \\[m\\]"):
        smc.Polytope([[1.0, 0.0]], [1.0, 2.0])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_calibration(name):
    """10 seeds per case: the log Z spread is within the quoted sd (x1.5 slack), the bias is within its error,
    and the mode-mass errors are within sqrt(INFLATION) times their i.i.d. standard error on average."""
    errs, ratios = [], []
    for seed in range(10):
        c = CASES[name](torch.Generator().manual_seed(100 + seed))
        res = c["res"]
        errs.append(res.log_Z - c["log_z"])
        if "masses" in c:
            est = _masses(res.samples, res.weights, c["centers"])
            p = c["masses"].clamp_min(1.0 / res.num_particles)
            ratios.append(((est - c["masses"]) ** 2 / (p * (1 - p) / res.num_particles)).mean())
    e = torch.tensor(errs, dtype=torch.float64)
    print(name, "log Z errors", [round(v, 3) for v in errs], "sd", float(e.std()), "mean", float(e.mean()))
    assert float(e.std()) <= 1.5 * LOG_Z_SD[name]
    assert abs(float(e.mean())) <= 3 * LOG_Z_SD[name] / math.sqrt(10) + 0.02
    if ratios:
        r = float(torch.stack(ratios).mean())
        print(name, "mean squared mass error / iid variance", r)
        assert r <= INFLATION


# --------------------------------------------------------------------------------------------------------------------
# Engine behaviour


class _Broken:
    """Wraps a target; energy NaN (or score NaN) on a region at some noise levels."""

    def __init__(self, inner, *, energy_nan=None, score_nan=None):
        self.inner, self.energy_nan, self.score_nan = inner, energy_nan, score_nan

    def energy(self, x, sigma):
        e = self.inner.energy(x, sigma)
        if self.energy_nan is not None:
            e = torch.where(self.energy_nan(x, sigma), torch.full_like(e, math.nan), e)
        return e

    def score(self, x, sigma):
        s = self.inner.score(x, sigma)
        if self.score_nan is not None:
            s = torch.where(self.score_nan(x, sigma)[:, None], torch.full_like(s, math.nan), s)
        return s


def test_nan_energies_and_scores_are_dropped_and_counted(gen):
    a = _ring4()
    broken = _Broken(a, energy_nan=lambda x, s: (x[:, 0] > 3.0) & (s > 1.0),
                     score_nan=lambda x, s: (x[:, 1] > 3.0) & (s > 1.0))
    res = smc.sample(broken, 500, shape=(2,), num_levels=60, sigma_max=20.0, sigma_min=SMIN, mcmc=_hmc(),
                     generator=gen)
    assert res.total_invalid > 0
    assert torch.isfinite(res.samples).all() and math.isfinite(res.log_Z)
    assert torch.isfinite(res.weights).all() and float(res.weights.sum()) == pytest.approx(1.0)


def test_all_dead_raises_naming_the_level(gen):
    a = _ring4()
    broken = _Broken(a, energy_nan=lambda x, s: s < 1.0)
    sigmas = smc.DiffusionFK(a, __import__("fkdiff").diffusion.sigma_schedule(40, SMIN, 20.0), shape=(2,)).sigmas
    first = int(torch.nonzero(sigmas < 1.0)[0])
    with pytest.raises(smc.SMCError, match=rf"level {first} \(sigma"):
        smc.sample(broken, 100, shape=(2,), num_levels=40, sigma_max=20.0, sigma_min=SMIN, generator=gen)
    # a hard constraint nobody satisfies: also an error, not NaN samples
    first = int(torch.nonzero(sigmas < 0.01)[0])
    with pytest.raises(smc.SMCError, match=rf"level {first} "):
        smc.sample(a, 100, shape=(2,), num_levels=40, sigma_max=20.0, sigma_min=SMIN, generator=gen,
                   potentials=[lambda x, s: torch.where(s < 0.01, -math.inf, 0.0).double()])


def test_independent_of_max_batch():
    kw = dict(shape=(2,), num_levels=15, sigma_max=20.0, sigma_min=SMIN, mcmc=_hmc(), potentials=[smc.Box([-2, -2], [2, 2])])
    target = compose.product(_ring4(), _gmm_b())
    r1 = smc.sample(target, 64, generator=torch.Generator().manual_seed(3), **kw)
    r2 = smc.sample(target, 64, generator=torch.Generator().manual_seed(3), max_batch=5, **kw)
    assert torch.equal(r1.samples, r2.samples) and torch.equal(r1.log_weights, r2.log_weights)
    assert r1.log_Z == r2.log_Z and torch.equal(r1.acceptance, r2.acceptance)


@pytest.mark.parametrize("ess_threshold", [0.0, 0.5, 1.0])
def test_log_z_across_resampling_thresholds(ess_threshold):
    # mixture of normalised components: log Z = 0 whatever the resampling policy; weights carried across
    # non-resampling steps (never overwritten) keep the estimator consistent. sd over 10 seeds: 0.05 (mixture case)
    mix = compose.mixture(_ring4(), _gmm_b(), weights=[0.3, 0.7])
    res = smc.sample(mix, 1000, shape=(2,), num_levels=100, sigma_max=20.0, sigma_min=SMIN, generator=torch.Generator().manual_seed(5),
                     ess_threshold=ess_threshold, final_denoise=False)
    assert abs(res.log_Z) <= Z_TOL * LOG_Z_SD["mixture"]
    n_res = int(res.resampled.sum())
    assert (n_res == 0) if ess_threshold == 0 else (n_res == 100 if ess_threshold == 1 else 0 < n_res < 100)
    # the estimator is the sum of increments log sum W_{t-1} G_t
    assert float(res.log_Z_increments.sum()) == pytest.approx(res.log_Z, abs=1e-9)


def test_separate_proposal_and_result_api(gen):
    # the weights correct any proposal score field: a plain Gaussian's score drives the moves, the product's
    # energies set the weights
    a, b = gaussian([1.0, 0.0], [[0.5, 0.2], [0.2, 0.3]]), gaussian([0.0, 1.0], 0.4)
    r, log_z = gmm_product(a, b, SMIN)
    res = smc.sample(compose.product(a, b), 1000, shape=(2,), num_levels=100, sigma_max=20.0, sigma_min=SMIN,
                     proposal=gaussian([0.0, 0.0], 1.0), mcmc=_hmc(), generator=gen, final_denoise=False)
    assert abs(res.log_Z - log_z) <= Z_TOL * LOG_Z_SD["product_gaussians"]
    _check_moments(res, r.mean(), r.covariance())
    # 1 target + 1 proposal evaluation per level (none at the last), 3 leapfrog + 1 proposal refresh per MCMC call
    assert res.nfe == pytest.approx(100 * 1 + 99 * 1 + 100 * 3 + 99 * 1)
    eq = res.resample(torch.Generator().manual_seed(0))
    assert eq.shape == res.samples.shape and torch.isfinite(eq).all()
    lo, hi = res.log_Z_ci(0.95)
    assert lo <= res.log_Z <= hi and res.log_Z_var >= 0
    summary = res.summary()
    assert summary["min_ess"] == res.min_ess and res.ess.shape == (100,) and res.unique_ancestors.shape == (100,)


def test_num_steps_is_the_deprecated_name_of_num_levels():
    kw = dict(shape=(2,), sigma_max=20.0, sigma_min=SMIN, final_denoise=False)
    new = smc.sample(_ring4(), 64, num_levels=12, generator=torch.Generator().manual_seed(1), **kw)
    with pytest.warns(DeprecationWarning, match="num_levels"):
        old = smc.sample(_ring4(), 64, num_steps=12, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(new.samples, old.samples) and old.ess.shape == (12,)
    with pytest.raises(TypeError, match="num_levels only"):
        smc.sample(_ring4(), 64, num_levels=12, num_steps=12, **kw)


def test_a_new_per_level_diagnostic_is_one_collector(tmp_path, monkeypatch):
    """A per-level diagnostic is one `Collector`: registered once, it is recorded at every level of every run (also
    as an attribute of the result) and written by the command line. Here: the largest normalised weight per level,
    for which 1 / max W <= ESS <= N holds exactly."""
    from fkdiff.recipes import compose as compose_config
    from fkdiff.sample import run
    from fkdiff.smc import core

    extra = smc.Collector("max_weight", lambda i: float(i.weights.W.max()))
    monkeypatch.setattr(core, "COLLECTORS", core.COLLECTORS + (extra,))
    res = smc.sample(compose.product(_ring4(), _gmm_b()), 200, shape=(2,), num_levels=12, sigma_max=20.0,
                     sigma_min=SMIN, generator=torch.Generator().manual_seed(0))
    assert res.max_weight is res.levels["max_weight"] and res.max_weight.shape == (12,)
    assert (res.ess >= 1 / res.max_weight - 1e-9).all() and (res.max_weight <= 1).all()
    diag = run(compose_config(["recipe=toy2d", f"run_dir={tmp_path}", "sample.num_particles=64", "sample.num_levels=6",
                               "sample.progress=false", "sample.compare_reverse_diffusion=false",
                               "sample.plot.enabled=false"]))
    assert len(diag["max_weight"]) == 6


def test_collapse_warns(gen):
    with pytest.warns(smc.SMCDegeneracyWarning):
        res = smc.sample(compose.product(_ring4(), _gmm_b()), 500, shape=(2,), num_levels=3, sigma_max=20.0,
                         sigma_min=SMIN, generator=gen)
    assert res.warnings and res.min_ess < 10


def test_engine_on_a_generic_feynman_kac_model():
    """The engine knows only the FK protocol: a bootstrap particle filter for a linear Gaussian AR(1) model
    (x_t = rho x_{t-1} + tau eps, y_t = x_t + eta) estimates the Kalman filter's exact log-likelihood."""
    rho, tau, eta, num_t = 0.9, 0.5, 0.4, 25
    g = torch.Generator().manual_seed(0)
    ys, x = [], torch.randn((), generator=g, dtype=torch.float64) * tau / math.sqrt(1 - rho**2)
    for _ in range(num_t):
        ys.append(float(x + eta * torch.randn((), generator=g, dtype=torch.float64)))
        x = rho * x + tau * torch.randn((), generator=g, dtype=torch.float64)
    # Kalman filter log-likelihood
    m, v, ll = 0.0, tau**2 / (1 - rho**2), 0.0
    for t, y in enumerate(ys):
        if t > 0:
            m, v = rho * m, rho**2 * v + tau**2
        s = v + eta**2
        ll += -0.5 * (math.log(2 * math.pi * s) + (y - m) ** 2 / s)
        k = v / s
        m, v = m + k * (y - m), (1 - k) * v

    class AR1:
        T = num_t

        def M0(self, num, generator):
            return smc.Particles(torch.randn(num, 1, generator=generator, dtype=torch.float64) * tau / math.sqrt(1 - rho**2))

        def M(self, t, prev, generator):
            return smc.Particles(rho * prev.x + tau * torch.randn(prev.x.shape, generator=generator, dtype=torch.float64))

        def logG(self, t, prev, cur):
            return -0.5 * (math.log(2 * math.pi * eta**2) + (ys[t] - cur.x[:, 0]) ** 2 / eta**2)

    errs = torch.tensor([smc.run_smc(AR1(), 500, generator=torch.Generator().manual_seed(s)).log_Z - ll
                         for s in range(20)], dtype=torch.float64)
    # unbiased Z_hat: E[log Z_hat] ≈ log Z - Var/2; the mean of 20 runs is within 4.5 standard errors of that
    sd = float(errs.std())
    assert sd < 0.5
    assert abs(float(errs.mean()) + sd**2 / 2) <= Z_TOL * sd / math.sqrt(20) + 1e-3, (errs.mean(), sd)


def test_hmc_acceptance_never_collapses_on_a_gmm_product():
    """Regression (smc_accuracy benchmark): with the population step size c / sqrt(median squared score) and c adapted
    level to level, HMC acceptance stays in a healthy band at every level of a ring8 x GMM product, including where
    the modes separate (sigma ~ 0.2-0.9), and the log Z error stays small."""
    two = GaussianMixture(torch.tensor([[0.35, 0.35], [-0.35, -0.35]], dtype=torch.float64),
                          torch.tensor([0.3, 0.2], dtype=torch.float64)[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64))
    r8 = ring8()
    _, log_z = gmm_product(r8, two)
    g = torch.Generator().manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = smc.sample(compose.product(r8, two), 500, shape=(2,), num_levels=100, sigma_max=80.0, sigma_min=0.002,
                         mcmc=HMC(1, 3), generator=g)
    acc = res.acceptance
    assert float(acc.min()) > 0.15, f"acceptance collapsed to {float(acc.min()):.3f} at sigma {float(res.sigmas[acc.argmin()]):.3g}"
    assert 0.6 < float(acc.mean()) < 0.8
    assert abs(res.log_Z - float(log_z)) < 1.0  # N = 500, 100 levels: spread over seeds about 0.3
