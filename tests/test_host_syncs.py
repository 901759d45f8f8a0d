"""Host synchronisations in the SMC inner loop (issue 11): on a GPU every read of a device tensor's value on the host
(`.item()`, `float(t)`, `int(t)`, `bool(t)`, `.tolist()`, `.numpy()`, `.nonzero()`) stalls the stream until the
queued kernels finish. Counted here on CPU by wrapping those Tensor methods, per SMC level, as the difference between
a run of 12 and of 4 levels (setup and the final summary cancel), with each read attributed to its fkdiff source line.

Measured (tiny class-conditional image student, 16 particles), reads per level: without MCMC 12.9 at first, then 2.0,
now 1.0; with HMC 19.5, then 4.6, now 1.0. The one read left per level:
- smc/weights.py: the level's scalars together (ESS: the resampling decision; log-normaliser and the previous one,
  for log Z; conditional ESS; counts of invalid / alive particles, which also decide the all-dead error).
What no longer reads: the resampler's input check (the engine calls it with check=False: its Weights are sanitised and
not all dead, known from that one read; called directly the resamplers still check); the adapted MCMC kernel's step
size (the median), log c and its adaptation from the mean acceptance, and the move's divergent / non-finite counts
(0-d device tensors, fkdiff.mcmc; only c = exp(log c) is taken on the host, with math.exp as before, from log c read
along with the level's weights); the FK model's check for moved positions it never evaluated (skipped for kernels
that return only positions they evaluated, `Kernel.returns_evaluated`: every fkdiff.mcmc kernel).
smc/core.py `_degeneracy_messages` reads once per run after the loop (it differs between the two runs, so it shows
here). The per-level acceptance, step size and unique-ancestor counts stay on the device and reach the host once,
after the loop."""

import math
import types


import collections
import contextlib
import traceback

import pytest
import torch

from fkdiff import mcmc, smc
from fkdiff.compose import conditioned
from fkdiff.energy import build_student

READS = ["item", "__float__", "__int__", "__bool__", "tolist", "numpy", "nonzero"]


@contextlib.contextmanager
def count_host_reads():
    """Counter of (method, 'fkdiff file:function:line') for every host read of a tensor value made from fkdiff code."""
    counts = collections.Counter()
    saved = {}

    def wrap(name, f):
        def g(self, *a, **k):
            frames = [fr for fr in traceback.extract_stack()[:-1] if "/fkdiff/" in fr.filename]
            if frames:
                fr = frames[-1]
                counts[(name, f"{fr.filename.rsplit('/fkdiff/', 1)[1]}:{fr.name}:{fr.lineno}")] += 1
            return f(self, *a, **k)
        return g

    for name in READS:
        saved[name] = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, wrap(name, saved[name]))
    try:
        yield counts
    finally:
        for name, f in saved.items():
            setattr(torch.Tensor, name, f)


def _per_level(target, shape, kernel, **kw):
    """(reads per level by (method, site), the 12-level run's result)."""
    def run(levels):
        with count_host_reads() as c:
            res = smc.sample(target, 16, shape=shape, num_levels=levels, sigma_max=5.0, sigma_min=0.05, mcmc=kernel,
                             generator=torch.Generator().manual_seed(0), **kw)
        return c, res
    (a, _), (b, res) = run(4), run(12)
    return {k: (b[k] - a[k]) / 8 for k in set(a) | set(b) if b[k] != a[k]}, res


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    st = build_student((3, 8, 8), 0.5, "l2", backbone={"kind": "unet", "channels": [4], "emb_dim": 8},
                       cond_kind="class", num_classes=3)
    return conditioned(st, 1)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kernel", [None, "hmc"])
