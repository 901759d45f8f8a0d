"""Resampling schemes and the log-space weights helper (fkdiff.smc.resampling / fkdiff.smc.weights)."""

import math

import pytest
import torch

from fkdiff.smc import RESAMPLERS, Weights, get_resampler
from fkdiff.smc.resampling import inverse_cdf

SCHEMES = sorted(RESAMPLERS)



def _offspring(scheme, log_w, num, reps, gen):
    """Offspring counts `[reps, N]` from `reps` independent resamplings."""
    fn = RESAMPLERS[scheme]
    n = log_w.numel()
    return torch.stack([torch.bincount(fn(log_w, num, gen), minlength=n) for _ in range(reps)]).double()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num", [12, 25])
def test_unbiased_offspring(scheme, num, gen):
    # weights with zeros at the ends and in the middle, tiny and large ones
    w = torch.tensor([0.0, 0.31, 0.02, 0.0, 0.17, 0.004, 0.25, 0.0, 0.126, 0.12, 0.0], dtype=torch.float64)
    log_w = w.log() + 3.7  # unnormalised on purpose
    reps = 1500
    counts = _offspring(scheme, log_w, num, reps, gen)
    assert (counts.sum(1) == num).all()
    expected = num * w / w.sum()
    mean = counts.mean(0)
    # Monte Carlo standard error of the mean offspring count of particle n: sd_n / sqrt(reps). The sd is estimated
    # from the replications; it is 0 where a scheme is deterministic for that particle (then mean must equal exactly,
    # up to float rounding, hence the 1e-9). |z| <= 4.5 has probability < 1e-5 per particle under unbiasedness; a
    # biased scheme (e.g. rounding num W down) is off by O(0.1-0.5) here, i.e. > 20 standard errors at reps = 1500.
    se = counts.std(0) / math.sqrt(reps)
    assert ((mean - expected).abs() <= 4.5 * se + 1e-9).all(), (scheme, mean, expected, se)
    # zero-weight particles are never selected
    assert (counts[:, w == 0] == 0).all()


def test_detects_bias():
    """The unbiasedness check above has power: a scheme that always floors num W fails it."""
    w = torch.tensor([0.31, 0.02, 0.17, 0.25, 0.25], dtype=torch.float64)
    floored = torch.floor(12 * w)
    assert (floored - 12 * w).abs().max() > 0.2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_zero_weight_never_chosen_float32(scheme, gen):
    # float32 log-weights whose exp underflows to 0 in float32 (all alive weights ~ e^-200): promoted to float64
    lw = torch.tensor([-200.0, -math.inf, -200.0, -math.inf, -201.0, -math.inf], dtype=torch.float32)
    anc = torch.cat([RESAMPLERS[scheme](lw, 50, gen) for _ in range(200)])
    assert set(anc.unique().tolist()) <= {0, 2, 4}
    assert set(anc.unique().tolist()) == {0, 2, 4}  # all alive ones do get picked over 10^4 draws
    # huge float32 log-weights (exp overflows in float32) and trailing zero weights
    lw = torch.tensor([-math.inf, 300.0, 299.0, -math.inf, -math.inf], dtype=torch.float32)
    anc = torch.cat([RESAMPLERS[scheme](lw, 64, gen) for _ in range(100)])
    assert set(anc.unique().tolist()) == {1, 2}


def test_inverse_cdf_boundaries():
    # u exactly on a cumulative-sum boundary, u = 0, and the largest double below 1: zero weights never returned
    w = torch.tensor([0.0, 0.25, 0.0, 0.25, 0.0, 0.5, 0.0, 0.0], dtype=torch.float64)
    top = torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    u = torch.stack([torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.25, dtype=torch.float64),
                     torch.tensor(0.5, dtype=torch.float64), top])
    anc = inverse_cdf(u, w)
    assert anc.tolist() == [1, 3, 5, 5]
    # rounding: weights whose float cumsum falls short of their exact sum, u at the very top
    w = torch.full((100_003,), 1e-5, dtype=torch.float64)
    w[-3:] = 0.0
    anc = inverse_cdf(top.reshape(1), w)
    assert int(anc) == 100_003 - 4  # the last positive-weight particle


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_given_generator(scheme):
    lw = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = RESAMPLERS[scheme](lw, 40, torch.Generator().manual_seed(7))
    b = RESAMPLERS[scheme](lw, 40, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.dtype == torch.int64 and a.shape == (40,)


def test_registry_and_errors():
    assert get_resampler("systematic") is RESAMPLERS["systematic"]
    with pytest.raises(KeyError, match="available"):
        get_resampler("nope")
    with pytest.raises(ValueError, match="every weight is zero"):
        RESAMPLERS["multinomial"](torch.full((3,), -math.inf), 3, None)
    with pytest.raises(ValueError, match="NaN"):
        RESAMPLERS["systematic"](torch.tensor([0.0, math.nan]), 3, None)


@pytest.mark.parametrize("scheme", sorted(RESAMPLERS))
def test_check_false_skips_only_the_input_check(scheme):
    """`check=False` (what the SMC engine uses on its sanitised weights, whose number alive it has already read):
    the same ancestors from the same draws, without the host read of the validity check; called directly (the
    default) the resamplers still reject NaN/+inf and all -inf input."""
    from test_host_syncs import count_host_reads

    lw = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lw[3] = -math.inf
    a = RESAMPLERS[scheme](lw, 40, torch.Generator().manual_seed(7))
    with count_host_reads() as c:
        b = get_resampler(scheme, check=False)(lw, 40, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not [k for k in c if k[1].startswith("smc/resampling.py:_unnormalised")]
    assert get_resampler(scheme) is RESAMPLERS[scheme]
    custom = lambda lw, num, generator: torch.zeros(num, dtype=torch.int64)  # noqa: E731
    assert get_resampler(custom, check=False) is custom  # a user's resampler is called as it is
    with pytest.raises(ValueError, match="every weight is zero"):
        RESAMPLERS[scheme](torch.full((3,), -math.inf), 3, None)
    with pytest.raises(ValueError, match="NaN"):
        RESAMPLERS[scheme](torch.tensor([0.0, math.inf]), 3, None)


def test_weights_helper():
    lw = torch.tensor([0.0, math.log(3.0), math.nan, math.inf, -math.inf], dtype=torch.float32)
    w = Weights(lw)
    assert w.num_invalid == 2 and w.num_alive == 2 and not w.all_dead
    assert w.lw.dtype == torch.float64
    assert torch.allclose(w.W, torch.tensor([0.25, 0.75, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert w.ess == pytest.approx(1.0 / (0.25**2 + 0.75**2), rel=1e-6)  # log(3) rounded to float32
    assert w.log_mean == pytest.approx(math.log(4.0 / 5.0), rel=1e-6)
    assert torch.isfinite(w.log_W[:2]).all() and (w.log_W[2:] == -math.inf).all()
    # huge log-weights: no overflow
    w = Weights(torch.tensor([1000.0, 1000.0, 999.0], dtype=torch.float64))
    e = math.exp(-1.0)
    assert w.ess == pytest.approx((2 + e) ** 2 / (2 + e * e), rel=1e-12)
    assert w.log_mean == pytest.approx(1000.0 + math.log((2 + e) / 3), rel=1e-12)
    dead = Weights(torch.tensor([math.nan, -math.inf]))
    assert dead.all_dead and dead.ess == 0.0 and dead.num_invalid == 1 and torch.isfinite(dead.W).all()
