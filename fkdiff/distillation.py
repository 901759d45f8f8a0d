"""Distillation of a denoiser teacher into an energy student: the Helmholtz projection loss (DESIGN.md section 4).

    L(theta) = E_{sigma, x_0, eps} [ lambda(sigma) | D_theta(x_sigma, sigma) - stopgrad(D_teacher(x_sigma, sigma)) |^2 ]
    x_sigma = x_0 + sigma eps,   ln sigma ~ N(P_mean, P_std^2),   lambda = (sigma^2 + sd^2) / (sigma sd)^2   (EDM)

In score terms this is lambda sigma^4 |grad E_theta + s_teacher|^2, whose minimiser over scalar E is the L2(p_sigma)
projection of the teacher's score onto gradient fields (Thornton et al. 2025, sec. 3; weighted Helmholtz-Hodge).
The E-DSM baseline (energy-parameterised denoising score matching, Thornton et al. fig. 2) is the same loss with the
target x_0 instead of D_teacher: `target="data"` changes nothing else (same sigma, same noise, same weighting).

Diagnostics, per sigma bucket:
- the distillation residual |D_theta - D_teacher|^2 / dim (what no energy can represent, plus fitting error);
- the teacher's Jacobian asymmetry |J - J^T|_F^2, J = d s_teacher / dx, by Hutchinson: E_v |J v - J^T v|^2 with
  v ~ N(0, I), one jvp and one vjp per probe (Thornton et al. fig. 4); zero for a conservative teacher.

Determinism (EDM style: sample i depends on the seed only, not on the process count): the global batch of step k is
a pure function of (seed, k) (`StepBatches`), and so are its sigma and eps, drawn for the whole global batch and
sliced per rank. `ckpt_path=last` therefore resumes the exact trajectory, and N DDP processes reproduce one process.
This is the only module of the distillation path that imports Lightning.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, default_collate

from fkdiff.diffusion import append_dims, edm_loss_weight, ode_derivative, sample_training_sigma, sigma_schedule
from fkdiff.energy import EnergyStudent

__all__ = ["step_seed", "DenoiserMatchingLoss", "LossOutput", "teacher_asymmetry", "denoiser_error_by_bucket",
           "bucketize", "StepBatches", "DistillationModule", "FinalCheckpoint", "euler_sample"]


def step_seed(seed: int, step: int, rank: int = 0, stream: str = "noise") -> int:
    """A 63-bit generator seed that is a pure function of (seed, step, rank, stream)."""
    h = hashlib.sha256(f"fkdiff-distill:{int(seed)}:{int(step)}:{int(rank)}:{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def _call(denoiser: Callable, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
    return denoiser(x, sigma) if cond is None else denoiser(x, sigma, cond)


# ---------------------------------------------------------------------------------------------------------------------
# loss


class LossOutput(NamedTuple):
    loss: Tensor      # [B] lambda(sigma) |D_theta - target|^2 (summed over event dims)
    sigma: Tensor     # [B]
    x_noisy: Tensor   # [B, *event]
    denoised: Tensor  # [B, *event] D_theta(x_noisy, sigma), with graph
    target: Tensor    # [B, *event] D_teacher(x_noisy, sigma) or x_0


class DenoiserMatchingLoss:
    """Per-sample lambda(sigma) |D_theta(x_0 + sigma eps, sigma) - target|^2 (DESIGN.md section 4).

    target: "teacher" (distillation, D_teacher(x_sigma)) or "data" (E-DSM, x_0).
    weighting: "edm" (lambda = (sigma^2 + sd^2)/(sigma sd)^2) or "uniform" (lambda = 1/sigma^2, the eps-MSE).
    """

    def __init__(self, sigma_data: float, target: str = "teacher", p_mean: float = -1.2, p_std: float = 1.2,
                 weighting: str = "edm"):
        if target not in ("teacher", "data"):
            raise ValueError(f"distill.target must be 'teacher' (distillation) or 'data' (E-DSM), got {target!r}")
        if weighting not in ("edm", "uniform"):
            raise ValueError(f"distill.weighting must be 'edm' or 'uniform', got {weighting!r}")
        self.sigma_data, self.target = float(sigma_data), target
        self.p_mean, self.p_std, self.weighting = float(p_mean), float(p_std), weighting

    def weight(self, sigma: Tensor) -> Tensor:
        return edm_loss_weight(sigma, self.sigma_data) if self.weighting == "edm" else sigma**-2

    def draw(self, x0: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> tuple[Tensor, Tensor]:
        """(sigma `[B]`, eps `[B, *event]`) on x0's device, from `generator` (a CPU generator).

        With `shard = (rank, world_size)`, x0 holds rows rank, rank + w, ... of a global batch of B * w rows: the
        noise of the whole global batch is drawn and the same rows are kept, so the result does not depend on w.
        """
        rank, world = shard
        n = x0.shape[0] * world
        sigma = sample_training_sigma(n, self.p_mean, self.p_std, generator=generator)[rank::world].to(x0)
        eps = torch.randn((n, *x0.shape[1:]), generator=generator, dtype=x0.dtype)[rank::world].to(x0.device)
        return sigma, eps

    def __call__(self, student: EnergyStudent, teacher: Callable | None, x0: Tensor, cond: Any,
                 generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> LossOutput:
        sigma, eps = self.draw(x0, generator, shard)
        x_noisy = x0 + append_dims(sigma, x0.ndim) * eps
        if self.target == "teacher":
            if teacher is None:
                raise ValueError("distill.target=teacher needs a teacher")
            with torch.no_grad():
                target = _call(teacher, x_noisy, sigma, cond).to(x0.dtype)
        else:
            target = x0
        denoised = student(x_noisy, sigma, cond)  # graph kept iff the student is training
        loss = self.weight(sigma) * (denoised - target).flatten(1).pow(2).sum(1)
        return LossOutput(loss, sigma, x_noisy, denoised, target)


# ---------------------------------------------------------------------------------------------------------------------
# diagnostics


def bucketize(sigma: Tensor, edges: Sequence[float]) -> Tensor:
    """Bucket index in [0, len(edges) - 2] of each sigma (values outside the edges go to the end buckets). `[B]`."""
    e = torch.as_tensor(list(edges), dtype=sigma.dtype, device=sigma.device)
    return (torch.bucketize(sigma, e[1:-1], right=True)).clamp(0, len(edges) - 2)


def bucket_names(edges: Sequence[float]) -> list[str]:
    return [f"{lo:.3g}-{hi:.3g}" for lo, hi in zip(edges[:-1], edges[1:])]


def per_bucket_mean(values: Tensor, sigma: Tensor, edges: Sequence[float]) -> dict[str, Tensor]:
    """{bucket name: mean of values in it} for the buckets that hold at least one sample."""
    idx = bucketize(sigma, edges)
    return {name: values[idx == i].mean() for i, name in enumerate(bucket_names(edges)) if (idx == i).any()}


def teacher_asymmetry(teacher: Callable, x: Tensor, sigma: Tensor, cond: Any = None,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Hutchinson estimate of |J - J^T|_F^2 with J = d s_teacher/dx, s = (D(x) - x)/sigma^2, one probe per sample.

    Returns (asym `[B]` = |J v - J^T v|^2, scale `[B]` = |J v|^2 (estimates |J|_F^2), for a relative asymmetry).
    One jvp (forward mode) and one vjp per probe; falls back to the double-vjp jvp if forward mode is unsupported.
    A teacher with an exact `energy` (analytic teachers, whose closed-form denoiser is x - sigma^2 grad E to ~1e-13)
    is differentiated through its energy: autograd through the Box's closed-form score is NaN far outside the box at
    small sigma (an inf * 0 in the Mills ratio's derivative), through its energy it is finite.
    """
    s2 = append_dims(sigma, x.ndim) ** 2
    energy = getattr(teacher, "energy", None)

    def score_fn(z: Tensor) -> Tensor:
        if callable(energy) and cond is None:
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(energy(zz, sigma).sum(), zz, create_graph=True)
            return -g
        return (_call(teacher, z, sigma, cond) - z) / s2

    v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    x = x.detach()
    with torch.enable_grad():
        try:
            _, jv = torch.func.jvp(score_fn, (x,), (v,))
        except (NotImplementedError, RuntimeError):
            _, jv = torch.autograd.functional.jvp(score_fn, x, v)
        _, vjp_fn = torch.func.vjp(score_fn, x)
        (jtv,) = vjp_fn(v)
    return (jv - jtv).flatten(1).pow(2).sum(1).detach(), jv.flatten(1).pow(2).sum(1).detach()