def test_one_read_of_the_weights_per_level(student, kernel):
    """No host read per level in the evaluation path (student energy/score in chunks of max_batch, sigma handling,
    the FK model's moves and caches), in resampling (the runs resample) nor in the adapted kernel (step size,
    adaptation, counts): each level reads its weights' scalars once (ESS, log Z terms, counts together)."""
    per, res = _per_level(student, (3, 8, 8), mcmc.build({"kind": kernel, "num_leapfrog": 3}) if kernel else None,
                          max_batch=8)
    assert res.resampled.sum() >= 4  # the check-free resampling path runs
    sites = collections.Counter()
    for (_, where), v in per.items():
        sites[where.rsplit(":", 1)[0]] += v
    sites.pop("smc/core.py:_degeneracy_messages", None)  # after the loop (differs between the 4- and 12-level runs)
    assert dict(sites) == {"smc/weights.py:__init__": 1.0}, f"host reads per level: {sorted(per.items())}"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_only_the_ess_decision_syncs(student):
    per, res = _per_level(student, (3, 8, 8), mcmc.build({"kind": "hmc", "num_leapfrog": 3}))
    assert sum(per.values()) <= 1.0, f"{sum(per.values()):.1f} host reads per level: {sorted(per.items())}"
    assert res.step_size.shape == (12,) and torch.isfinite(res.step_size).all() and (res.step_size > 0).all()


class _Shift:
    """A user's rejuvenation move x -> x + 0.01 that, unless `evaluates`, never calls logdensity_fn (so the FK model
    must evaluate the moved positions itself); with `evaluates` it evaluates them and says so (returns_evaluated)."""

    def __init__(self, evaluates: bool):
        self.evaluates = self.returns_evaluated = evaluates

    def __call__(self, x, logdensity_fn, *, generator, state, logp, grad):
        x_new = x + 0.01
        if self.evaluates:
            logdensity_fn(x_new)
        info = types.SimpleNamespace(acceptance=torch.ones(x.shape[0], dtype=torch.float64),
                                     num_evals=int(self.evaluates), step_size=math.nan)
        return x_new, state, info


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_positions_never_evaluated_are_evaluated_unless_the_kernel_returns_only_evaluated_ones(student):
    """The FK model's rebuild after a move: a kernel without `returns_evaluated` may return positions it never
    evaluated, which are then evaluated (counted in num_evals); one with it skips that check (no host read) and
    gets the same particles from its own evaluations: the same samples, weights and log Z."""
    runs = {}
    for evaluates in (False, True):
        with count_host_reads() as c:
            runs[evaluates] = smc.sample(student, 16, shape=(3, 8, 8), num_levels=4, sigma_max=5.0, sigma_min=0.05,
                                         mcmc=_Shift(evaluates), generator=torch.Generator().manual_seed(0))
        assert any(k[1].startswith("smc/diffusion_fk.py:particles_at") for k in c) != evaluates
    a, b = runs[False], runs[True]
    assert torch.equal(a.samples, b.samples) and torch.equal(a.log_weights, b.log_weights) and a.log_Z == b.log_Z
    assert torch.equal(a.num_evals, b.num_evals)  # the one evaluation per moved particle, counted either way


def test_a_bound_label_is_checked_once_on_the_host(student):
    """conditioned(model, y) checks y against the model's classes when bound; the evaluations then skip the per-call
    range check and give the same energies as labels passed explicitly (checked on the device)."""
    model = student.model
    with pytest.raises(ValueError, match=r"class label 3 outside \[0, 3\)"):
        conditioned(model, 3)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with count_host_reads() as c:
        e = student.energy(x, 0.7)
    assert not [k for k in c if k[1].startswith("nets.py")]
    assert torch.equal(e, model.energy(x, 0.7, torch.full((4,), 1)))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 3\)"):
        model.energy(x, 0.7, torch.full((4,), 3))


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_smc_on_cuda_matches_cpu(student):
    """The same SMC run on CPU and on a GPU (noise drawn on the CPU through the randn seam, no resampling so that no
    device generator decides): samples and log Z within float tolerance (float64 particles, float32 networks)."""
    import copy

    def cpu_randn(gen):
        return lambda shape, generator=None, dtype=None, device=None: torch.randn(
            shape, generator=gen, dtype=dtype).to(device)

    runs = {}
    for device in ("cpu", "cuda"):
        target = conditioned(copy.deepcopy(student.model).to(device), 1)
        runs[device] = smc.sample(target, 64, shape=(3, 8, 8), num_levels=8, sigma_max=5.0, sigma_min=0.05,
                                  ess_threshold=0.0, generator=torch.Generator(device=device).manual_seed(0),
                                  device=device, randn=cpu_randn(torch.Generator().manual_seed(1)))
    a, b = runs["cpu"], runs["cuda"]
    torch.testing.assert_close(b.samples.cpu(), a.samples, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b.log_weights.cpu(), a.log_weights, rtol=1e-3, atol=1e-3)
    assert abs(b.log_Z - a.log_Z) < 1e-3
