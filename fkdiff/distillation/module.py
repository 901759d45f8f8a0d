"""The distillation LightningModule: a student energy trained on the projection loss against a frozen teacher.

A training step: the loss of `fkdiff.distillation.loss` (plus the level term of `fkdiff.distillation.level_loss`
when the loss is a `LevelMatchingLoss`) on this rank's rows of the step's global batch, with the
step's (sigma, eps) (`StepModule`: drawn from (seed, step) for the whole global batch), logged per sigma bucket; every
`diagnostics_every_n_steps` steps also the residual against the teacher and the teacher's Jacobian asymmetry. With
`off_condition` (`fkdiff.distillation.conditions.OffConditionRows`) the training rows' conditions are first re-labelled
(null token / another class) from the step's "condition" stream; validation keeps the data's own labels.
Validation computes the same on fixed noise, with the EMA weights (swapped in by EMAWeightAveraging). Batches come
from the datamodule (`fkdiff.data.StepBatches`), plots from `fkdiff.distillation.callbacks.SamplePlots`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN, edm_loss_weight
from fkdiff.distillation.conditions import OffConditionRows
from fkdiff.distillation.diagnostics import per_bucket_mean, teacher_asymmetry
from fkdiff.distillation.loss import DenoiserMatchingLoss, LossOutput, denoise, split_batch
from fkdiff.energy import EnergyStudent
from fkdiff.training.module import StepModule, adam_with_warmup

__all__ = ["DistillationModule"]


class _FrozenRef:
    """Holds the teacher outside the module tree: not in state_dict, not averaged by EMA, not deep-copied."""

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self


class DistillationModule(StepModule):
    """Trains `student` on `loss_fn` (default: the projection loss) against a frozen `teacher` (module docstring)."""

    def __init__(self, student: EnergyStudent, teacher: Callable | None, loss_fn: DenoiserMatchingLoss | None = None,
                 *, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999), weight_decay: float = 0.0,
                 warmup_steps: int = 0, seed: int = 0,
                 sigma_buckets: Sequence[float] = (SIGMA_MIN, 0.05, 0.2, 1.0, 5.0, SIGMA_MAX),
                 diagnostics_every_n_steps: int = 0, run_config: dict | None = None, conditional: bool = True,
                 off_condition: OffConditionRows | None = None):
        super().__init__(seed)
        self.conditional = bool(conditional)  # False: the batches' conditions are dropped (an unconditional teacher)
        self.off_condition = off_condition  # training rows re-labelled (null token / another class): conditions.py
        self.student = student
        self._teacher = _FrozenRef(teacher)
        if isinstance(teacher, torch.nn.Module):
            teacher.requires_grad_(False).eval()
        self.loss_fn = loss_fn or DenoiserMatchingLoss(student.sigma_data)
        self.lr, self.betas, self.weight_decay = float(lr), tuple(betas), float(weight_decay)
        self.warmup_steps = int(warmup_steps)
        self.sigma_buckets = [float(e) for e in sigma_buckets]
        self.diagnostics_every_n_steps = int(diagnostics_every_n_steps or 0)
        self.run_config = run_config

    @property
    def teacher(self):
        return self._teacher.obj

    def setup(self, stage: str) -> None:
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.to(self.device)

    def configure_optimizers(self):
        return adam_with_warmup(self.student.parameters(), self.lr, self.betas, self.weight_decay, self.warmup_steps)

    def _split(self, batch) -> tuple[Tensor, Any]:
        x0, cond = split_batch(batch)
        return x0, (cond if self.conditional else None)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        x0, cond = self._split(batch)
        if self.off_condition is not None:  # the student copies the teacher under the new condition too
            cond = self.off_condition(cond, self.step_generator("condition"), self.shard)
        out = self.loss_fn(self.student, self.teacher, x0, cond, self.step_generator("noise"), self.shard)
        self._log_losses("train", out, prog_bar=True)
        loss = out.loss.mean()
        level = getattr(out, "level_loss", None)  # LevelMatchingLoss: the level term rides on the same forward pass
        if level is not None:
            loss = loss + level.mean()
            self.log("train/level_loss", level.mean().detach())
            self.log("train/level_dq_rms", out.dq.pow(2).mean().sqrt())
        every = self.diagnostics_every_n_steps
        if every and self.teacher is not None and self.global_step % every == 0:
            self._log_diagnostics("train", out, cond)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x0, cond = self._split(batch)
        with torch.enable_grad():
            out = self.loss_fn(self.student, self.teacher, x0, cond, self.step_generator("val", step=batch_idx))
        dsm = edm_loss_weight(out.sigma, self.loss_fn.sigma_data) * (out.denoised.detach() - x0).flatten(1).pow(2).sum(1)
        self._log_losses("val", out, sync_dist=True)
        self.log("val/dsm_loss", dsm.mean(), sync_dist=True)
        if self.teacher is not None:
            self._log_diagnostics("val", out, cond)

    def _log_losses(self, prefix: str, out: LossOutput, **kw) -> None:
        self.log(f"{prefix}/loss", out.loss.mean(), **kw)
        kw.pop("prog_bar", None)
        for name, val in per_bucket_mean(out.loss.detach(), out.sigma, self.sigma_buckets).items():
            self.log(f"{prefix}/loss_by_sigma/{name}", val, **kw)

    def _log_diagnostics(self, prefix: str, out: LossOutput, cond: Any) -> None:
        dim = out.x_noisy[0].numel()
        if self.loss_fn.target == "teacher":
            d_teacher = out.target
        else:
            with torch.no_grad():
                d_teacher = denoise(self.teacher, out.x_noisy, out.sigma, cond).to(out.x_noisy.dtype)
        resid = (out.denoised.detach() - d_teacher).flatten(1).pow(2).sum(1) / dim
        asym, scale = teacher_asymmetry(self.teacher, out.x_noisy, out.sigma, cond,
                                        self.step_generator("hutchinson", per_rank=True))
        self.log(f"{prefix}/residual", resid.mean())
        self.log(f"{prefix}/teacher_asymmetry_rel", asym.mean() / scale.mean().clamp_min(1e-30))
        for name, val in per_bucket_mean(resid, out.sigma, self.sigma_buckets).items():
            self.log(f"{prefix}/residual_by_sigma/{name}", val)
        for name, val in per_bucket_mean(asym / scale.clamp_min(1e-30), out.sigma, self.sigma_buckets).items():
            self.log(f"{prefix}/teacher_asymmetry_by_sigma/{name}", val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fkdiff_student"] = {"config": self.student.config, "run_config": self.run_config}