def denoiser_error_by_bucket(student: Callable, reference: Callable, x0: Tensor, edges: Sequence[float],
                             generator: torch.Generator, cond: Any = None, max_batch: int = 4096) -> dict[str, list]:
    """Excess denoiser error of `student` over the exact/reference denoiser, per sigma bucket.

    In bucket [lo, hi), every x0 row gets its own sigma, log-uniform in [lo, hi), and x = x0 + sigma eps. Then
    excess = E|D_student(x) - D_ref(x)|^2 and optimal = E|D_ref(x) - x0|^2 (the reference's own denoising error, the
    minimum when D_ref is the exact denoiser), per sample summed over event dims, and ratio = excess / optimal.
    `x0 [N, *event]`. Returns {"bucket", "lo", "hi", "excess", "optimal", "ratio"}, lists aligned with the buckets.
    """
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]),
           "excess": [], "optimal": [], "ratio": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        exc, opt = [], []
        for i in range(0, x0.shape[0], max_batch):
            xb = x0[i:i + max_batch]
            cb = None if cond is None else cond[i:i + max_batch]
            u = torch.rand(xb.shape[0], generator=generator, dtype=torch.float64)
            sig = (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp().to(xb)
            eps = torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)
            x = xb + append_dims(sig, xb.ndim) * eps
            with torch.no_grad():
                d_ref = _call(reference, x, sig, cb).to(xb.dtype)
            d_st = _call(student, x, sig, cb).detach().to(xb.dtype)
            exc.append((d_st - d_ref).flatten(1).pow(2).sum(1))
            opt.append((d_ref - xb).flatten(1).pow(2).sum(1))
        e, o = torch.cat(exc).mean().item(), torch.cat(opt).mean().item()
        out["excess"].append(e)
        out["optimal"].append(o)
        out["ratio"].append(e / max(o, 1e-300))
    return out


