"""Training an EDM-preconditioned teacher by denoising score matching (Karras et al. 2022; NVlabs/edm `EDMLoss`).

    ln sigma ~ N(P_mean, P_std^2),   L = lambda(sigma) mean_event | D(x_0 + sigma eps, sigma, cond~) - x_0 |^2,
    lambda = (sigma^2 + sd^2) / (sigma sd)^2

with the condition replaced by the learned null token at rate p_uncond (one net gives conditional and unconditional
denoisers); the loss is `teachers.edm.EDMLoss`. The step's sigma, eps and dropout come from the generator of
(seed, global step) and are drawn for the global batch (`StepModule`), the batch from `StepBatches`: 1 and k DDP
processes, and a resumed run, train identically to one uninterrupted process.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from fkdiff.diffusion import P_MEAN, P_STD, SIGMA_MAX, SIGMA_MIN
from fkdiff.training.module import StepModule, adam_with_warmup
from teachers.edm import EDMDenoiser, EDMLoss

__all__ = ["TeacherModule", "teacher_spec"]


def teacher_spec(dm: Any, *, backbone: Mapping[str, Any] | None = None, conditional: bool = True,
                 sigma_data: float | None = None, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> dict:
    """The `EDMDenoiser.build` spec of a teacher for the datamodule `dm` (its event shape, condition, sigma_data)."""
    den = EDMDenoiser.build(
        dm.event_shape,
        sigma_data=float(sigma_data if sigma_data is not None else dm.sigma_data),
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        cond_kind=str(dm.cond_kind) if conditional else "none",
        num_classes=dm.num_classes,
        cond_dim=dm.cond_dim,
        backbone=dict(backbone or {}),
    )
    return den.spec


class TeacherModule(StepModule):
    """DSM training of an `EDMDenoiser` (`self.denoiser`) built from `spec` (see `EDMDenoiser.build`)."""

    def __init__(self, spec: Mapping[str, Any], lr: float = 1e-3, warmup_steps: int = 0, betas=(0.9, 0.999),
                 p_mean: float = P_MEAN, p_std: float = P_STD, p_uncond: float = 0.1, seed: int = 0,
                 val_sigmas: Sequence[float] = (0.01, 0.1, 0.5, 2.0, 10.0)):
        super().__init__(seed)
        self.save_hyperparameters()
        self.denoiser = EDMDenoiser.from_spec(spec)
        self.loss_fn = EDMLoss(spec["sigma_data"], p_mean, p_std,
                               p_uncond if self.denoiser.cond_kind != "none" else 0.0)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.loss_fn(self.denoiser, batch["x"], batch.get("cond"), self.step_generator("noise"), self.shard)
        self.log("train/loss", loss.mean(), prog_bar=True, batch_size=batch["x"].shape[0])
        return loss.mean()

    def validation_step(self, batch: dict, batch_idx: int):
        """Unweighted denoising error E|D(x0 + sigma n, sigma) - x0|^2 (per coordinate) at fixed sigmas."""
        x0, cond = batch["x"], batch.get("cond")
        g = self.step_generator("val", step=batch_idx)  # the same noise at every validation
        for s in self.hparams.val_sigmas:
            n = torch.randn(x0.shape, generator=g, dtype=x0.dtype).to(x0.device)
            err = (self.denoiser(x0 + s * n, s, cond) - x0).pow(2).mean()
            self.log(f"val/mse_sigma_{s:g}", err, batch_size=x0.shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        return adam_with_warmup(self.parameters(), hp.lr, hp.betas, 0.0, hp.warmup_steps)
