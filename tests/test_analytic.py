"""Analytic teachers (teachers.analytic, teachers.presets): exact denoiser/score/energy relations, normalisation by
2D quadrature, sampling moments, gmm_product, Box stability, presets, bad inputs."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from teachers import Box, GaussianMixture, gmm_product
from teachers import presets as P

F64 = torch.float64
SIGMAS = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def _skewed_gmm():
    """Two full-covariance components with unequal weights (exercises the eigenbasis and the weighting)."""
    means = [[0.3, -0.2], [-0.4, 0.5]]
    covs = [[[0.04, 0.015], [0.015, 0.02]], [[0.01, -0.004], [-0.004, 0.09]]]
    return GaussianMixture(means, covs, [3.0, 1.0])


TEACHERS = {
    "ring8": P.ring8,
    "skewed": _skewed_gmm,
    "strip": P.strip,
    "box3d": lambda: Box([-1.0, 0.0, 2.0], [0.5, 0.3, 4.0]),
}


def _mix_logpdf(g: GaussianMixture, x: torch.Tensor, s: float) -> torch.Tensor:
    """Independent reference: log sum_k w_k N(x; mu_k, C_k + s^2 I) with torch.distributions."""
    eye = torch.eye(g.dim, dtype=F64)
    comp = torch.distributions.MultivariateNormal(g.means, covariance_matrix=g.covs + s**2 * eye)
    return torch.logsumexp(comp.log_prob(x[:, None, :]) + g.weights.log(), dim=1)


def _points(t, sigma, n, gen):
    """Typical points of q_sigma (samples + noise) plus a few in the far tails."""
    x = t.sample(n, generator=gen)
    x = x + (sigma if not isinstance(sigma, torch.Tensor) else sigma[:, None]) * torch.randn(
        x.shape, dtype=F64, generator=gen)
    return x


# ------------------------------------------------------------------------------------------------ exact relations


@pytest.mark.parametrize("name", list(TEACHERS))
def test_denoiser_score_energy_relations(name, gen):
    t = TEACHERS[name]()
    for sigma in SIGMAS + ["per-sample"]:
        if sigma == "per-sample":
            s = torch.logspace(-3, 2, 48, dtype=F64)
        else:
            s = sigma
        x = _points(t, s, 48, gen).requires_grad_(True)
        e = t.energy(x, s)
        assert e.shape == (48,) and torch.isfinite(e).all()
        (grad,) = torch.autograd.grad(e.sum(), x)
        score = t.score(x, s)
        scale = score.abs().max().item() + 1.0
        # score = -grad energy: float64 autograd through the same log-density; relative 1e-9 of the score's scale
        assert (score + grad).abs().max().item() <= 1e-9 * scale, (name, sigma)
        den = t(x, s)
        s_b = (s if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=F64)).reshape(-1, 1)
        ref = x + s_b**2 * score
        assert (den - ref).abs().max().item() <= 1e-10 * (1 + x.abs().max().item()), (name, sigma)
        if sigma == "per-sample":  # the [B] sigma path agrees with per-row scalar calls
            for i in (0, 17, 47):
                xi = x[i: i + 1].detach()
                assert torch.allclose(t.energy(xi, float(s[i])), e[i: i + 1].detach(), rtol=1e-12, atol=1e-12)
                assert torch.allclose(t(xi, float(s[i])), den[i: i + 1].detach(), rtol=1e-12, atol=1e-12)


def test_gmm_denoiser_and_energy_match_independent_formulas(gen):
    # E[x0 | x] = sum_k r_k (mu_k + C_k (C_k + s^2 I)^{-1} (x - mu_k)), r_k from torch.distributions log-probs
    g = _skewed_gmm()
    eye = torch.eye(2, dtype=F64)
    for s in (0.01, 0.3, 3.0):
        x = _points(g, s, 64, gen)
        cs = g.covs + s**2 * eye
        logr = torch.distributions.MultivariateNormal(g.means, covariance_matrix=cs).log_prob(x[:, None]) + g.weights.log()
        r = torch.softmax(logr, 1)
        sol = torch.linalg.solve(cs[None], (x[:, None] - g.means[None])[..., None])  # [B, K, d, 1]
        post = g.means[None] + (g.covs[None] @ sol)[..., 0]
        ref = (r[..., None] * post).sum(1)
        assert torch.allclose(g(x, s), ref, rtol=1e-10, atol=1e-12)
        assert torch.allclose(g.energy(x, s), -_mix_logpdf(g, x, s), rtol=1e-12, atol=1e-12)
        assert torch.allclose(g.component_probs(x, s), r, atol=1e-12)
    # smoothing is a semigroup: (p * N(0, a^2)) * N(0, b^2) = p * N(0, a^2 + b^2)
    x = _points(g, 0.5, 16, gen)
    assert torch.allclose(g.smoothed(0.3).energy(x, 0.4), g.energy(x, 0.5), rtol=1e-12)


def test_box_denoiser_matches_mpmath_quadrature():
    # 1D box [l, h]: E[x0 | x] = int_l^h x0 N(x; x0, s^2) dx0 / int_l^h N(x; x0, s^2) dx0, at 40 digits
    mpmath.mp.dps = 40
    b = Box([-0.3], [0.7])
    for x, s in [(0.0, 0.05), (0.69, 0.01), (1.5, 0.2), (-2.0, 1.0), (3.0, 10.0)]:
        w = lambda x0: mpmath.exp(-((x - x0) ** 2) / (2 * s**2))
        z = mpmath.quad(w, [-0.3, x, 0.7] if -0.3 < x < 0.7 else [-0.3, 0.7])
        m = mpmath.quad(lambda x0: x0 * w(x0), [-0.3, x, 0.7] if -0.3 < x < 0.7 else [-0.3, 0.7])
        got = b(torch.tensor([[x]], dtype=F64), s).item()
        assert abs(got - float(m / z)) < 1e-12, (x, s)


# ------------------------------------------------------------------------------------------------ normalisation


def _gl_axis(breaks, n=48):
    """Composite Gauss-Legendre nodes and weights (n per segment) between sorted break points."""
    import numpy as np

    t, w = np.polynomial.legendre.leggauss(n)
    t, w = torch.as_tensor(t, dtype=F64), torch.as_tensor(w, dtype=F64)
    br = torch.as_tensor(sorted(set(breaks)), dtype=F64)
    lo, hi = br[:-1, None], br[1:, None]
    return (lo + (t + 1) * (hi - lo) / 2).reshape(-1), (w * (hi - lo) / 2).reshape(-1)


def _integrate_2d(logp_fn, xs, ys, chunk=1 << 18):
    """Tensor-product trapezoid rule of exp(logp) on the (xs, ys) grid; returns (integral, grid points, logp)."""
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    pts = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    logp = torch.cat([logp_fn(pts[i: i + chunk]) for i in range(0, len(pts), chunk)])
    p = logp.exp().reshape(len(xs), len(ys))
    return torch.trapezoid(torch.trapezoid(p, ys, dim=1), xs).item(), pts, logp


@pytest.mark.parametrize("sigma", [1e-3, 0.1, 1.0, 10.0])
def test_gmm_energy_normalised(sigma):
    # the trapezoid rule on a uniform grid of spacing h integrates a Gaussian of std w with relative error
    # ~2 exp(-2 pi^2 w^2 / h^2) (Poisson summation): h = w_min / 3 gives ~1e-77; truncation beyond 12 std < 1e-30;
    # what remains is float64 round-off: demand 1e-9
    for g in (P.ring8(), _skewed_gmm()):
        w_min = math.sqrt(g.lam.min().item() + sigma**2)
        w_max = math.sqrt(g.lam.max().item() + sigma**2)
        lo = g.means.min().item() - 12 * w_max
        hi = g.means.max().item() + 12 * w_max
        n = int(math.ceil((hi - lo) / (w_min / 3))) + 1
        ax = torch.linspace(lo, hi, n, dtype=F64)
        total, _, _ = _integrate_2d(lambda p: -g.energy(p, sigma), ax, ax)
        assert abs(total - 1) < 1e-9, (sigma, total)


@pytest.mark.parametrize("sigma", [1e-4, 1e-3, 0.1, 1.0, 10.0])
def test_box_energy_normalised(sigma):
    # composite Gauss-Legendre with break points at each edge +-12 sigma: the density is flat (constant or ~0 below
    # 1e-32) between bands, and a smoothed step over a 24-sigma band is integrated by 48 nodes to ~1e-13
    b = P.strip()
    axes = []
    for lo, hi in zip(b.low.tolist(), b.high.tolist()):
        breaks = [lo - 12 * sigma, lo + 12 * sigma, hi - 12 * sigma, hi + 12 * sigma]
        breaks = [min(max(v, lo - 12 * sigma), hi + 12 * sigma) for v in breaks]
        axes.append(_gl_axis(breaks))
    (xs, wx), (ys, wy) = axes
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    p = (-b.energy(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), sigma)).exp().reshape(len(xs), len(ys))
    total = (wx @ p @ wy).item()
    assert abs(total - 1) < 1e-10, (sigma, total)


# ------------------------------------------------------------------------------------------------ gmm_product


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_gmm_product_log_z_and_density(sigma):
    a = P.ring8()
    b = P.gaussian([0.3, 0.2], [[0.05, 0.02], [0.02, 0.03]])
    r, log_z = gmm_product(a, b, sigma)
    assert r.num_components == 8 and abs(r.weights.sum().item() - 1) < 1e-12
    # trapezoid quadrature of q_a q_b: product components have std >= 0.045, spacing 0.013 < std / 3 (see above)
    ax = torch.linspace(-1.3, 1.3, 201, dtype=F64)
    logq = lambda p: _mix_logpdf(a, p, sigma) + _mix_logpdf(b, p, sigma)
    z, pts, lq = _integrate_2d(logq, ax, ax)
    assert abs(log_z - math.log(z)) < 1e-8, (log_z, math.log(z))
    # pointwise: r(x) = q_a(x) q_b(x) / Z wherever the density is not negligible
    keep = lq > log_z - 30
    assert keep.sum() > 1000
    lr = _mix_logpdf(r, pts[keep], 0.0)
    assert torch.allclose(lr, lq[keep] - log_z, atol=1e-9)


def test_low_temperature_coverage_target_log_z_by_quadrature():
    """benchmarks/smc_coverage.py temp2d: compose.tempered(g, 2) at sigma_min has log Z = log ∫ p_sigma_min^2 =
    log sum_ij w_i w_j N(mu_i; mu_j, S_i + S_j + 2 sigma_min^2 I), the closed form the coverage benchmark uses."""
    from benchmark_modules import load_benchmark

    bench = load_benchmark("smc_coverage")
    target, dim, log_z = bench.make_targets()["temp2d"]
    g, s = bench.widths3(), bench.SIGMA_MIN
    assert dim == 2 and target.beta == 2.0 and target.components[0] is not None
    # trapezoid of p_s^2 with the independent reference density; narrowest component of p^2 has std 0.08 / sqrt(2)
    # = 0.057, spacing 4 / 300 = 0.013 < std / 4; the grid reaches >= 6 std of p^2 beyond every mean
    ax = torch.linspace(-2.0, 2.0, 301, dtype=F64)
    z, pts, lq = _integrate_2d(lambda p: 2 * _mix_logpdf(g, p, s), ax, ax)
    assert abs(log_z - math.log(z)) < 1e-8, (log_z, math.log(z))
    # the benchmark's target is that density: energy = -2 log p_s (normalised, no hidden constant)
    keep = lq > log_z - 30
    e = target.energy(pts[keep], torch.full((int(keep.sum()),), s, dtype=F64))
    assert torch.allclose(-e, lq[keep], atol=1e-8)


def test_gmm_product_of_two_mixtures_and_errors():
    a, b = P.columns_left(std=0.2), P.ring8(std=0.15)
    s = 0.1
    r, log_z = gmm_product(a, b, s)
    assert r.num_components == 24
    ax = torch.linspace(-2.0, 2.0, 121, dtype=F64)
    z, pts, lq = _integrate_2d(lambda p: _mix_logpdf(a, p, s) + _mix_logpdf(b, p, s), ax, ax)
    assert abs(log_z - math.log(z)) < 1e-8
    keep = lq > log_z - 30
    assert torch.allclose(_mix_logpdf(r, pts[keep], 0.0), lq[keep] - log_z, atol=1e-9)
    with pytest.raises(ValueError, match="dimension mismatch"):
        gmm_product(a, P.gaussian([0.0, 0.0, 0.0], 1.0))


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize("name", ["ring8", "skewed", "fractal", "strip", "box3d"])
def test_sample_moments(name):
    t = P.fractal() if name == "fractal" else TEACHERS[name]()
    n = 100_000
    x = t.sample(n, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, t.dim) and x.dtype == F64
    mean, cov = t.mean(), t.covariance()
    # mean: standard error sqrt(Cov_ii / n) per coordinate; allow 5
    assert ((x.mean(0) - mean).abs() <= 5 * (torch.diagonal(cov) / n).sqrt()).all(), name
    # covariance about the exact mean: entry (i, j) is the mean of n iid products (x_i - m_i)(x_j - m_j), whose
    # standard error is their sample std / sqrt(n); allow 5
    c = x - mean
    prod = c[:, :, None] * c[:, None, :]
    se = prod.std(0) / math.sqrt(n)
    assert ((prod.mean(0) - cov).abs() <= 5 * se).all(), name
    # the same generator seed gives the same samples
    assert torch.equal(t.sample(10, generator=torch.Generator().manual_seed(3)),
                       t.sample(10, generator=torch.Generator().manual_seed(3)))
    if isinstance(t, Box):
        assert t.contains(x).all()


def test_sample_component_frequencies():
    # fractal's weights are unequal: each component's frequency is Binomial(n, w_k) / n; allow 5 standard errors
    g = P.fractal()
    n = 20_000
    x = g.sample(n, generator=torch.Generator().manual_seed(1))
    # assign samples to components by the (sigma -> 0) posterior: the components barely overlap except along
    # branches, so compare the summed posterior responsibilities instead: E[r_k(x)] = w_k exactly
    r = g.component_probs(x, 1e-6).mean(0)
    se = (g.weights * (1 - g.weights) / n).sqrt()
    assert ((r - g.weights).abs() <= 5 * se + 1e-12).all()


# ------------------------------------------------------------------------------------------------ Box stability


def _mp_box_energy(x, s, lows, highs):
    mpmath.mp.dps = 60
    tot = mpmath.mpf(0)
    for xi, l, h in zip(x, lows, highs):
        a, b = (mpmath.mpf(l) - xi) / s, (mpmath.mpf(h) - xi) / s
        p = mpmath.ncdf(b) - mpmath.ncdf(a)
        tot += -mpmath.log(p / (mpmath.mpf(h) - l))
    return float(tot)


def test_box_stable_across_scales():
    b = P.strip()
    lows, highs = b.low.tolist(), b.high.tolist()
    pts = torch.tensor([[0.0, 0.0], [0.1, 1.0], [0.0999, -0.5], [0.3, 0.0], [-5.0, 2.0], [1e3, -1e3], [1e6, 3.0],
                        [-1e6, -1e6]], dtype=F64)
    for s in [1e-4, 1e-3, 1e-2, 1.0, 1e2, 1e3, 1e4]:
        e, sc, d = b.energy(pts, s), b.score(pts, s), b(pts, s)
        assert torch.isfinite(e).all() and torch.isfinite(sc).all() and torch.isfinite(d).all(), s
        # against 60-digit arithmetic (relative 1e-10; the far points have energies up to ~1e20)
        for i in range(len(pts)):
            ref = _mp_box_energy(pts[i].tolist(), mpmath.mpf(s), lows, highs)
            assert abs(e[i].item() - ref) <= 1e-10 * max(1.0, abs(ref)), (s, pts[i].tolist(), e[i].item(), ref)
        if s <= 1e-2:
            # tiny sigma: the denoiser projects onto the box (E[x0|x] = edge - s^2/dist + ... outside)
            assert torch.allclose(d, torch.maximum(torch.minimum(pts, b.high), b.low), atol=2 * s)
            inside = ((pts - b.low > 8 * s) & (b.high - pts > 8 * s)).all(1)  # Phi(-8) ~ 6e-16: uniform
            assert inside.sum() >= 1
            assert torch.allclose(e[inside], torch.full_like(e[inside], b.log_volume), atol=1e-12)
            on_edge = torch.tensor([False, True] + [False] * 6)  # the corner (0.1, 1): density 1/4 of the interior
            assert torch.allclose(e[on_edge], b.log_volume + torch.tensor([math.log(4.0)], dtype=F64), atol=1e-12)
        if s >= 1e3:
            # huge sigma: the posterior is the prior, E[x0|x] ~ box centre within Var/s^2 * |x - c|
            near = pts.abs().max(1).values < 10
            assert torch.allclose(d[near], b.mean().expand_as(d[near]), atol=1e-4)
    # score sign far outside: points back towards the box
    far = torch.tensor([[50.0, 0.0], [-50.0, 0.0]], dtype=F64)
    sc = b.score(far, 1e-3)
    assert sc[0, 0] < 0 and sc[1, 0] > 0


def test_float32_inputs():
    for t in (P.strip(), P.ring8()):
        x64 = torch.tensor([[0.05, 0.2], [0.5, -0.3], [3.0, 4.0], [-0.1, 1.0]], dtype=F64)
        x32 = x64.float()
        for s in (1e-3, 0.1, 10.0):
            e32, sc32, d32 = t.energy(x32, s), t.score(x32, s), t(x32, s)
            assert e32.dtype == sc32.dtype == d32.dtype == torch.float32
            assert torch.isfinite(e32).all() and torch.isfinite(sc32).all() and torch.isfinite(d32).all()
            # computed in float64 internally, rounded once on the way out
            assert torch.allclose(e32.double(), t.energy(x32.double(), s), rtol=1e-6, atol=1e-6)
            assert torch.allclose(d32.double(), t(x32.double(), s), rtol=1e-6, atol=1e-6)
        # a float32 [B] sigma works too
        assert torch.isfinite(t.score(x32, torch.full((4,), 0.5))).all()


# ------------------------------------------------------------------------------------------------ presets


def test_presets_geometry():
    r = P.ring8()
    assert r.num_components == 8 and r.dim == 2
    assert torch.allclose(r.means.norm(dim=1), torch.full((8,), 0.5, dtype=F64))
    ang = torch.atan2(r.means[:, 1], r.means[:, 0]) % (2 * math.pi)
    assert torch.allclose(ang.sort().values, torch.arange(8, dtype=F64) * math.pi / 4, atol=1e-12)
    assert torch.allclose(r.covs, 0.05**2 * torch.eye(2, dtype=F64).expand(8, 2, 2))
    assert torch.allclose(r.weights, torch.full((8,), 1 / 8, dtype=F64))
    assert torch.allclose(P.ring8(std=0.3).covs[0], 0.09 * torch.eye(2, dtype=F64))
    s = P.strip()
    assert s.low.tolist() == [-0.1, -1.0] and s.high.tolist() == [0.1, 1.0]
    for f, xpos in ((P.columns_left, -0.25), (P.columns_right, 0.25)):
        c = f()
        assert torch.allclose(c.means, torch.tensor([[xpos, 0.5], [xpos, 0.0], [xpos, -0.5]], dtype=F64))
        assert torch.allclose(c.covs, 0.03**2 * torch.eye(2, dtype=F64).expand(3, 2, 2))
    fr = P.fractal()
    assert fr.num_components == 3 * (1 + 2 + 4 + 8)
    assert abs(fr.weights.sum().item() - 1) < 1e-12 and (fr.lam > 0).all()
    assert torch.allclose(fr.means[0], torch.tensor([0.0, -1.0 + 0.8 / 6], dtype=F64))
    # the tree is symmetric about x = 0; weights follow branch length (trunk / deepest = shrink^-3)
    mirrored = fr.means * torch.tensor([-1.0, 1.0], dtype=F64)
    dist = (mirrored[:, None] - fr.means[None]).norm(dim=-1).min(1).values
    assert dist.max() < 1e-12
    assert math.isclose(fr.weights.max().item() / fr.weights.min().item(), 0.62**-3, rel_tol=1e-12)
    g = P.gaussian([1.0, 2.0], 0.25)
    assert torch.allclose(g.covs[0], 0.25 * torch.eye(2, dtype=F64)) and g.means.tolist() == [[1.0, 2.0]]
    assert set(P.PRESETS) == {"ring8", "strip", "columns_left", "columns_right", "fractal"}
    assert torch.equal(P.make_preset("ring8", radius=2.0).means, P.ring8(radius=2.0).means)
    with pytest.raises(KeyError, match="unknown 2D preset 'moon'; available: columns_left"):
        P.make_preset("moon")


# ------------------------------------------------------------------------------------------------ bad inputs


def test_bad_inputs():
    g, b = P.ring8(), P.strip()
    for t in (g, b):
        with pytest.raises(ValueError, match="2-dimensional"):
            t.energy(torch.zeros(3, 3, dtype=F64), 0.1)
        with pytest.raises(ValueError, match="event dim"):
            t.score(torch.zeros(3, dtype=F64), 0.1)
        with pytest.raises(TypeError, match="floating-point"):
            t(torch.zeros(3, 2, dtype=torch.long), 0.1)
        with pytest.raises(ValueError, match="sigma must be > 0"):
            t.energy(torch.zeros(3, 2, dtype=F64), 0.0)
        with pytest.raises(ValueError, match="sigma must be > 0"):
            t.score(torch.zeros(3, 2, dtype=F64), torch.tensor([0.1, -1.0, 0.1]))
        with pytest.raises(ValueError, match=r"\[B\]=3"):
            t(torch.zeros(3, 2, dtype=F64), torch.ones(2))
        with pytest.raises(ValueError, match="unconditional"):
            t(torch.zeros(3, 2, dtype=F64), 0.1, cond=torch.zeros(3))
    eye = torch.eye(2, dtype=F64)
    with pytest.raises(ValueError, match=r"means must have shape \[K, d\]"):
        GaussianMixture(torch.zeros(2), eye[None])
    with pytest.raises(ValueError, match=r"covs must have shape \[K, d, d\]"):
        GaussianMixture(torch.zeros(2, 2), eye[None])
    with pytest.raises(ValueError, match="symmetric"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianMixture(torch.zeros(1, 2), torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))
    with pytest.raises(ValueError, match="non-negative"):
        GaussianMixture(torch.zeros(2, 2), eye.expand(2, 2, 2), [1.0, -0.5])
    with pytest.raises(ValueError, match="positive sum"):
        GaussianMixture(torch.zeros(2, 2), eye.expand(2, 2, 2), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"weights must have shape \[K\]"):
        GaussianMixture(torch.zeros(2, 2), eye.expand(2, 2, 2), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="high > low"):
        Box([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        Box([0.0, 0.0], [1.0, 1.0, 1.0])