def energy_gap_error_by_bucket(student: Any, reference: Any, x0: Tensor, edges: Sequence[float],
                               generator: torch.Generator, max_batch: int = 4096) -> dict[str, list]:
    """Error of the student's *relative* energies, per sigma bucket: what SMC weights depend on.

    The denoiser error sees only grad E, i.e. E up to a constant on every region where p_sigma has mass; between
    separated modes at small sigma the loss does not pin the energy levels, and those levels set the mode masses of
    a composition. In bucket [lo, hi) pairs (x_i, x_j) are drawn from p_sigma at a common sigma (log-uniform per
    pair) and rms = sqrt(E[((E_s(x_i) - E_s(x_j)) - (E_ref(x_i) - E_ref(x_j)))^2]) in nats (the per-sigma additive
    constant cancels); `reference` must have an exact `energy` (analytic teachers). `x0 [N, *event]`, N even.
    """
    out = {"bucket": bucket_names(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]), "rms_nats": []}
    n = x0.shape[0] // 2
    for lo, hi in zip(edges[:-1], edges[1:]):
        sq = []
        for i in range(0, n, max_batch):
            a, b = x0[i:min(i + max_batch, n)], x0[n + i:n + min(i + max_batch, n)]
            u = torch.rand(a.shape[0], generator=generator, dtype=torch.float64)
            sig = (math.log(lo) + u * (math.log(hi) - math.log(lo))).exp().to(a)
            xa = a + append_dims(sig, a.ndim) * torch.randn(a.shape, generator=generator, dtype=a.dtype)
            xb = b + append_dims(sig, b.ndim) * torch.randn(b.shape, generator=generator, dtype=b.dtype)
            with torch.no_grad():
                d_st = (student.energy(xa, sig) - student.energy(xb, sig)).double()
                d_ref = (reference.energy(xa.double(), sig.double()) - reference.energy(xb.double(), sig.double()))
            sq.append((d_st - d_ref.double()) ** 2)
        out["rms_nats"].append(float(torch.cat(sq).mean().sqrt()))
    return out


