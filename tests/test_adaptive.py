"""Budget-driven SMC (fkdiff.smc.adaptive), the island log Z error bar (fkdiff.smc.Islands) and the conditional ESS
collector, against closed-form answers. Tolerances as in tests/test_smc.py: 4.5 standard deviations of a spread
measured over seeds (noted at each check)."""

import math
import warnings

import pytest
import torch

from fkdiff import compose, smc
from fkdiff.smc.adaptive import low_temperature_formulation, place_levels
from fkdiff.smc.core import _cess
from fkdiff.smc.islands import island_disagreement
from fkdiff.smc.weights import Weights
from teachers.analytic import GaussianMixture, gmm_product
from teachers.presets import gaussian, ring8

SMIN = 0.002


def _product():
    a = gaussian([1.0, 0.0], [[0.5, 0.2], [0.2, 0.3]])
    b = gaussian([0.0, 1.0], 0.4)
    return compose.product(a, b), gmm_product(a, b, SMIN)[1]


# -- the level placement ---------------------------------------------------------------------------------------------
def test_place_levels_follows_the_measured_degeneracy():
    pilot = smc.noise_levels(9, 80.0, SMIN)
    flat = place_levels(pilot, torch.full((9,), 0.9), 33)
    assert flat[0] == 80.0 and flat[-1] == SMIN and bool((flat[1:] < flat[:-1]).all())
    # equal degeneracy everywhere: every pilot interval gets the same number of levels (4 of 32 intervals each),
    # equally spaced in log sigma
    assert torch.allclose(flat[::4], pilot, rtol=1e-12)
    assert torch.allclose(flat[1:5].log().diff(), torch.full((3,), float(pilot[:2].log().diff()) / 4, dtype=torch.float64), rtol=1e-9)
    # all the degeneracy in pilot interval 6 (sigma 6-1 -> 6): alpha = 0.3 of the levels stay spread, 0.7 go there
    cess = torch.ones(9)
    cess[6] = 0.5
    peaked = place_levels(pilot, cess, 101, alpha=0.3)
    inside = int(((peaked <= pilot[5]) & (peaked >= pilot[6])).sum())
    assert 0.7 * 100 < inside <= (0.7 + 0.3 / 8) * 100 + 2, inside
    assert bool((peaked[1:] < peaked[:-1]).all())
    with pytest.raises(ValueError):
        place_levels(pilot, cess, 10, alpha=0.0)


def test_conditional_ess():
    w = torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    assert _cess(w, torch.zeros(3, dtype=torch.float64)) == pytest.approx(1.0)
    g = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ws, gs = w.exp(), g.exp()
    assert _cess(w, g) == pytest.approx(float((ws * gs).sum() ** 2 / (ws * gs**2).sum()), rel=1e-12)
    # a NaN increment (an invalid particle) is G = 0: the other particles keep 0.75 of the weight, G = 1 on them
    assert _cess(w, torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64)) == pytest.approx(0.75)


# -- the island estimator --------------------------------------------------------------------------------------------
def test_island_variance_formula():
    isl = smc.Islands(4)
    eve = torch.arange(8)
    equal = Weights(torch.zeros(8, dtype=torch.float64))
    assert isl.log_Z_relative_variance(equal, eve, 3) == (pytest.approx(0.0, abs=1e-30), 3.0)
    # islands holding 0.1, 0.2, 0.3, 0.4 of the weight: Z_r / Z_bar = 0.4, 0.8, 1.2, 1.6
    lw = torch.log(torch.tensor([0.05, 0.05, 0.1, 0.1, 0.15, 0.15, 0.2, 0.2], dtype=torch.float64))
    v, dof = isl.log_Z_relative_variance(Weights(lw), eve, 3)
    assert v == pytest.approx((0.36 + 0.04 + 0.04 + 0.36) / 12) and dof == 3.0
    with pytest.raises(ValueError):
        smc.Islands(1)
    with pytest.raises(ValueError):
        isl.local_size(10)


def test_islands_resample_within_island_and_keep_their_weight():
    isl = smc.Islands(2)
    lw = torch.tensor([0.0, -50.0, 0.0, 0.0], dtype=torch.float64)  # island 0 degenerate, island 1 not
    anc, after = isl.resample(Weights(lw), smc.systematic, 0.6, torch.Generator().manual_seed(0))  # ESS 1 < 1.2
    assert anc.tolist() == [0, 0, 2, 3]
    assert after[:2].tolist() == pytest.approx([math.log(0.5)] * 2)  # island 0's total weight, shared equally
    assert after[2:].tolist() == [0.0, 0.0]
    assert torch.logsumexp(after, 0) == pytest.approx(float(torch.logsumexp(lw, 0)))
    assert isl.resample(Weights(torch.zeros(4, dtype=torch.float64)), smc.systematic, 0.5, None) == (None, None)


