"""Trained teachers: the EDM-preconditioned denoiser and its denoising-score-matching loss (Karras et al. 2022).

Preconditioning (Karras et al. 2022, eq. 7 and table 1; NVlabs/edm `EDMPrecond.forward`), with sd = sigma_data:

    c_skip  = sd^2 / (sigma^2 + sd^2)
    c_out   = sigma * sd / sqrt(sigma^2 + sd^2)
    c_in    = 1 / sqrt(sigma^2 + sd^2)
    c_noise = ln(sigma) / 4
    D(x, sigma, cond) = c_skip * x + c_out * F(c_in * x, c_noise, cond)

F is an x-shaped backbone from `fkdiff.nets` (MLP for vectors, UNet for images), zero-initialised at the output, so
an untrained teacher is the optimal denoiser of N(0, sd^2 I).

Training loss (Karras et al. 2022, eq. 2 and table 1; NVlabs/edm `EDMLoss`), per sample:

    ln sigma ~ N(P_mean, P_std^2),  n ~ N(0, sigma^2 I)
    L = lambda(sigma) * mean_event | D(x_0 + n, sigma, cond~) - x_0 |^2,   lambda = (sigma^2 + sd^2) / (sigma sd)^2

where cond~ is the condition replaced by the learned null token with probability p_uncond (classifier-free
guidance training, Ho & Salimans 2022), so one network gives both conditional and unconditional denoisers.
The per-sample loss is a mean over event dimensions (EDM sums; the mean keeps learning rates dimension-free).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from fkdiff.diffusion import (P_MEAN, P_STD, SIGMA_MAX, SIGMA_MIN, append_dims, as_sigma, check_batch, edm_loss_weight,
                              edm_precond, sample_training_noise)
from fkdiff.nets import build_backbone

__all__ = ["EDMDenoiser", "EDMLoss", "drop_condition"]


class EDMDenoiser(nn.Module):
    """`D(x, sigma, cond=None) = c_skip x + c_out F(c_in x, c_noise, cond)`: x `[B, *event]`, sigma float or `[B]`.

    Satisfies `fkdiff.protocols.Denoiser`. Preconditioning runs in x's dtype (float64 inputs stay float64 outside the
    network); the backbone runs in its parameters' dtype. `cond`: class labels `[B]` (long, -1 = null), positions
    `[B, cond_dim]` (NaN row = null) or None (null for every sample), as `fkdiff.nets` defines.

    Build with `EDMDenoiser.build(...)` (or `from_spec`) to record a `spec` from which `teachers.save_teacher` /
    `teachers.load_teacher` can rebuild it; a denoiser made around an arbitrary backbone works but cannot be saved.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX,
                 event_shape: Sequence[int] | None = None, spec: Mapping[str, Any] | None = None):
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.backbone = backbone
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)
        if event_shape is None:
            event_shape = getattr(backbone, "event_shape", None)
        self.event_shape = tuple(int(s) for s in event_shape) if event_shape is not None else None
        self.spec = dict(spec) if spec is not None else None

    # -- construction from a plain-data spec (what checkpoints store) ---------------------------------------------
    @classmethod
    def build(cls, event_shape: Sequence[int], *, sigma_data: float = 0.5, sigma_min: float = SIGMA_MIN,
              sigma_max: float = SIGMA_MAX, cond_kind: str = "none", num_classes: int | None = None,
              cond_dim: int | None = None, backbone: Mapping[str, Any] | None = None) -> "EDMDenoiser":
        """A denoiser around `fkdiff.nets.build_backbone(event_shape, cond_kind=..., **backbone)`."""
        bb = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(backbone or {}).items()}
        spec = {
            "event_shape": [int(s) for s in event_shape],
            "sigma_data": float(sigma_data),
            "sigma_min": float(sigma_min),
            "sigma_max": float(sigma_max),
            "cond_kind": str(cond_kind),
            "num_classes": None if num_classes is None else int(num_classes),
            "cond_dim": None if cond_dim is None else int(cond_dim),
            "backbone": bb,
        }
        return cls.from_spec(spec)

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "EDMDenoiser":
        """Rebuild from the dict `build` records (`denoiser.spec`)."""
        missing = {"event_shape", "sigma_data", "sigma_min", "sigma_max", "cond_kind", "backbone"} - set(spec)
        if missing:
            raise KeyError(f"teacher spec lacks {sorted(missing)}; it should come from EDMDenoiser.build")
        bb = dict(spec["backbone"])
        if "channels" in bb:
            bb["channels"] = tuple(bb["channels"])
        net = build_backbone(tuple(spec["event_shape"]), cond_kind=spec["cond_kind"],
                             num_classes=spec.get("num_classes"), cond_dim=spec.get("cond_dim"), **bb)
        return cls(net, spec["sigma_data"], spec["sigma_min"], spec["sigma_max"], spec["event_shape"], spec=spec)

    # -- conditioning ---------------------------------------------------------------------------------------------
    @property
    def cond_kind(self) -> str:
        emb = getattr(self.backbone, "cond_emb", None)
        return getattr(emb, "kind", "none")

    @property
    def num_classes(self) -> int | None:
        return getattr(getattr(self.backbone, "cond_emb", None), "num_classes", None)

    # -- the denoiser -----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor:
        check_batch(x)
        if self.event_shape is not None and tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"this teacher takes x of shape [B, {', '.join(map(str, self.event_shape))}], "
                             f"got {tuple(x.shape)}")
        sigma = as_sigma(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
        dtype = next(self.backbone.parameters(), x).dtype  # a parameter-free backbone runs in x's dtype
        F_x = self.backbone((c_in * x).to(dtype), c_noise.to(dtype), cond)
        return c_skip * x + c_out * F_x.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, "
                f"event_shape={self.event_shape}, cond_kind={self.cond_kind!r}")


