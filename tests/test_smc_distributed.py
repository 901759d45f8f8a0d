"""Multi-process SMC (fkdiff.smc.distributed) on 2 gloo CPU ranks, against a single process and exact answers.

The distributed scenarios run once per session in two worker processes (this file run as a script through
`subprocess.run`, which spawns the ranks with torch.multiprocessing; a fresh TCP port each time; every collective
bounded by the process group's timeout and the subprocess by a wall-clock timeout, so nothing hangs). Each worker
records its results per scenario (or the error it raised) and the tests below judge them; single-process references
run in the test process.

Tolerances: the GMM product is `case_product_gmms` of tests/test_smc.py (same target, N, levels, HMC), judged with
that file's rule: log Z within Z_TOL = 4.5 times the measured sd over seeds (0.10 at N = 1000), mode masses within
4.5 sqrt(INFLATION p (1 - p) / N) with INFLATION = 8, means within 4.5 sqrt(INFLATION var / N).
Island mode runs two independent 500-particle SMCs: each island's log Z has sd about 0.10 sqrt(2) (sd scales as
N^-1/2 for SMC), which bounds the sd of the combined estimate; the bound is 4.5 times that.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fkdiff import compose, smc
from fkdiff.diffusion import sigma_schedule
from fkdiff.mcmc import HMC, RWM
from teachers.analytic import GaussianMixture, gmm_product
from teachers.presets import ring8

WORLD = 2
Z_TOL, INFLATION, LOG_Z_SD_GMM = 4.5, 8.0, 0.10  # tests/test_smc.py: Z_TOL, INFLATION, LOG_Z_SD["product_gmms"]
SMIN = 0.002
N_EXACT, T_EXACT, NOISE_SEED, RESAMPLE_SEED = 128, 50, 11, 7


# --------------------------------------------------------------------------------------------------------------------
# shared by the workers and the single-process references


def _gmm_b():
    return GaussianMixture([[0.7, 0.7], [-1.0, 0.0]], torch.stack([0.3 * torch.eye(2), 0.2 * torch.eye(2)]).double(),
                           [0.5, 0.5])


def _global_randn(rank: int = 0, world: int = 1):
    """The noise seam (DiffusionFK's `randn`): noise drawn for all `world * n` particles from one generator (seeded
    alike on every rank) and sliced to this rank's rows, so the split over ranks is invisible: an R-rank run must
    reproduce the 1-rank run exactly."""
    noise = torch.Generator().manual_seed(NOISE_SEED)

    def randn(size, *, generator=None, dtype=None, device=None):
        n = size[0]
        eps = torch.randn((n * world, *size[1:]), generator=noise, dtype=dtype, device=device)
        return eps[rank * n:(rank + 1) * n]

    return randn


def _exact_fk(rank: int = 0, world: int = 1) -> smc.DiffusionFK:
    target = compose.product(ring8(radius=1.0, std=0.15), _gmm_b())
    sigmas = sigma_schedule(T_EXACT, SMIN, 20.0, dtype=torch.float64)
    # a hard cut below sigma = 1 kills some particles (weight zero) so the dead-particle paths are exercised too
    cut = lambda x, s: torch.where((x[:, 0] > 0.9) & (torch.as_tensor(s) < 1.0), -math.inf, 0.0).double()  # noqa
    return smc.DiffusionFK(target, sigmas, shape=(2,), potentials=[cut], randn=_global_randn(rank, world))


class _DeathFK:
    """Random walk x_t = x_{t-1} + 0.3 eps with log G_t = -x_t^2 / 2, except that at `kill_level` every particle of the
    ranks in `kill_ranks` gets weight zero."""

    T = 6

    def __init__(self, rank: int, kill_level: int, kill_ranks: tuple):
        self.rank, self.kill_level, self.kill_ranks = rank, kill_level, kill_ranks

    def M0(self, num, generator):
        return smc.Particles(torch.randn(num, 1, generator=generator, dtype=torch.float64))

    def M(self, t, prev, generator):
        return smc.Particles(prev.x + 0.3 * torch.randn(prev.x.shape, generator=generator, dtype=torch.float64))

    def logG(self, t, prev, cur):
        lg = -0.5 * cur.x[:, 0] ** 2
        if t == self.kill_level and self.rank in self.kill_ranks:
            lg = torch.full_like(lg, -math.inf)
        return lg


def _gmm_kwargs():
    return dict(shape=(2,), num_levels=200, sigma_max=80.0, sigma_min=SMIN, mcmc=HMC(num_steps=1, num_leapfrog=3),
                final_denoise=False)


# --------------------------------------------------------------------------------------------------------------------
# the worker (one per rank)


def _scenario_exchange(rank):
    from fkdiff.smc.distributed import ShardedPopulation

    pop = ShardedPopulation()
    g = torch.Generator().manual_seed(0)  # same global data on every rank
    n_all = 64
    x = torch.randn(n_all, 3, generator=g, dtype=torch.float32)
    e = torch.randn(n_all, generator=g, dtype=torch.float64)
    bad = torch.rand(n_all, generator=g) < 0.3
    lw = torch.randn(n_all, generator=g, dtype=torch.float64) * 2.0
    lw[::5] = -math.inf
    shared = torch.Generator().manual_seed(123)
    cases = {
        "systematic": smc.systematic(lw, n_all, shared),
        "multinomial": smc.multinomial(lw, n_all, shared),
        "one_parent": torch.full((n_all,), 37, dtype=torch.int64),  # everyone descends from one of rank 1's rows
        "identity": torch.arange(n_all),  # nothing moves
    }
    out = {}
    for name, anc in cases.items():
        before = pop.rows_received
        part = smc.Particles(pop.shard(x), {"energy": pop.shard(e), "bad": pop.shard(bad), "none": None})
        moved, eve = pop.select(part, pop.shard(torch.arange(n_all)), anc)
        out[name] = dict(anc=anc, x=moved.x, energy=moved["energy"], bad=moved["bad"], none=moved["none"], eve=eve,
                         received=pop.rows_received - before)
    out["global"] = dict(x=x, energy=e, bad=bad)
    return out


def _scenario_exact(rank):
    from fkdiff.smc import distributed

    res = distributed.run_smc(_exact_fk(rank, WORLD), N_EXACT, generator=torch.Generator().manual_seed(999 + rank),
                              resample_generator=torch.Generator().manual_seed(RESAMPLE_SEED))
    return _record(res)


def _record(res):
    return {k: getattr(res, k) for k in ("samples", "log_weights", "log_Z", "log_Z_var", "ess", "resampled",
                                         "unique_ancestors", "num_alive", "num_invalid", "log_Z_increments",
                                         "acceptance", "step_size", "num_eves", "all_samples", "all_log_weights",
                                         "island_log_Z", "offset", "rows_exchanged")}


def _scenario_gmm(rank, island):
    from fkdiff.smc import distributed

    target = compose.product(ring8(radius=1.0, std=0.15), _gmm_b())
    res = distributed.sample(target, 1000, generator=torch.Generator().manual_seed(1234), island=island,
                             **_gmm_kwargs())
    out = _record(res)
    out["mean"] = res.mean()
    return out


def _scenario_death(rank):
    from fkdiff.smc import distributed

    def run(kill_ranks):
        return distributed.run_smc(_DeathFK(rank, 3, kill_ranks), 200,
                                   generator=torch.Generator().manual_seed(5 + rank),
                                   resample_generator=torch.Generator().manual_seed(17))

    out = {"one_rank": _record(run((1,)))}
    try:
        run((0, 1))
        out["all"] = "no error"
    except smc.SMCError as err:
        out["all"] = f"SMCError: {err}"
    try:
        distributed.run_smc(_DeathFK(rank, 3, ()), 201, generator=torch.Generator(),
                            resample_generator=torch.Generator())
        out["indivisible"] = "no error"
    except ValueError as err:
        out["indivisible"] = f"ValueError: {err}"
    return out


SCENARIOS = {"exchange": _scenario_exchange, "exact": _scenario_exact, "gmm": lambda r: _scenario_gmm(r, False),
             "island": lambda r: _scenario_gmm(r, True), "death": _scenario_death}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    results = {}
    try:
        for name, fn in SCENARIOS.items():
            try:
                results[name] = fn(rank)
            except Exception as err:  # recorded and reported by the test that reads this scenario
                results[name] = {"error": f"{type(err).__name__}: {err}"}
    finally:
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # launched by the `ranks` fixture: python tests/test_smc_distributed.py OUT_DIR
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), sys.argv[1]), nprocs=WORLD, join=True)
    sys.exit(0)


# --------------------------------------------------------------------------------------------------------------------
# the tests



@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{scenario: [rank 0 result, rank 1 result]} from one 2-rank run of every scenario."""
    out = tmp_path_factory.mktemp("ranks")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(2):  # a port taken between choosing and binding it: try once more
        proc = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=150,
                              env=env, cwd=Path(__file__).resolve().parents[1])
        if proc.returncode == 0 or "EADDRINUSE" not in proc.stderr + proc.stdout or attempt:
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {name: [pr[name] for pr in per_rank] for name in SCENARIOS}