def test_islands_never_exchange_particles():
    seen = []

    class Recording(smc.Islands):
        def resample(self, w, resampler, ess_threshold, generator):
            anc, after = super().resample(w, resampler, ess_threshold, generator)
            seen.append(anc)
            return anc, after

    target, _ = _product()
    res = smc.sample(target, 64, shape=(2,), num_levels=20, sigma_max=20.0, sigma_min=SMIN, ess_threshold=1.0,
                     generator=torch.Generator().manual_seed(0), population=Recording(4))
    rows = torch.arange(64) // 16
    assert len(seen) == 20 and all(a is not None and bool((a // 16 == rows).all()) for a in seen)
    assert res.log_Z_dof == 3.0 and res.log_Z_var > 0


def test_island_disagreement_flags_islands_that_put_the_mass_in_different_places():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8 * 500, 2, generator=g, dtype=torch.float64)
    lw = torch.zeros(8 * 500, dtype=torch.float64)
    # same law in every island: chi^2_14 / 14 (two coordinates, 7 dof each); its 0.9999 quantile is 3.0
    assert island_disagreement(x, lw, 8) < 3.0
    shifted = x.clone()
    shifted[: 4 * 500, 0] += 1.0  # half of the islands found a mode one unit to the right
    # expected (Var(1,1,1,1,0,0,0,0) / (1 / 500) + 1) / 2 = (0.286 * 500 + 1) / 2 = 72
    assert island_disagreement(shifted, lw, 8) > 40.0
    lw[:500] = -math.inf  # an island without weight
    assert math.isnan(island_disagreement(x, lw, 8))


def test_budget_warns_when_the_islands_disagree():
    # ring8 x a two-component GMM at budget=100, N = 512 (benchmarks/smc_accuracy.py product_gmm, seed 5 of the
    # fresh-seed rows accuracy_fresh_seeds.json: mode TV 0.20 against a floor of 0.06, islands disagree 46.7x)
    stds = torch.tensor([0.3, 0.2], dtype=torch.float64)
    two = GaussianMixture(torch.tensor([[0.35, 0.35], [-0.35, -0.35]], dtype=torch.float64),
                          stds[:, None, None] ** 2 * torch.eye(2, dtype=torch.float64))
    with pytest.warns(smc.SMCDegeneracyWarning, match="islands disagree"):
        res = smc.sample(compose.product(ring8(), two), 512, shape=(2,), budget=100, sigma_max=80.0, sigma_min=SMIN,
                         generator=torch.Generator().manual_seed(5))
    assert res.plan["island_disagreement"] > 3.5 and any("islands disagree" in w for w in res.warnings)


# -- the budget --------------------------------------------------------------------------------------------------
def test_budget_is_respected_and_recorded():
    target, log_z = _product()
    res = smc.sample(target, 1024, shape=(2,), budget=300, generator=torch.Generator().manual_seed(0))
    plan = res.plan
    assert plan["budget"] == 300 and 0.9 * 300 <= plan["used_evaluations"] <= 300
    assert plan["used_evaluations"] == pytest.approx(res.nfe + plan["pilot"]["evaluations_per_particle"])
    assert plan["num_levels"] == len(res.sigmas) and plan["schedule"].startswith("adaptive")
    assert plan["estimator"] == "islands(4)" and res.log_Z_dof == 3.0
    assert float(res.sigmas[0]) == 80.0 and float(res.sigmas[-1]) == SMIN
    assert res.levels["cess"] is not None and bool((res.cess > 0).all() and (res.cess <= 1 + 1e-12).all())
    # spread of log Z over 50 seeds of this call (benchmarks/smc_coverage.py, gauss2d islands): sd 0.18; 4.5 sd
    assert abs(res.log_Z - log_z) < 4.5 * 0.18, (res.log_Z, log_z)
    assert res.plan["island_disagreement"] < 3.5  # below the warning threshold (adaptive.DEFAULTS)
    # the plan keeps the ancestral proposal variance: Euler won on the products / negation / bounds at B <= 300 but
    # lost on p^4 (log Z off by 4.5 / 2.3 nats at B = 300 / 1000) and on the 16-D product at B = 1000 (README)
    assert plan["proposal_variance"] == "ancestral"
    with pytest.raises(ValueError, match="budget"):
        smc.sample(target, 64, shape=(2,), budget=20)
    with pytest.raises(TypeError, match="not both"):
        smc.sample(target, 64, shape=(2,), budget=100, num_levels=10, sigma_max=80.0, sigma_min=SMIN)


def test_budget_low_temperature_runs_twisted_and_explicit_sampler_mode_warns():
    base = ring8()
    t = compose.tempered(base, 3.0)
    assert low_temperature_formulation(t)[0] is base and low_temperature_formulation(compose.tempered(base, 0.5)) is None
    res = smc.sample(t, 256, shape=(2,), budget=200, generator=torch.Generator().manual_seed(0))
    # 200 evaluations at 4 per level: 50 levels, below the 150 from which the plan runs the exact sampler weights
    assert res.plan["mode"] == "twisted" and "LowTemperature(3, ramp=3)" in res.plan["formulation"]
    assert res.plan["used_evaluations"] <= 200
    with pytest.warns(UserWarning, match="LowTemperature"):
        smc.sample(t, 64, shape=(2,), num_levels=5, sigma_max=80.0, sigma_min=SMIN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        smc.sample(t, 64, shape=(2,), num_levels=5, sigma_max=80.0, sigma_min=SMIN, mode="twisted")


def test_budget_low_temperature_log_z_has_no_twisted_discretisation_bias():
    """p^2 of 0.7 N(-e/2, 0.2^2 I) + 0.3 N(e/2, 0.2^2 I) in 32-D (closed form: log Z = log(0.7^2 + 0.3^2)
    - 16 log(2 pi (0.2^2 + sigma_min^2)) - 16 log 2), N = 256, budget=1000. The former plan (twisted LowTemperature,
    HMC(4, 3), 74 levels) was off by +1.16 / +2.01 / +1.49 nats on seeds 0-2: twisted weights w_t / w_{t-1} are exact
    only when the proposal's marginals are p_sigma, and the MCMC moves target p_sigma * w_t, so the reverse kernel's
    discretisation error (a missing term: the base model's kernel ratio) is never corrected and grows with the
    dimension. The plan now runs the exact SMC-sampler weights on the same path (>= 150 levels): errors over seeds 0-7
    -0.05 / -0.09 / -0.39 / -0.33 / -0.06 / -0.40 / -0.06 / -0.04 (sd 0.16; tolerance 4.5 sd)."""
    d = 32
    means = torch.zeros(2, d, dtype=torch.float64)
    means[0, 0], means[1, 0] = -0.5, 0.5
    covs = 0.04 * torch.eye(d, dtype=torch.float64).expand(2, d, d).clone()
    base = GaussianMixture(means, covs, torch.tensor([0.7, 0.3], dtype=torch.float64))
    log_z = math.log(0.7**2 + 0.3**2) - d / 2 * math.log(2 * math.pi * (0.04 + SMIN**2)) - d / 2 * math.log(2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = smc.sample(compose.tempered(base, 2.0), 256, shape=(d,), budget=1000,
                         generator=torch.Generator().manual_seed(0))
    assert abs(res.log_Z - log_z) < 4.5 * 0.16, (res.log_Z, log_z)
    assert res.plan["mode"] == "sampler" and "ramp=3" in res.plan["formulation"], res.plan["formulation"]


def test_low_temperature_ramp():
    lt = smc.LowTemperature(3.0, ramp=3.0)
    e = torch.tensor([1.0, 2.0], dtype=torch.float64)
    for t, lam in ((0, 0.0), (2, 0.125), (4, 1.0)):
        level = smc.Level(index=t, num_levels=5, sigma=1.0, final=t == 4, energy=e)
        assert torch.allclose(lt.log_potential(torch.zeros(2, 1), level), -2.0 * lam * e)
    with pytest.raises(ValueError, match="ramp"):
        smc.LowTemperature(2.0, ramp=0.0)
    with pytest.raises(ValueError, match="not both"):
        smc.LowTemperature(2.0, lambda level: 1.0, ramp=2.0)


@pytest.mark.slow
def test_island_interval_coverage():
    """Coverage of the reported 95% interval over 50 seeds (50-99) of the budget default, 4 islands of 256
    (benchmarks/smc_coverage.py measured 49/50 on these seeds; 8 islands of 128, the earlier default, covered 43/50 on
    seeds 0-49, Lee-Whiteley 46/50). The bound 45/50 = 90% is the issue's lower target: it fails for the 8-island
    interval's 86%."""
    target, log_z = _product()
    covered = 0
    for seed in range(50, 100):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = smc.sample(target, 1024, shape=(2,), budget=300, generator=torch.Generator().manual_seed(seed))
        lo, hi = res.log_Z_ci(0.95)
        covered += lo <= log_z <= hi
    assert covered >= 45, covered


def test_overhead_benchmark_runs_and_writes_its_table(tmp_path):
    from benchmark_modules import load_benchmark

    bench = load_benchmark("smc_adaptive_overhead")
    rows, ratio = bench.main(["--particles", "32", "--budget", "60", "--repeats", "1", "--out", str(tmp_path)])
    assert set(rows) == {"fixed", "planned", "same"} and ratio > 0
    assert all(0.0 < r["target_fraction"] < 1.0 for r in rows.values())
    assert (tmp_path / "overhead.json").is_file() and (tmp_path / "overhead.md").is_file()
    net = bench.TARGETS["mlp"]()  # --target mlp: two network energies, one energy and score per particle
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    energy, score = net.energy_and_score(x, torch.full((5,), 0.5))
    assert energy.shape == (5,) and score.shape == (5, 2) and bool(torch.isfinite(score).all())