def euler_sample(denoiser: Callable, shape: Sequence[int], generator: torch.Generator, *, num_steps: int = 32,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, cond: Any = None,
                 device: torch.device | str = "cpu") -> Tensor:
    """Probability-flow ODE samples by Euler steps on the EDM rho-schedule (Karras et al. 2022, alg. 1 without the
    Heun correction), for validation plots only. `shape` = (N, *event); returns `[N, *event]`."""
    sigmas = sigma_schedule(num_steps, sigma_min, sigma_max, append_zero=True).tolist()
    x = torch.randn(tuple(shape), generator=generator) * sigmas[0]
    x = x.to(device)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((x.shape[0],), s, device=x.device, dtype=x.dtype)
        d = _call(denoiser, x, sig, cond).detach()
        x = x + (s_next - s) * ode_derivative(x, d, sig)
    return x


# ---------------------------------------------------------------------------------------------------------------------
# data order as a function of (seed, step)


class StepBatches(IterableDataset):
    """Endless global batches where the batch of step k is a pure function of (seed, k).

    Step k lies in epoch e = k // steps_per_epoch; epoch e visits the dataset in the order of a permutation drawn from a
    generator seeded by (seed, e); step k takes the next `batch_size` indices of it (the partial last batch is
    dropped). Under DDP, rank r of w takes rows r, r + w, ... of the global batch, so the global batch does not depend
    on the number of processes. Iteration starts at `start_step_fn()` (the trainer's global step, read when the
    iterator is created, i.e. after a checkpoint was restored): resuming continues the exact sequence.
    """

    def __init__(self, dataset, batch_size: int, seed: int, collate_fn: Callable | None = None,
                 start_step_fn: Callable[[], int] = lambda: 0, rank: int = 0, world_size: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, int(batch_size), int(seed)
        self.collate_fn = collate_fn or default_collate
        self.start_step_fn, self.rank, self.world_size = start_step_fn, int(rank), int(world_size)
        self.n = len(dataset)
        if self.batch_size > self.n:
            raise ValueError(f"batch size {self.batch_size} exceeds the {self.n} training examples")
        if self.batch_size % self.world_size:
            raise ValueError(f"global batch size {self.batch_size} is not divisible by the {self.world_size} processes")
        self.steps_per_epoch = self.n // self.batch_size

    def indices(self, step: int) -> Tensor:
        """Global batch indices of step `step`. `[batch_size]`."""
        epoch, pos = divmod(int(step), self.steps_per_epoch)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(step_seed(self.seed, epoch, 0, "data")))
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size]

    def fetch(self, idx: Tensor):
        if hasattr(self.dataset, "__getitems__"):
            return self.collate_fn(self.dataset.__getitems__(idx.tolist()))
        return self.collate_fn([self.dataset[int(i)] for i in idx])

    def __iter__(self) -> Iterator:
        step = int(self.start_step_fn())
        while True:
            yield self.fetch(self.indices(step)[self.rank::self.world_size])
            step += 1


# ---------------------------------------------------------------------------------------------------------------------
# Lightning module


