"""Multi-process Feynman–Kac SMC: the N particles sharded over `torch.distributed` ranks (DESIGN.md section 7).

Global resampling (the default; the SMC of `fkdiff.smc.core` run on a sharded population, cf. Murray, Lee & Jacob
2016, "Parallel resampling in the particle filter", and Chopin & Papaspiliopoulos 2020, alg. 10.3). Rank r of R holds
the particles with global indices [r n, (r + 1) n), n = N / R (N must be divisible by R). At each level t:

    propagate + weight   every rank runs M_t and log G_t on its shard (the expensive part, no communication)
    gather               the N float64 log-weights are all-gathered (one all_gather of [n, 2]: l_{t-1} and l_t);
                         ESS, log Z_t and the number of alive / invalid particles are computed from the full vector
                         on every rank, so they are bitwise identical everywhere
    resample             if ESS < kappa N, every rank draws the same global ancestors A [N] from a *shared*
                         generator (same seed on all ranks, used only for resampling); rank r needs A[rn:(r+1)n]
    exchange             each needed particle that lives on another rank crosses once (one all_to_all_single with
                         uneven splits of the packed particle rows, all cached fields and the level-0 ancestor index
                         included); receivers expand the copies locally, preserving ancestor order
    move                 MCMC on the shard, any fkdiff.mcmc kernel: its StepSizeAdapter is bound to the sharded
                         population (`kernel.for_population`), so the step size c * population_scale uses the median
                         over all N particles and c is adapted from the global mean acceptance (both all-gathered):
                         every rank keeps the same step size

The propagation / MCMC noise comes from each rank's own generator (seeded from (seed, rank)), so ranks draw
independent noise. Given the same ancestors, the rows each rank holds after the exchange are exactly those one process
would hold; with noise drawn independently of the split (tests/test_smc_distributed.py) the R-rank run reproduces
the single-process run bit for bit.

Island resampling (`island=True`, Vergé, Dubarry, Del Moral & Moulines 2015, "On parallel implementation of SMC
methods: the island particle model"): each rank runs an independent SMC on its n particles (no communication until
the end). With island estimates Z_r, the combined estimate is Z_hat = (1/R) sum_r Z_r (unbiased), log Z_hat =
logsumexp_r log Z_r - log R, and particle i of island r gets the global weight W_i^r Z_r / sum_s Z_s. Cheaper (no
per-level collective) but the islands never share particles, so it needs n large enough per rank.

Usage (every rank runs the same program; `torch.distributed.init_process_group` first): `fkdiff.smc.sample` with a
sharded population (`distributed.sample(...)` is the same call):

    pop = fkdiff.smc.distributed.ShardedPopulation(island=False, gather=True)
    result = fkdiff.smc.sample(target, 8192, shape=(2,), num_levels=200, sigma_max=80.0, sigma_min=0.002,
                               mcmc=fkdiff.mcmc.HMC(num_leapfrog=3), generator=gen, population=pop)
    result.samples           # this rank's shard [N / R, *shape]; result.all_samples: all N (gather=True)
    result.log_Z, result.ess # global, identical on every rank

Launch (the CLI `python -m fkdiff.sample` does the process-group set-up itself when WORLD_SIZE > 1):

    torchrun --standalone --nproc_per_node=4 -m fkdiff.sample recipe=toy2d            # one node, 4 GPUs (or CPU)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id=$JOB -m fkdiff.sample recipe=toy2d  # on each of 2 nodes
    srun --nodes=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d \\
             --rdzv_endpoint=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 \\
             --rdzv_id=$SLURM_JOB_ID -m fkdiff.sample recipe=toy2d                     # SLURM

Limitations: N must be divisible by the number of ranks; an exception raised on one rank only (e.g. out of memory in
the model) leaves the others waiting in the next collective until the process group's timeout. Errors the engine
raises from global quantities (every particle dead at some level) are raised on every rank at the same level.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from fkdiff.smc import core
from fkdiff.smc.core import Population, SMCResult
from fkdiff.smc.core import run_smc as _run_smc
from fkdiff.smc.fk import FeynmanKac, Particles

__all__ = ["sample", "run_smc", "ShardedPopulation", "DistributedSMCResult", "rank_generators"]


# --------------------------------------------------------------------------------------------------------------------
# the sharded population: the collectives behind the engine's population hooks


class ShardedPopulation(Population):
    """N particles split evenly over the ranks of `group` (default: the world), rank r holding [r n, (r+1) n).

    Every method is a collective (all ranks call it in the same order). Tensors may live on any device; they are
    communicated on the backend's device (CUDA for nccl, CPU otherwise). `rows_sent` / `rows_received` count the
    particle rows that crossed ranks in `select` (for tests and diagnostics).
    """

    def __init__(self, group: Any = None, *, island: bool = False, gather: bool = True):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("fkdiff.smc.distributed needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group, e.g. under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.rows_sent = 0
        self.rows_received = 0
        self.island, self.gather_samples = bool(island), bool(gather)

    def run(self, fk: FeynmanKac, num_particles: int, *, generator: torch.Generator | None,
            **engine) -> "DistributedSMCResult":
        """What `fkdiff.smc.sample(..., population=this)` runs: this rank's noise and the shared resampling generator
        from rank 0's `generator` (`rank_generators`), then `run_smc` (global or island resampling)."""
        noise, shared = rank_generators(generator, self, getattr(fk, "device", None))
        return run_smc(fk, num_particles, generator=noise, resample_generator=shared, population=self, **engine)

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def local_size(self, num_particles: int) -> int:
        if num_particles % self.world_size:
            raise ValueError(f"num_particles={num_particles} is not divisible by the {self.world_size} ranks: "
                             "use a multiple of the world size (shards are equal)")
        return num_particles // self.world_size

    def offset(self, num_particles: int) -> int:
        return self.rank * self.local_size(num_particles)

    def gather(self, t: Tensor) -> Tensor:
        x = t.detach().contiguous()
        is_bool = x.dtype == torch.bool
        x = (x.to(torch.uint8) if is_bool else x).to(self.comm_device)
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(out, x, group=self.group)
        y = torch.cat(out).to(t.device)
        return y.to(torch.bool) if is_bool else y

    def shard(self, t: Tensor) -> Tensor:
        n = t.shape[0] // self.world_size
        return t[self.rank * n:(self.rank + 1) * n]

    def row(self, t: Tensor, index: int) -> Tensor:
        n = t.shape[0]
        owner = index // n
        buf = (t[index - owner * n] if owner == self.rank else torch.empty_like(t[0])).contiguous()
        buf = buf.to(self.comm_device)
        dist.broadcast(buf, src=self._global_rank(owner), group=self.group)
        return buf.to(t.device)

    def select(self, particles: Particles, eve: Tensor, ancestors: Tensor) -> tuple[Particles, Tensor]:
        keys = [k for k, v in particles.data.items() if v is not None]
        out = self.exchange([particles.x, *(particles.data[k] for k in keys), eve], ancestors)
        data = {k: None for k in particles.data}
        data.update(zip(keys, out[1:-1]))
        return Particles(out[0], data), out[-1]

    def exchange(self, tensors: Sequence[Tensor], ancestors: Tensor) -> list[Tensor]:
        """Rows `[n, ...]` of each tensor (this rank's shard) -> rows `ancestors[rank n:(rank+1) n]` of the global
        tensors, i.e. exactly `global[ancestors][rank n:(rank+1) n]`. `ancestors` `[N]` must be identical on all ranks.

        Each particle needed by another rank is sent once to it (one all_to_all_single of packed bytes, uneven
        splits); copies are made by the receiver.
        """
        n, r, world = tensors[0].shape[0], self.rank, self.world_size
        anc = ancestors.detach().to("cpu", torch.int64)
        if anc.numel() != n * world:
            raise ValueError(f"ancestors has {anc.numel()} entries, expected N = {n * world}")
        # need[q][s]: sorted distinct global indices that rank q needs from rank s (s != q)
        need = []
        for q in range(world):
            u = torch.unique(anc[q * n:(q + 1) * n])  # sorted
            src = u // n
            need.append([u[src == s] if s != q else u[:0] for s in range(world)])
        mine = anc[r * n:(r + 1) * n]
        crossing = sum(int(need[q][s].numel()) for q in range(world) for s in range(world))
        buf, specs = _pack(tensors)
        if crossing == 0:  # identical decision on every rank: nothing to communicate
            return _unpack(buf[(mine - r * n).to(buf.device)], specs)
        send_rows = torch.cat([need[q][r] - r * n for q in range(world)])
        in_splits = [int(need[q][r].numel()) for q in range(world)]
        out_splits = [int(need[r][s].numel()) for s in range(world)]
        send = buf[send_rows.to(buf.device)].to(self.comm_device)
        recv = torch.empty((sum(out_splits), buf.shape[1]), dtype=torch.uint8, device=self.comm_device)
        dist.all_to_all_single(recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits,
                               group=self.group)
        self.rows_sent += int(send_rows.numel())
        self.rows_received += int(recv.shape[0])
        # pool = [own n rows, received rows]; received ids (concatenated over senders) are sorted
        recv_ids = torch.cat([need[r][s] for s in range(world)])
        local = (mine // n) == r
        idx = torch.where(local, mine - r * n, n + torch.searchsorted(recv_ids, mine))
        pool = torch.cat([buf, recv.to(buf.device)])
        return _unpack(pool[idx.to(buf.device)], specs)


def _pack(tensors: Sequence[Tensor]) -> tuple[Tensor, list]:
    """Rows of several tensors `[n, ...]` (any dtypes) as one byte matrix `[n, B]` uint8, plus how to unpack it."""
    n = tensors[0].shape[0]
    cols, specs = [], []
    for t in tensors:
        if t.shape[0] != n:
            raise ValueError(f"every particle field needs leading dimension {n}, got {tuple(t.shape)}")
        flat = t.detach().contiguous().reshape(n, -1)
        b = flat.to(torch.uint8) if t.dtype == torch.bool else flat.view(torch.uint8)
        cols.append(b)
        specs.append((t.dtype, tuple(t.shape[1:]), b.shape[1]))
    return torch.cat(cols, 1), specs


def _unpack(buf: Tensor, specs: list) -> list[Tensor]:
    out, start = [], 0
    for dtype, shape, width in specs:
        b = buf[:, start:start + width].contiguous()
        start += width
        t = b.to(torch.bool) if dtype == torch.bool else b.view(dtype)
        out.append(t.reshape(buf.shape[0], *shape))
    return out


# --------------------------------------------------------------------------------------------------------------------
# result


@dataclass
class DistributedSMCResult(SMCResult):
    """`SMCResult` of one rank: `samples` `[n, *shape]` and `log_weights` `[n]` are this rank's shard (normalised over
    all N: logsumexp over all ranks is 0); every diagnostic (log_Z, ess, unique_ancestors, acceptance, ...) is global
    and identical on all ranks. `all_log_weights` `[N]` is always present; `all_samples` `[N, *shape]` with
    gather=True (then `full()`, `mean()` and `resample()` work on every rank). Island runs: `island_log_Z` `[R]`;
    per-level `ess`, `unique_ancestors`, `num_invalid`, `num_alive` are sums over the islands, `resampled` is
    "any island resampled", `acceptance` / `step_size` the island means, and `log_Z_increments` the increments of
    the combined estimate logmeanexp_r log Z_{r,t}.
    """

    rank: int = 0
    world_size: int = 1
    offset: int = 0
    island: bool = False
    all_log_weights: Tensor | None = None
    all_samples: Tensor | None = None
    island_log_Z: Tensor | None = None
    rows_exchanged: int = 0  # particle rows this rank received from others over the run (global resampling)

    @property
    def num_particles(self) -> int:
        """N, the whole population."""
        return int(self.all_log_weights.numel())

    @property
    def num_local(self) -> int:
        return self.samples.shape[0]

    @property
    def final_ess(self) -> float:
        return float(1.0 / (self.all_log_weights.exp() ** 2).sum())

    def full(self) -> SMCResult:
        """The whole population as a plain `SMCResult` (needs gather=True)."""
        if self.all_samples is None:
            raise ValueError("this result holds only its shard: run with gather=True to get all samples")
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(SMCResult)}
        base.update(samples=self.all_samples, log_weights=self.all_log_weights)
        return SMCResult(**base)

    def resample(self, generator: torch.Generator | None = None, num: int | None = None,
                 scheme: str = "systematic") -> Tensor:
        """Equally weighted samples from the whole population (needs gather=True)."""
        return self.full().resample(generator, num, scheme)

    def mean(self) -> Tensor:
        """Weighted mean over the whole population (needs gather=True)."""
        return self.full().mean()


