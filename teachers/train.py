"""Train an EDM-preconditioned teacher by denoising score matching: `python -m teachers.train recipe=<name> [k=v ...]`.

The loss is `teachers.edm.EDMLoss` (Karras et al. 2022, eq. 2: ln sigma ~ N(P_mean, P_std^2), weight
lambda(sigma) = (sigma^2 + sd^2)/(sigma sd)^2), with condition dropout to the null token at rate p_uncond so one net
gives conditional and unconditional denoisers. Adam with linear learning-rate warm-up, EMA of the weights
(Lightning's EMAWeightAveraging via `fkdiff.training`), gradient clipping from `trainer.gradient_clip_val`.

`train(cfg) -> Path` is a plain function (the tests call it). It writes into `cfg.run_dir`: `config.yaml` (resolved),
`checkpoints/` (Lightning, `last.ckpt` included; resume with `train_teacher.ckpt_path=last run_dir=<that run>`) and
`teacher.pt` (EMA weights + the spec to rebuild the net), which `teachers.load_teacher(path)` reads.

Randomness: network initialisation from `seed`; each step's sigma / noise / dropout from a generator seeded by
(seed, global step, rank), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from fkdiff.training import build_logger, build_trainer, resolve_ckpt_path, save_config
from teachers.edm import EDMDenoiser, EDMLoss
from teachers.load import save_teacher

__all__ = ["TeacherModule", "train", "main"]


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7919 + int(rank) * 104_729) % (2**63 - 1)


class TeacherModule(pl.LightningModule):
    """DSM training of an `EDMDenoiser` (`self.denoiser`) built from `spec` (see `EDMDenoiser.build`)."""

    def __init__(self, spec: Mapping[str, Any], lr: float = 1e-3, warmup_steps: int = 0, betas=(0.9, 0.999),
                 p_mean: float = -1.2, p_std: float = 1.2, p_uncond: float = 0.1, seed: int = 0,
                 val_sigmas=(0.01, 0.1, 0.5, 2.0, 10.0)):
        super().__init__()
        self.save_hyperparameters()
        self.denoiser = EDMDenoiser.from_spec(spec)
        self.loss_fn = EDMLoss(spec["sigma_data"], p_mean, p_std,
                               p_uncond if self.denoiser.cond_kind != "none" else 0.0)

    def _generator(self, offset: int = 0) -> torch.Generator:
        seed = _step_seed(self.hparams.seed, self.global_step + offset, self.global_rank)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict, batch_idx: int):
        loss = self.loss_fn(self.denoiser, batch["x"], batch.get("cond"), generator=self._generator()).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["x"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int):
        """Unweighted denoising error E|D(x0 + sigma n, sigma) - x0|^2 (per coordinate) at fixed sigmas."""
        x0, cond = batch["x"], batch.get("cond")
        g = torch.Generator(device=self.device).manual_seed(_step_seed(self.hparams.seed, batch_idx, 0))
        for s in self.hparams.val_sigmas:
            n = torch.randn(x0.shape, generator=g, device=x0.device, dtype=x0.dtype)
            err = (self.denoiser(x0 + s * n, s, cond) - x0).pow(2).mean()
            self.log(f"val/mse_sigma_{s:g}", err, batch_size=x0.shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.Adam(self.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        warm = max(int(hp.warmup_steps), 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _datamodule(data_cfg: Mapping):
    from fkdiff.data import build_datamodule

    data = dict(data_cfg)
    name = data.pop("name")
    return build_datamodule(name, **{k: v for k, v in data.items() if v is not None})


def teacher_spec(tcfg: Mapping, dm) -> dict:
    """The `EDMDenoiser.build` spec for the datamodule `dm` and the `train_teacher:` section `tcfg`."""
    sd = tcfg.get("sigma_data")
    den = EDMDenoiser.build(
        dm.event_shape,
        sigma_data=float(sd if sd is not None else dm.sigma_data),
        sigma_min=float(tcfg.get("sigma_min", 0.002)),
        sigma_max=float(tcfg.get("sigma_max", 80.0)),
        cond_kind=str(dm.cond_kind) if tcfg.get("conditional", True) else "none",
        num_classes=dm.num_classes,
        cond_dim=dm.cond_dim,
        backbone=dict(tcfg.get("backbone") or {}),
    )
    return den.spec


def train(cfg: DictConfig) -> Path:
    """Train a teacher as `cfg` says; return the path of the written `teacher.pt`."""
    tcfg = OmegaConf.to_container(cfg.train_teacher, resolve=True)
    run_dir = Path(cfg.run_dir)
    save_config(cfg, run_dir)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)  # network initialisation only

    dm = _datamodule(OmegaConf.to_container(cfg.data, resolve=True))
    dm.setup("fit")
    if not tcfg.get("conditional", True) or dm.cond_kind == "none":
        tcfg["p_uncond"] = 0.0
    module = TeacherModule(teacher_spec(tcfg, dm), lr=float(tcfg["lr"]), warmup_steps=int(tcfg["warmup_steps"]),
                           betas=tuple(tcfg.get("betas", (0.9, 0.999))), p_mean=float(tcfg["p_mean"]),
                           p_std=float(tcfg["p_std"]), p_uncond=float(tcfg["p_uncond"]), seed=int(cfg.seed))

    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if tcfg.get("max_steps") is not None:
        trainer_cfg["max_steps"] = int(tcfg["max_steps"])
    trainer_cfg.setdefault("max_epochs", -1)
    logger = build_logger(cfg.logger, run_dir, name=f"teacher-{cfg.data.name}",
                          config=OmegaConf.to_container(cfg, resolve=True))
    trainer = build_trainer(trainer_cfg, run_dir, logger, ema_decay=tcfg.get("ema_decay"))
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(tcfg.get("ckpt_path"), run_dir),
                weights_only=True)  # resume never unpickles code (any torch version)

    out = run_dir / str(tcfg.get("output", "teacher.pt"))
    if trainer.is_global_zero:  # after fit, EMAWeightAveraging has copied the averaged weights into the module
        save_teacher(module.denoiser, out, step=int(trainer.global_step), data=str(cfg.data.name),
                     config=OmegaConf.to_container(cfg, resolve=True))
    return out


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(lambda cfg: print(f"teacher written to {train(cfg)}"), task="train_teacher")


if __name__ == "__main__":
    main()