def _ok(rs):
    for r, res in enumerate(rs):
        assert not (isinstance(res, dict) and "error" in res), f"rank {r}: {res['error']}"
    return rs


def test_exchange_moves_exactly_the_ancestors(ranks):
    rs = _ok(ranks["exchange"])
    glob = rs[0]["global"]
    n = 64 // WORLD
    for name in ("systematic", "multinomial", "one_parent", "identity"):
        anc = rs[0][name]["anc"]
        assert torch.equal(anc, rs[1][name]["anc"]), name  # the same global ancestors on every rank
        for r in range(WORLD):
            got, mine = rs[r][name], anc[r * n:(r + 1) * n]
            assert torch.equal(got["x"], glob["x"][mine]), (name, r)
            assert torch.equal(got["energy"], glob["energy"][mine]) and torch.equal(got["bad"], glob["bad"][mine])
            assert got["none"] is None and torch.equal(got["eve"], mine)
            # only the distinct particles that live elsewhere cross, once each
            remote = torch.unique(mine[mine // n != r])
            assert got["received"] == remote.numel(), (name, r, got["received"], remote.numel())
    assert rs[0]["one_parent"]["received"] == 1 and rs[1]["one_parent"]["received"] == 0
    assert all(rs[r]["identity"]["received"] == 0 for r in range(WORLD))


@pytest.mark.filterwarnings("ignore::fkdiff.smc.SMCDegeneracyWarning")  # 50 levels without MCMC: a low final ESS
def test_two_ranks_reproduce_one_process_exactly(ranks):
    rs = _ok(ranks["exact"])
    ref = smc.run_smc(_exact_fk(), N_EXACT, generator=torch.Generator().manual_seed(RESAMPLE_SEED))
    assert ref.resampled.any() and (ref.num_alive < N_EXACT).any()  # the run resamples and has dead particles
    n = N_EXACT // WORLD
    for r, res in enumerate(rs):
        assert res["log_Z"] == ref.log_Z and res["log_Z_var"] == ref.log_Z_var and res["num_eves"] == ref.num_eves
        for k in ("ess", "resampled", "unique_ancestors", "num_alive", "num_invalid", "log_Z_increments"):
            assert torch.equal(res[k], getattr(ref, k)), k
        assert torch.equal(res["samples"], ref.samples[r * n:(r + 1) * n])
        assert torch.equal(res["log_weights"], ref.log_weights[r * n:(r + 1) * n])
        assert torch.equal(res["all_samples"], ref.samples) and torch.equal(res["all_log_weights"], ref.log_weights)
        assert res["offset"] == r * n
    assert sum(res["rows_exchanged"] for res in rs) > 0  # particles did cross ranks


def _masses(x, w, centers):
    idx = torch.cdist(x.double(), centers.double()).argmin(1)
    return torch.zeros(len(centers), dtype=torch.float64).index_add_(0, idx, w.double())


def _check_gmm(res, log_z_sd):
    a = ring8(radius=1.0, std=0.15)
    r, log_z = gmm_product(a, _gmm_b(), SMIN)
    assert abs(res["log_Z"] - log_z) <= Z_TOL * log_z_sd, (res["log_Z"], log_z)
    x, w = res["all_samples"], res["all_log_weights"].exp()
    n = x.shape[0]
    assert n == 1000 and torch.isfinite(x).all()
    assert float(torch.logsumexp(res["all_log_weights"], 0)) == pytest.approx(0.0, abs=1e-12)
    xs = r.sample(200_000, generator=torch.Generator().manual_seed(0))
    exact = _masses(xs, torch.full((xs.shape[0],), 1.0 / xs.shape[0]), a.means)
    est = _masses(x, w, a.means)
    for k in range(len(a.means)):
        p = max(float(exact[k]), 1.0 / n)
        assert abs(float(est[k]) - float(exact[k])) <= Z_TOL * math.sqrt(INFLATION * p * (1 - p) / n), (k, est, exact)
    var = torch.diagonal(r.covariance())
    assert ((res["mean"] - r.mean()).abs() <= Z_TOL * (INFLATION * var / n).sqrt()).all(), (res["mean"], r.mean())


def test_gmm_product_two_ranks_matches_exact(ranks):
    rs = _ok(ranks["gmm"])
    _check_gmm(rs[0], LOG_Z_SD_GMM)
    for k in ("log_Z", "log_Z_var", "num_eves"):
        assert rs[0][k] == rs[1][k], k
    for k in ("ess", "unique_ancestors", "acceptance", "step_size", "all_log_weights", "all_samples", "mean"):
        assert torch.equal(rs[0][k], rs[1][k]), k  # global diagnostics are identical on the ranks
    # one step size for the whole population, adapted towards the HMC target acceptance 0.65
    assert 0.3 < float(rs[0]["acceptance"].mean()) < 0.95
    assert float(rs[0]["ess"].min()) > 100
    # each rank's own noise: the shards are different draws
    assert not torch.equal(rs[0]["samples"], rs[1]["samples"])
    assert torch.equal(torch.cat([rs[0]["samples"], rs[1]["samples"]]), rs[0]["all_samples"])


def test_island_mode_combines_log_z(ranks):
    rs = _ok(ranks["island"])
    _check_gmm(rs[0], LOG_Z_SD_GMM * math.sqrt(2.0))
    isl = rs[0]["island_log_Z"]
    assert isl.shape == (WORLD,) and torch.equal(isl, rs[1]["island_log_Z"])
    assert rs[0]["log_Z"] == pytest.approx(float(torch.logsumexp(isl, 0)) - math.log(WORLD), abs=1e-12)
    # the islands are independent runs (different estimates), each island's weights scaled by Z_r / sum Z
    assert isl[0] != isl[1]
    a = isl - torch.logsumexp(isl, 0)
    for r in range(WORLD):
        assert float(torch.logsumexp(rs[r]["log_weights"], 0)) == pytest.approx(float(a[r]), abs=1e-12)
    assert float(rs[0]["log_Z_increments"].sum()) == pytest.approx(rs[0]["log_Z"], abs=1e-9)
    assert rs[0]["rows_exchanged"] == 0 and rs[1]["rows_exchanged"] == 0


def test_dead_rank_and_all_dead(ranks):
    rs = _ok(ranks["death"])
    one = [r["one_rank"] for r in rs]
    for r in range(WORLD):
        # rank 1's particles all died at level 3: the sampler resampled there from rank 0's particles and went on
        assert int(one[r]["num_alive"][3]) == 100 and bool(one[r]["resampled"][3])
        assert math.isfinite(one[r]["log_Z"]) and torch.isfinite(one[r]["samples"]).all()
        assert one[r]["log_Z"] == one[0]["log_Z"]
    assert one[1]["rows_exchanged"] > 0
    # every particle dead at level 3: the same error on every rank, naming the level (no hang)
    for r in range(WORLD):
        assert rs[r]["all"].startswith("SMCError: all 200 particles have zero weight at level 3"), rs[r]["all"]
        assert "not divisible" in rs[r]["indivisible"], rs[r]["indivisible"]


def test_cli_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 -m fkdiff.sample`: one run folder written by rank 0 with all N samples."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fkdiff.sample",
           "recipe=toy2d", f"run_dir={tmp_path}", "sample.num_particles=200", "sample.num_levels=30",
           "sample.progress=false", "sample.compare_reverse_diffusion=false", "sample.plot.enabled=false", "seed=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    assert diag["world_size"] == 2 and math.isfinite(diag["log_Z"]) and len(diag["ess"]) == 30
    saved = torch.load(tmp_path / "samples.pt")
    assert saved["samples"].shape == (200, 2) and torch.isfinite(saved["resampled"]).all()
    assert proc.stdout.count("[fkdiff.sample]") == 1  # rank 0 only


@pytest.mark.filterwarnings("ignore::fkdiff.smc.SMCDegeneracyWarning")
@pytest.mark.parametrize("kernel", [HMC(num_steps=1, num_leapfrog=3), RWM(num_steps=2)], ids=["hmc", "rwm"])
def test_one_rank_with_mcmc_equals_the_engine(tmp_path, kernel):
    """With one rank the distributed driver (population-wide step size, all_gather hooks, shared resampling
    generator = the noise generator) is the single-process engine, MCMC adaptation included, bit for bit, for any
    fkdiff.mcmc kernel."""
    import torch.distributed as dist

    from fkdiff.smc import distributed

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        fk = _exact_fk()
        kw = dict(resample="systematic", ess_threshold=0.5, mcmc=kernel)
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        res = distributed.run_smc(fk, 64, generator=g1, resample_generator=g1, **kw)
        ref = smc.run_smc(_exact_fk(), 64, generator=g2, **kw)
    finally:
        dist.destroy_process_group()
    assert ref.resampled.any()
    assert res.log_Z == ref.log_Z and torch.equal(res.samples, ref.samples)
    assert torch.equal(res.step_size, ref.step_size) and torch.equal(res.acceptance, ref.acceptance)
    assert torch.equal(res.all_log_weights, ref.log_weights) and res.rows_exchanged == 0
