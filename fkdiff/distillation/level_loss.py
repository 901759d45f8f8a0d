"""The level term (fkdiff/levels.py eq. 3), trained with the projection loss on one forward pass (issue 9).

    L = L_projection + w E_pairs [ (q_a - q_b)^2 / 2 ],   q = sigma dE_theta/dsigma - T_teacher(x, sigma)

The projection loss (`fkdiff.distillation.loss`) fixes grad_x E only: at small sigma the relative levels of separated
regions are pinned by nothing, yet SMC weights are energy differences. The teacher's time score T (heat equation, by
Tweedie; `fkdiff.levels.teacher_time_score`) pins them; differences between two samples at the same sigma cancel the
student's free per-sigma constant. `sigma dE_theta/dsigma` comes from the same autograd call as grad_x E.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from fkdiff.diffusion import P_MEAN, P_STD, SIGMA_MIN, append_dims
from fkdiff.distillation.loss import DenoiserMatchingLoss, denoise
from fkdiff.levels import PairSigmaLaw, divergence_kind, energy_grad_and_time_score, teacher_time_score

__all__ = ["LevelMatchingLoss", "LevelMatchingOutput"]


class LevelMatchingOutput(NamedTuple):
    loss: Tensor         # [B] lambda(sigma) |D_theta - target|^2, as DenoiserMatchingLoss
    sigma: Tensor        # [B]
    x_noisy: Tensor      # [B, *event]
    denoised: Tensor     # [B, *event]
    target: Tensor       # [B, *event]
    level_loss: Tensor   # [P_r] w (q_a - q_b)^2 / 2 per pair, eq. (3)
    level_sigma: Tensor  # [P_r] the pairs' common sigma
    dq: Tensor           # [P_r] q_a - q_b (detached): nats per unit ln sigma


class LevelMatchingLoss(DenoiserMatchingLoss):
    """The projection loss plus the level term (3) on the same forward pass (module docstring).

    `num_pairs` P pairs per global batch (None: a quarter of the global batch) join rows j and j + B/2 (on each of
    `world` processes: its local rows i and i + B_local/2, P/world of them; the pairs' noise is drawn for the whole
    global batch and sliced per rank, so the term does not depend on the process count). A pair's common sigma is
    log-uniform in [sigma_lo, sigma_hi] (`fkdiff.levels.PairSigmaLaw`: an error of the time score costs the same at
    every ln sigma). `rows`: "shared" -- the pairs are rows of the batch, their sigma replaces the training law's,
    so the projection loss sees the mixture (1 - 2P/B) LogNormal(p_mean, p_std) + (2P/B) LogUniform (more mass at
    small sigma, where the levels are set); "extra" -- the pairs are 2P rows more (x0 rows i and i + B/2 again, with
    their own noise) on the same autograd call, the projection loss keeps the B rows of its training law (1 + 2P/B
    rows per step). The teacher's
    divergence: `divergence` "exact" (central differences along every axis), "hutchinson" (`num_probes` Rademacher
    probes) or "auto" (exact for d <= `exact_max_dim`). Only for `target="teacher"`: the teacher's time score is the
    target.

    Training (student in train mode, grad enabled) returns `LevelMatchingOutput` (the training step adds the means
    of `loss` and `level_loss`); evaluation returns the plain projection loss (`LossOutput`, the training sigma
    law), so validation losses compare with and without the term.
    """

    def __init__(self, sigma_data: float, target: str = "teacher", p_mean: float = P_MEAN, p_std: float = P_STD,
                 weighting: str = "edm", *, weight: float = 0.1, num_pairs: int | None = None,
                 sigma_lo: float = SIGMA_MIN, sigma_hi: float = 1.0, divergence: str = "auto", num_probes: int = 1,
                 exact_max_dim: int = 8, fd_step: float | None = None, rows: str = "shared",
                 sigma_range: tuple[float, float] | None = None):
        super().__init__(sigma_data, target, p_mean, p_std, weighting, sigma_range)
        if self.sigma_range is not None:  # the pairs' sigma stays inside the teacher's range too
            sigma_lo, sigma_hi = max(float(sigma_lo), self.sigma_range[0]), min(float(sigma_hi), self.sigma_range[1])
        if target != "teacher":
            raise ValueError("the level term matches the teacher's time score: it needs distill.target=teacher "
                             "(set distill.levels.weight=0 for the E-DSM baseline)")
        if weight < 0:
            raise ValueError(f"level term: weight must be >= 0, got {weight}")
        if num_pairs is not None and int(num_pairs) < 1:
            raise ValueError(f"level term: num_pairs must be >= 1 (or None: a quarter of the batch), got {num_pairs}")
        if divergence not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"level term: divergence must be auto, exact or hutchinson, got {divergence!r}")
        if rows not in ("shared", "extra"):
            raise ValueError(f"level term: rows must be shared or extra, got {rows!r}")
        self.rows = rows
        self.level_weight, self.num_pairs = float(weight), None if num_pairs is None else int(num_pairs)
        self.law = PairSigmaLaw(float(sigma_lo), float(sigma_hi))
        self.divergence, self.num_probes, self.exact_max_dim = divergence, int(num_probes), int(exact_max_dim)
        self.fd_step = fd_step

    def global_pairs(self, batch: int, world: int) -> int:
        """P: `num_pairs`, or a quarter of the global batch (batch = per-process rows)."""
        return self.num_pairs if self.num_pairs is not None else max(world, (batch * world // 4) // world * world)

    def pair_rows(self, batch: int, world: int) -> tuple[int, int]:
        """(P_r pairs on this process, B_local / 2)."""
        p = self.global_pairs(batch, world)
        if batch % 2 or p % world or p // world > batch // 2:
            raise ValueError(f"level term: num_pairs={p} must be a multiple of the {world} processes and at most "
                             f"half the per-process batch ({batch}, which must be even)")
        return p // world, batch // 2

    def draw_pairs(self, x0: Tensor, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                   ) -> tuple[Tensor, Tensor]:
        """rows "shared": (sigma `[B]`, eps) as `draw`, with the pair rows' sigma replaced by the pairs' common sigma.
        rows "extra": (sigma `[B + 2 P_r]`, eps `[B + 2 P_r, *event]`): `draw`'s B rows (the training law, untouched)
        followed by the 2 P_r pair rows (x0 rows i and i + B/2, i < P_r) with their own noise."""
        sigma, eps = self.draw(x0, generator, shard)
        rank, world = shard
        pr, half = self.pair_rows(x0.shape[0], world)
        p = self.global_pairs(x0.shape[0], world)
        sig = self.law.draw(p, generator)[rank::world].to(sigma)
        if self.rows == "extra":
            shape = (p, *x0.shape[1:])
            eps_a = torch.randn(shape, generator=generator, dtype=eps.dtype)[rank::world].to(eps.device)
            eps_b = torch.randn(shape, generator=generator, dtype=eps.dtype)[rank::world].to(eps.device)
            return torch.cat([sigma, sig, sig]), torch.cat([eps, eps_a, eps_b])
        sigma = sigma.clone()
        sigma[:pr], sigma[half:half + pr] = sig, sig
        return sigma, eps

    def expand(self, x0: Tensor, cond: Any, world: int = 1) -> tuple[Tensor, Any]:
        """The rows the noise of `draw_pairs` applies to: x0 itself (rows "shared"), or x0 followed by its pair rows
        i and i + B/2, i < P_r (rows "extra"), and their conditions."""
        if self.rows == "shared":
            return x0, cond
        pr, half = self.pair_rows(x0.shape[0], world)
        idx = torch.cat([torch.arange(x0.shape[0]), torch.arange(pr), half + torch.arange(pr)]).to(x0.device)
        return x0[idx], None if cond is None else cond[idx]

    def __call__(self, student: Callable, teacher: Callable | None, x0: Tensor, cond: Any,
                 generator: torch.Generator, shard: tuple[int, int] = (0, 1)):
        if teacher is None:
            raise ValueError("the level term needs a teacher (its time score is the target)")
        if not (getattr(student, "training", True) and torch.is_grad_enabled()):
            return super().__call__(student, teacher, x0, cond, generator, shard)
        sigma, eps = self.draw_pairs(x0, generator, shard)
        b = x0.shape[0]
        pr, half = self.pair_rows(b, shard[1])
        x0, cond = self.expand(x0, cond, shard[1])
        x_noisy = x0 + append_dims(sigma, x0.ndim) * eps
        with torch.no_grad():
            target = denoise(teacher, x_noisy, sigma, cond).to(x0.dtype)
        _, grad, ts = energy_grad_and_time_score(student, x_noisy, sigma, cond, create_graph=True)
        denoised = x_noisy - append_dims(sigma, x0.ndim) ** 2 * grad  # D_theta = x - sigma^2 grad E (Tweedie)
        if self.rows == "shared":
            rows = torch.cat([torch.arange(pr), half + torch.arange(pr)]).to(x0.device)
        else:  # the projection loss keeps the B rows of the training law; the pairs are the rows after them
            rows = torch.arange(b, b + 2 * pr, device=x0.device)
        loss = self.weight(sigma[:b]) * (denoised[:b] - target[:b]).flatten(1).pow(2).sum(1)
        div = divergence_kind(self.divergence, x0[0].numel(), self.exact_max_dim)
        t = teacher_time_score(teacher, x_noisy[rows], sigma[rows], None if cond is None else cond[rows],
                               divergence=div, num_probes=self.num_probes, step=self.fd_step, generator=generator,
                               denoised=target[rows])
        q = ts[rows] - t.to(ts.dtype)
        dq = q[:pr] - q[pr:]
        return LevelMatchingOutput(loss, sigma[:b], x_noisy[:b], denoised[:b], target[:b],
                                   self.level_weight * 0.5 * dq.pow(2), sigma[rows[:pr]], dq.detach())