def drop_condition(cond: Any, p_uncond: float, generator: torch.Generator | None = None,
                   shard: tuple[int, int] = (0, 1)) -> Any:
    """Replace each sample's condition by the null token with probability `p_uncond`.

    Class labels `[B]` (integer) -> -1; positions `[B, k]` (float) -> a row of NaN; None stays None (already null).
    The coin flips are drawn on `generator`'s device (the CPU for a CPU generator) for the global batch of
    B * world_size rows, and rows rank, rank + w, ... are kept (`shard = (rank, world_size)`).
    """
    if cond is None or p_uncond <= 0:
        return cond
    if not isinstance(cond, Tensor):
        raise TypeError(f"cond must be a tensor (class labels [B] or positions [B, k]) or None, got {type(cond)}")
    rank, world = shard
    device = generator.device if generator is not None else cond.device
    drop = (torch.rand(cond.shape[0] * world, generator=generator, device=device) < p_uncond)[rank::world]
    drop = drop.to(cond.device)
    if cond.is_floating_point():
        return torch.where(append_dims(drop, cond.ndim), torch.full_like(cond, float("nan")), cond)
    return torch.where(drop, torch.full_like(cond, -1), cond)


class EDMLoss:
    """Per-sample EDM denoising-score-matching loss (module docstring); returns `[B]`.

    `x0 [B, *event]`, `cond` as the denoiser takes it; `generator` (a CPU generator; None: the global RNG) drives
    sigma, the noise and the condition dropout, drawn for the global batch and sliced to this rank's rows with `shard = (rank, world_size)`
    (`fkdiff.diffusion.sample_training_noise`), so a row's draws do not depend on the number of processes.
    """

    def __init__(self, sigma_data: float, p_mean: float = P_MEAN, p_std: float = P_STD, p_uncond: float = 0.0):
        if not 0 <= p_uncond <= 1:
            raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
        self.sigma_data, self.p_mean, self.p_std, self.p_uncond = float(sigma_data), float(p_mean), float(p_std), float(
            p_uncond)

    def __call__(self, denoiser, x0: Tensor, cond: Any = None, generator: torch.Generator | None = None,
                 shard: tuple[int, int] = (0, 1)) -> Tensor:
        check_batch(x0, name="x0")
        sigma, eps = sample_training_noise(x0, generator, self.p_mean, self.p_std, shard)
        weight = edm_loss_weight(sigma, self.sigma_data)
        cond = drop_condition(cond, self.p_uncond, generator, shard)
        denoised = denoiser(x0 + append_dims(sigma, x0.ndim) * eps, sigma, cond)
        return weight * (denoised - x0).pow(2).flatten(1).mean(1)