class FinalCheckpoint(pl.Callback):
    """Save `last.ckpt` at the final step before EMAWeightAveraging copies the average into the model.

    Lightning's ModelCheckpoint writes `last.ckpt` in its own on_train_end when the session saved none yet, but it
    runs after EMAWeightAveraging.on_train_end, so that file's "raw" weights would be the EMA weights and a later
    `ckpt_path=last` would not continue the run exactly. This callback (placed before the EMA callback) asks every
    ModelCheckpoint to save its last checkpoint first, which also marks it saved so nothing overwrites it.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb._last_global_step_saved != trainer.global_step:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))


class _FrozenRef:
    """Holds the teacher outside the module tree: not in state_dict, not averaged by EMA, not deep-copied."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


def _split_batch(batch) -> tuple[Tensor, Any]:
    if isinstance(batch, dict):
        return batch["x"], batch.get("cond")
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class DistillationModule(pl.LightningModule):
    """Trains `student` on the projection loss against a frozen `teacher` (or on E-DSM with target="data").

    The training step: draw (sigma, eps) from the step's generator, compute per-sample losses, average, log per sigma
    bucket; on a schedule also the residual against the teacher and the teacher's Jacobian asymmetry. Validation
    computes the same quantities on fixed noise (EMA weights, swapped in by EMAWeightAveraging) and plots samples.
    """

    def __init__(self, student: EnergyStudent, teacher: Callable | None, *, target: str = "teacher",
                 sigma_data: float | None = None, p_mean: float = -1.2, p_std: float = 1.2, weighting: str = "edm",
                 lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0,
                 warmup_steps: int = 0, seed: int = 0, sigma_buckets: Sequence[float] = (0.002, 0.05, 0.2, 1.0, 5.0, 80.0),
                 diagnostics_every_n_steps: int = 0, train_data=None, val_data=None, batch_size: int = 256,
                 plot: dict | None = None, plot_dir: str | Path | None = None, run_config: dict | None = None,
                 level_loss: Callable | None = None, levels: dict | None = None):
        super().__init__()
        self.student = student
        self._teacher = _FrozenRef(teacher)
        if teacher is not None and isinstance(teacher, torch.nn.Module):
            teacher.requires_grad_(False).eval()
        if levels:  # the level term rides on the projection loss's forward pass (fkdiff.levels, issue 9)
            from fkdiff.levels import LevelMatchingLoss

            self.loss_fn = LevelMatchingLoss(sigma_data or student.sigma_data, target, p_mean, p_std, weighting, **levels)
        else:
            self.loss_fn = DenoiserMatchingLoss(sigma_data or student.sigma_data, target, p_mean, p_std, weighting)
        self.lr, self.betas, self.weight_decay, self.warmup_steps = float(lr), tuple(betas), float(weight_decay), int(warmup_steps)
        self.seed, self.sigma_buckets = int(seed), [float(e) for e in sigma_buckets]
        self.diagnostics_every_n_steps = int(diagnostics_every_n_steps or 0)
        self.train_data, self.val_data, self.batch_size = train_data, val_data, int(batch_size)
        self.plot_cfg, self.plot_dir = dict(plot or {}), (Path(plot_dir) if plot_dir else None)
        self.run_config = run_config
        self.level_loss = level_loss  # fkdiff.levels.LevelLoss: the heat-equation term pinning energy levels
        self._val_outputs: list[dict[str, Tensor]] = []

    @property
    def teacher(self):
        return self._teacher.obj

    # -- data ----------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        if self.train_data is None:
            raise RuntimeError("DistillationModule was built without train_data; pass a dataset (and collate_fn)")
        dataset, collate = self.train_data
        trainer = self._trainer
        ds = StepBatches(dataset, self.batch_size, self.seed, collate,
                         start_step_fn=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
                         rank=self.global_rank, world_size=trainer.world_size if trainer is not None else 1)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def val_dataloader(self):
        if self.val_data is None:
            return []
        dataset, collate = self.val_data
        n = len(dataset)
        size = min(n, int(self.plot_cfg.get("val_examples", 512)))
        return DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=collate, num_workers=0,
                          sampler=range(size))

    def setup(self, stage: str) -> None:
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.to(self.device)

    def on_fit_start(self) -> None:
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.to(self.device)

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.student.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        if self.warmup_steps <= 0:
            return opt
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _generator(self, stream: str) -> torch.Generator:
        rank = self.global_rank if stream != "noise" else 0  # the noise stream is global, sliced per rank
        return torch.Generator().manual_seed(step_seed(self.seed, self.global_step, rank, stream))

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, cond = _split_batch(batch)
        world = self.trainer.world_size if self._trainer is not None else 1
        out = self.loss_fn(self.student, self.teacher, x0, cond, self._generator("noise"), (self.global_rank, world))
        loss = out.loss.mean()
        if getattr(out, "level_loss", None) is not None:  # LevelMatchingLoss
            loss = loss + out.level_loss.mean()
            self.log("train/level_loss", out.level_loss.mean().detach())
        if self.level_loss is not None:
            g = torch.Generator().manual_seed(step_seed(self.seed, self.global_step, 0, "levels"))
            lev = self.level_loss(self.student, self.teacher, x0, cond, g, (self.global_rank, world), self.global_step)
            loss = loss + lev.loss.mean()
            self.log("train/level_loss", lev.loss.mean().detach())
        self.log("train/loss", loss, prog_bar=True)
        for name, val in per_bucket_mean(out.loss.detach(), out.sigma, self.sigma_buckets).items():
            self.log(f"train/loss_by_sigma/{name}", val)
        every = self.diagnostics_every_n_steps
        if every and self.teacher is not None and self.global_step % every == 0:
            self._log_diagnostics("train", out, cond)
        return loss

    def _log_diagnostics(self, prefix: str, out: LossOutput, cond: Any) -> None:
        dim = out.x_noisy[0].numel()
        if self.loss_fn.target == "teacher":
            d_teacher = out.target
        else:
            with torch.no_grad():
                d_teacher = _call(self.teacher, out.x_noisy, out.sigma, cond).to(out.x_noisy.dtype)
        resid = (out.denoised.detach() - d_teacher).flatten(1).pow(2).sum(1) / dim
        asym, scale = teacher_asymmetry(self.teacher, out.x_noisy, out.sigma, cond, self._generator("hutchinson"))
        self.log(f"{prefix}/residual", resid.mean())
        self.log(f"{prefix}/teacher_asymmetry_rel", asym.mean() / scale.mean().clamp_min(1e-30))
        for name, val in per_bucket_mean(resid, out.sigma, self.sigma_buckets).items():
            self.log(f"{prefix}/residual_by_sigma/{name}", val)
        for name, val in per_bucket_mean(asym / scale.clamp_min(1e-30), out.sigma, self.sigma_buckets).items():
            self.log(f"{prefix}/teacher_asymmetry_by_sigma/{name}", val)

    # -- validation ----------------------------------------------------------------------------
    def validation_step(self, batch, batch_idx: int) -> None:
        x0, cond = _split_batch(batch)
        g = torch.Generator().manual_seed(step_seed(self.seed, -1 - batch_idx, 0, "val"))  # same noise every time
        with torch.enable_grad():
            out = self.loss_fn(self.student, self.teacher, x0, cond, g)
        dsm = edm_loss_weight(out.sigma, self.loss_fn.sigma_data) * (out.denoised.detach() - x0).flatten(1).pow(2).sum(1)
        self.log("val/loss", out.loss.mean(), sync_dist=True)
        self.log("val/dsm_loss", dsm.mean(), sync_dist=True)
        for name, val in per_bucket_mean(out.loss.detach(), out.sigma, self.sigma_buckets).items():
            self.log(f"val/loss_by_sigma/{name}", val, sync_dist=True)
        if self.teacher is not None:
            self._log_diagnostics("val", out, cond)
        if batch_idx == 0:
            self._val_outputs = [{"x0": x0.detach().cpu(), "cond": cond}]

    def on_validation_epoch_end(self) -> None:
        if not self.plot_cfg.get("enabled", True) or self.trainer.sanity_checking or not self._val_outputs:
            return
        if self.global_rank != 0:
            return
        try:
            fig = self.plot_samples(self._val_outputs[0]["x0"], self._val_outputs[0]["cond"])
        finally:
            self._val_outputs = []
        if fig is None:
            return
        import matplotlib.pyplot as plt

        if self.plot_dir is not None:
            self.plot_dir.mkdir(parents=True, exist_ok=True)
            path = self.plot_dir / f"samples_step{self.global_step:07d}.png"
            fig.savefig(path, dpi=80)
            log_image = getattr(self.logger, "log_image", None)
            if callable(log_image):
                log_image(key="val/samples", images=[str(path)], step=self.global_step)
        plt.close(fig)

    def plot_samples(self, x0: Tensor, cond: Any = None):
        """2D: exp(-E_theta) on a grid + ODE samples over data; images: a grid of ODE samples. A matplotlib figure."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        st = self.student
        g = torch.Generator().manual_seed(step_seed(self.seed, 0, 0, "plot"))
        steps = int(self.plot_cfg.get("num_steps") or 32)
        n = int(self.plot_cfg.get("num_samples") or (512 if len(st.event_shape) == 1 else 16))
        was_training = st.training
        st.eval()
        try:
            if st.event_shape == (2,):
                fig, ax = plt.subplots(1, 2, figsize=(8, 4))
                lim = float(self.plot_cfg.get("lim", 1.5))
                sig = float(self.plot_cfg.get("sigma", 0.05))
                dens = energy_grid(st, lim, int(self.plot_cfg.get("grid", 100)), sig, self.device)
                ax[0].imshow(dens.T, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis")
                ax[0].set_title(f"exp(-E_theta), sigma={sig:g}")
                xs = euler_sample(st, (n, 2), g, num_steps=steps, sigma_min=st.sigma_min, sigma_max=st.sigma_max,
                                  device=self.device).cpu()
                ax[1].scatter(x0[:, 0], x0[:, 1], s=2, alpha=0.3, label="data")
                ax[1].scatter(xs[:, 0], xs[:, 1], s=2, alpha=0.5, label="student ODE")
                ax[1].set_xlim(-lim, lim), ax[1].set_ylim(-lim, lim), ax[1].legend(loc="upper right")
                return fig
            if len(st.event_shape) == 3:
                c = None if cond is None else cond[:n]
                n = n if c is None else len(c)
                xs = euler_sample(st, (n, *st.event_shape), g, num_steps=steps, sigma_min=st.sigma_min,
                                  sigma_max=st.sigma_max, cond=c, device=self.device).cpu()
                return image_grid_figure(xs)
            return None
        finally:
            st.train(was_training)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fkdiff_student"] = {"config": self.student.config, "run_config": self.run_config}


def energy_grid(student: Callable, lim: float, n: int, sigma: float, device="cpu") -> Tensor:
    """exp(-E) on an n x n grid over [-lim, lim]^2, normalised to sum 1. `[n, n]` indexed [ix, iy]."""
    t = torch.linspace(-lim, lim, n)
    xx, yy = torch.meshgrid(t, t, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).to(device)
    with torch.no_grad():
        e = student.energy(pts, sigma).double().cpu()
    p = torch.softmax(-e, 0)
    return p.reshape(n, n)


def image_grid_figure(xs: Tensor):
    """A square grid of images `[N, C, H, W]` with values in about [-1, 1]."""
    import matplotlib.pyplot as plt

    n = xs.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            img = ((xs[i].clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None)
    return fig