def _wrap(res: SMCResult, pop: ShardedPopulation, n_total: int, **extra) -> DistributedSMCResult:
    fields = {f.name: getattr(res, f.name) for f in dataclasses.fields(SMCResult)}
    return DistributedSMCResult(
        **fields, rank=pop.rank, world_size=pop.world_size, offset=pop.offset(n_total),
        all_log_weights=pop.gather(res.log_weights), all_samples=pop.gather(res.samples) if pop.gather_samples else None,
        rows_exchanged=pop.rows_received, **extra)


# --------------------------------------------------------------------------------------------------------------------
# drivers


def rank_generators(generator: torch.Generator | None, population: ShardedPopulation,
                    device: torch.device | str | None = None) -> tuple[torch.Generator, torch.Generator]:
    """(this rank's noise generator, the shared resampling generator), both on `device`.

    A base seed is drawn from rank 0's `generator` (a fresh non-deterministic one if None) and broadcast; the shared
    generator is seeded from SeedSequence([base, 0]) on every rank, the noise generator from SeedSequence([base,
    1 + rank]) (independent streams per rank). Results thus depend on rank 0's generator and the world size only.
    """
    src = generator if generator is not None else torch.Generator().manual_seed(torch.Generator().seed())
    base = torch.randint(0, 2**62, (1,), generator=src, device=src.device).to(population.comm_device)
    dist.broadcast(base, src=population._global_rank(0), group=population.group)
    base = int(base)
    device = torch.device(device) if device is not None else torch.device("cpu")

    def make(key: int) -> torch.Generator:
        seed = int(np.random.SeedSequence([base, key]).generate_state(1, np.uint64)[0]) & (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    return make(1 + population.rank), make(0)


def run_smc(
    fk: FeynmanKac,
    num_particles: int,
    *,
    generator: torch.Generator | None,
    resample_generator: torch.Generator | None = None,
    resample: str = "systematic",
    ess_threshold: float = 0.5,
    mcmc: Any = None,
    progress: bool = False,
    group: Any = None,
    island: bool = False,
    gather: bool = True,
    population: ShardedPopulation | None = None,
) -> DistributedSMCResult:
    """Distributed SMC on any Feynman–Kac model (see the module docstring); `fk` builds this rank's shard.

    num_particles       N, the global population (divisible by the world size); each rank holds N / R
    generator           this rank's noise generator (propagation, MCMC); must differ between ranks
    resample_generator  the shared resampling generator, seeded identically on all ranks (global resampling only;
                        island runs resample with `generator`)
    island              independent SMC per rank, log Z combined (see the module docstring)
    gather              also all-gather the samples (`all_samples`)
    population          the ShardedPopulation to use (its group / island / gather then replace those arguments)
    """
    pop = ShardedPopulation(group, island=island, gather=gather) if population is None else population
    n_total = int(num_particles)
    n = pop.local_size(n_total)
    show = progress and pop.rank == 0
    if pop.island:
        res = _run_smc(fk, n, generator=generator, resample=resample, ess_threshold=ess_threshold, mcmc=mcmc,
                       progress=show)
        return _combine_islands(res, pop, n_total)
    if resample_generator is None:
        raise ValueError("global resampling needs a resample_generator seeded identically on every rank "
                         "(see rank_generators)")
    res = _run_smc(fk, n_total, generator=generator, resample=resample, ess_threshold=ess_threshold, mcmc=mcmc,
                   progress=show, population=pop, resample_generator=resample_generator)
    return _wrap(res, pop, n_total)


def _combine_islands(res: SMCResult, pop: ShardedPopulation, n_total: int) -> DistributedSMCResult:
    """One island's result -> the combined result (log Z, weights and every collector's per-level values)."""
    collectors = [c for c in core.COLLECTORS if res.levels.get(c.name) is not None]
    names = [c.name for c in collectors]
    stacked = torch.stack([res.levels[k].to(torch.float64).cpu() for k in names], 1)  # [T, C]
    levels = pop.gather(stacked[None]).cpu()  # [R, T, C]: one collective for every per-level diagnostic
    weighted = res.log_Z is not None
    scalars = torch.tensor([[res.log_Z if weighted else 0.0, res.log_Z_var if weighted else 0.0, res.num_eves]],
                           dtype=torch.float64)
    island = pop.gather(scalars).cpu()  # [R, 3]
    log_z_r = island[:, 0]
    r = log_z_r.numel()
    # log of the island weights Z_r / sum_s Z_s (equal islands when there is no Z)
    a = log_z_r - torch.logsumexp(log_z_r, 0) if weighted else torch.full((r,), -math.log(r), dtype=torch.float64)
    combined = dict.fromkeys(res.levels)
    for j, c in enumerate(collectors):
        combined[c.name] = c.islands(levels[:, :, j]).to(c.dtype)
    # Var(Z_hat) / Z_hat^2 with Z_hat = mean_r Z_r and independent islands: sum_r (Z_r / sum Z)^2 Var(Z_r) / Z_r^2
    out = dataclasses.replace(
        res, log_weights=res.log_weights + float(a[pop.rank]), levels=combined,
        log_Z=float(torch.logsumexp(log_z_r, 0)) - math.log(r) if weighted else None,
        log_Z_var=float((torch.exp(2 * a) * island[:, 1]).sum()) if weighted else None,
        num_eves=int(island[:, 2].sum()), warnings=[f"island {pop.rank}: {m}" for m in res.warnings])
    return _wrap(out, pop, n_total, island=True, island_log_Z=log_z_r if weighted else None)


def sample(target: Any, num_particles: int, *, group: Any = None, island: bool = False, gather: bool = True,
           **options) -> DistributedSMCResult:
    """`fkdiff.smc.sample(target, num_particles, **options)` with the N particles sharded over the ranks of `group`
    (default: the world): `population=ShardedPopulation(group, island=island, gather=gather)`.

    Call it on every rank of an initialised process group with the same arguments. `generator`: rank 0's seeds
    everything (see `rank_generators`); `device`: this rank's device (e.g. cuda:LOCAL_RANK). `island=True`: local
    resampling per rank with a combined log Z; `gather=True`: `all_samples` holds all N samples on every rank.
    Returns a `DistributedSMCResult` (this rank's shard, global diagnostics).
    """
    from fkdiff.smc import sample as smc_sample

    return smc_sample(target, num_particles, population=ShardedPopulation(group, island=island, gather=gather),
                      **options)
