"""Adapters: other people's diffusion networks seen as EDM denoisers `D(x, sigma, cond=None)` (DESIGN.md section 2).

In the style of k-diffusion's `external.py`: thin classes, one per output type and schedule, each overriding one
method.

Discrete variance-preserving (DDPM) nets, trained on x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t = 0..T-1:

    sigma_t = sqrt((1 - abar_t) / abar_t)                         (the VE noise level of step t)
    x_t     = x_sigma * sqrt(abar),  abar = 1 / (1 + sigma^2)      (VP input from the VE state)
    t(sigma) = fractional index, linear interpolation of ln sigma between the two neighbouring steps
               (or the nearest step with t_mode="nearest")
    eps-prediction (Ho et al. 2020):          D = x_sigma - sigma * eps_hat(x_t, t)
    x0-prediction:                             D = x0_hat(x_t, t)
    v-prediction (Salimans & Ho 2022), v = sqrt(abar) eps - sqrt(1-abar) x_0:
                                               D = x_sigma / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat(x_t, t)

sigma_min / sigma_max are the schedule's sigma_0 / sigma_{T-1}; a sigma outside them raises ValueError unless the
adapter was built with `clamp=True` (then t is clamped to [0, T-1] while x_t still uses the exact sigma).

EDM-style nets: `EDMNetDenoiser` wraps a net that already returns D (`net(x, sigma, class_labels)`, e.g. NVlabs/edm's
`EDMPrecond`); a raw backbone F(c_in x, c_noise, cond) is wrapped by `teachers.EDMDenoiser` (EDM preconditioning).
Continuous variance-exploding nets `net(x_sigma, sigma[, cond])` (score-SDE VE models, k-diffusion-style models, your
own), one class per output type:
    x0-prediction:      D = net(x, sigma)                       (`VEDenoiser`)
    eps-prediction:     D = x - sigma * eps_hat(x, sigma)        (`VEEpsDenoiser`)
    score-prediction:   D = x + sigma^2 * s_hat(x, sigma)        (`VEScoreDenoiser`, Tweedie)
`load_edm_pickle` reads NVlabs/edm `network-snapshot-*.pkl` files. Pickles execute code while loading, so it refuses
unless `allow_pickle=True`, and it needs EDM's own modules (`dnnlib`, `torch_utils`) importable (`code_dir=`).

diffusers: `from_diffusers` wraps a `UNet2DModel` (and its scheduler's `alphas_cumprod` and `prediction_type`); the
`diffusers` package is imported only there (`pip install fkdiff[diffusers]`).
"""

from __future__ import annotations

import math
import pickle
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from fkdiff.diffusion import (SIGMA_MAX, SIGMA_MIN, append_dims, as_sigma, check_batch, denoiser_from_eps,
                              denoiser_from_score, vp_alpha_bar_from_sigma, vp_sigma_from_alpha_bar)
from teachers.load import strict_bool, teacher_kind, teacher_network

__all__ = [
    "make_alphas_cumprod",
    "DiscreteVPDenoiser",
    "VPEpsDenoiser",
    "VPX0Denoiser",
    "VPVDenoiser",
    "VP_ADAPTERS",
    "vp_denoiser",
    "EDMNetDenoiser",
    "VEDenoiser",
    "VEEpsDenoiser",
    "VEScoreDenoiser",
    "VE_ADAPTERS",
    "load_edm_pickle",
    "DiffusersUNet",
    "from_diffusers",
]


def make_alphas_cumprod(kind: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                        beta_end: float = 0.02, cosine_s: float = 0.008) -> Tensor:
    """Cumulative products abar_t of standard DDPM beta schedules, float64 `[num_timesteps]`.

    `linear` (Ho et al. 2020), `scaled_linear` (linear in sqrt(beta), Stable Diffusion), `cosine` (Nichol & Dhariwal
    2021, eq. 17, betas clipped at 0.999).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}")
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    elif kind == "cosine":
        s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((s + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; use linear, scaled_linear or cosine")
    return torch.cumprod(1 - betas, dim=0)


class DiscreteVPDenoiser(nn.Module):
    """Base adapter for a VP net `net(x_t, t[, cond])` on a discrete `alphas_cumprod` schedule (module docstring).

    Subclasses override `denoise_from_output(out, x, sigma)`, one per output type. x `[B, *event]`, sigma float or
    `[B]`; `t` is passed to the net as a float tensor `[B]` (fractional unless `t_mode="nearest"`).
    """

    def __init__(self, net: Callable, alphas_cumprod: Tensor, *, sigma_data: float = 0.5, clamp: bool = False,
                 t_mode: str = "interpolate"):
        super().__init__()
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if abar.numel() < 2 or not ((abar > 0) & (abar < 1)).all():
            raise ValueError("alphas_cumprod must hold >= 2 values strictly between 0 and 1")
        log_sigmas = vp_sigma_from_alpha_bar(abar).log()
        if not (log_sigmas[1:] > log_sigmas[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (sigma strictly increasing in t)")
        if t_mode not in ("interpolate", "nearest"):
            raise ValueError(f"t_mode must be 'interpolate' or 'nearest', got {t_mode!r}")
        self.net = net
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)
        self.sigma_min, self.sigma_max = float(log_sigmas[0].exp()), float(log_sigmas[-1].exp())
        self.sigma_data, self.clamp, self.t_mode = float(sigma_data), bool(clamp), t_mode

    @property
    def sigmas(self) -> Tensor:
        """sigma_t for t = 0..T-1, float64 `[T]`."""
        return self.log_sigmas.exp()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Fractional step index of each sigma `[B]` (linear in ln sigma between neighbouring steps)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        ls = sigma.to(torch.float64).log()
        if not self.clamp:
            tol = 1e-6
            lo, hi = ls.min().item(), ls.max().item()
            if lo < log_sigmas[0].item() - tol or hi > log_sigmas[-1].item() + tol:
                raise ValueError(
                    f"sigma in [{math.exp(lo):.4g}, {math.exp(hi):.4g}] lies outside this schedule's range "
                    f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}]; build the adapter with clamp=True to clamp t")
        ls = ls.clamp(log_sigmas[0], log_sigmas[-1])
        hi_idx = torch.searchsorted(log_sigmas, ls).clamp(1, log_sigmas.numel() - 1)
        lo_idx = hi_idx - 1
        w = (ls - log_sigmas[lo_idx]) / (log_sigmas[hi_idx] - log_sigmas[lo_idx])
        t = lo_idx.to(torch.float64) + w.clamp(0, 1)
        return t.round() if self.t_mode == "nearest" else t

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """sigma at (fractional) step t `[B]`, interpolating ln sigma; the inverse of `sigma_to_t`."""
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.to(torch.float64).clamp(0, log_sigmas.numel() - 1)
        lo = t.floor().long().clamp(max=log_sigmas.numel() - 2)
        w = t - lo
        return ((1 - w) * log_sigmas[lo] + w * log_sigmas[lo + 1]).exp()

    @property
    def cond_kind(self) -> str | None:
        """The wrapped net's conditioning ("none", "class", ...) when it declares one, else None (unknown)."""
        return getattr(self.net, "cond_kind", None)

    @property
    def num_classes(self) -> int | None:
        return getattr(self.net, "num_classes", None)

    def get_output(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The wrapped net's raw output at VP input `x_t` and step `t`."""
        return self.net(x_t, t) if cond is None else self.net(x_t, t, cond)

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define how its net's output becomes D")

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor:
        check_batch(x)
        sigma = as_sigma(sigma, x)
        t = self.sigma_to_t(sigma).to(x.dtype)
        s = append_dims(sigma, x.ndim)
        out = self.get_output(x / (1 + s**2).sqrt(), t, cond)
        if out.shape != x.shape:
            raise ValueError(f"the wrapped net returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
        return self.denoise_from_output(out.to(x.dtype), x, s)


class VPEpsDenoiser(DiscreteVPDenoiser):
    """eps-prediction (DDPM): D = x_sigma - sigma * eps_hat."""

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return x - sigma * out


class VPX0Denoiser(DiscreteVPDenoiser):
    """x0-prediction: D = x0_hat."""

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return out


class VPVDenoiser(DiscreteVPDenoiser):
    """v-prediction: D = x_sigma / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v_hat."""

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return x / (1 + sigma**2) - sigma / (1 + sigma**2).sqrt() * out


VP_ADAPTERS = {"eps": VPEpsDenoiser, "x0": VPX0Denoiser, "v": VPVDenoiser}
# diffusers' names for the same three output types
_DIFFUSERS_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


def vp_denoiser(net: Callable, alphas_cumprod: Tensor, prediction: str = "eps", **kwargs) -> DiscreteVPDenoiser:
    """The VP adapter for `prediction` in {eps, x0, v} (diffusers' epsilon / sample / v_prediction also accepted)."""
    key = _DIFFUSERS_PREDICTION.get(prediction, prediction)
    if key not in VP_ADAPTERS:
        raise ValueError(f"unknown prediction type {prediction!r}; use eps, x0 or v")
    return VP_ADAPTERS[key](net, alphas_cumprod, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# EDM-style nets
# --------------------------------------------------------------------------------------------------------------------
class EDMNetDenoiser(nn.Module):
    """A net that returns D itself, `net(x, sigma[, class_labels])` (NVlabs/edm `EDMPrecond`, `VPPrecond`, ...).

    `label_dim > 0`: integer labels `[B]` become one-hot `[B, label_dim]` (label -1 -> all zeros, EDM's
    "no label"); float `[B, label_dim]` tensors pass through. sigma_min / sigma_max default to the net's own
    attributes, limited to EDM's sampler defaults [SIGMA_MIN, SIGMA_MAX] (EDMPrecond declares [0, inf]).
    """

    def __init__(self, net: Callable, *, sigma_data: float | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, label_dim: int | None = None):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data if sigma_data is not None else getattr(net, "sigma_data", 0.5))
        own_min, own_max = float(getattr(net, "sigma_min", 0)), float(getattr(net, "sigma_max", SIGMA_MAX))
        self.sigma_min = float(sigma_min if sigma_min is not None else max(SIGMA_MIN, own_min))
        self.sigma_max = float(sigma_max if sigma_max is not None else min(SIGMA_MAX, own_max))
        self.label_dim = int(label_dim if label_dim is not None else getattr(net, "label_dim", 0) or 0)

    @property
    def cond_kind(self) -> str:
        """"class" for a net with `label_dim` > 0 (EDM's class-conditional nets), else "none"."""
        return "class" if self.label_dim else "none"

    @property
    def num_classes(self) -> int | None:
        return self.label_dim or None

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor:
        check_batch(x)
        sigma = as_sigma(sigma, x)
        if cond is None:
            if self.label_dim:  # EDM's conditional nets take a label vector; zeros = no class
                cond = torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=x.dtype)
                return self.net(x, sigma, cond)
            return self.net(x, sigma)
        if self.label_dim and not cond.is_floating_point():
            onehot = torch.zeros(x.shape[0], self.label_dim + 1, device=x.device, dtype=x.dtype)
            onehot.scatter_(1, torch.where(cond < 0, self.label_dim, cond).long()[:, None], 1.0)
            cond = onehot[:, : self.label_dim]
        return self.net(x, sigma, cond)


class VEDenoiser(nn.Module):
    """A continuous variance-exploding net `net(x_sigma, sigma[, cond])` predicting x0, seen as `D(x, sigma, cond)`.

    Subclasses convert other output types (`denoise_from_output`, the one method they override). `sigma_min` /
    `sigma_max` / `sigma_data` describe the range and data scale the net was trained for (EDM's defaults).
    """

    prediction = "x0"

    def __init__(self, net: Callable, *, sigma_data: float = 0.5, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.net = net
        self.sigma_data, self.sigma_min, self.sigma_max = float(sigma_data), float(sigma_min), float(sigma_max)

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return out

    def forward(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor:
        check_batch(x)
        sigma = as_sigma(sigma, x)
        out = self.net(x, sigma) if cond is None else self.net(x, sigma, cond)
        return self.denoise_from_output(out.to(x.dtype), x, sigma)


class VEEpsDenoiser(VEDenoiser):
    """eps-prediction: D = x - sigma eps_hat."""

    prediction = "eps"

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return denoiser_from_eps(out, x, sigma)


class VEScoreDenoiser(VEDenoiser):
    """score-prediction: D = x + sigma^2 s_hat (Tweedie)."""

    prediction = "score"

    def denoise_from_output(self, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
        return denoiser_from_score(out, x, sigma)


VE_ADAPTERS = {cls.prediction: cls for cls in (VEDenoiser, VEEpsDenoiser, VEScoreDenoiser)}


@contextmanager
def _on_sys_path(code_dir: str | Path | None):
    if code_dir is None:
        yield
        return
    code_dir = str(Path(code_dir).resolve())
    if not Path(code_dir).is_dir():
        raise FileNotFoundError(f"code_dir {code_dir} is not a folder; it should be a clone of github.com/NVlabs/edm")
    added = code_dir not in sys.path
    if added:
        sys.path.insert(0, code_dir)
    try:
        yield
    finally:
        if added and code_dir in sys.path:
            sys.path.remove(code_dir)


def load_edm_pickle(path: str | Path, *, allow_pickle: bool = False, code_dir: str | Path | None = None,
                    key: str = "ema", device: torch.device | str | None = None, **kwargs) -> EDMNetDenoiser:
    """Load an NVlabs/edm network pickle (`network-snapshot-*.pkl`) as an `EDMNetDenoiser` (eval mode).

    Unpickling runs code named inside the file, so this refuses unless `allow_pickle=True`: load only files you
    trust. The pickle references EDM's own modules (`torch_utils`, `dnnlib`, `training`): pass `code_dir=<a clone
    of github.com/NVlabs/edm>` or put it on PYTHONPATH. `kwargs` go to `EDMNetDenoiser`.
    """
    path = Path(path)
    if allow_pickle is not True:  # only the boolean True opts in: "false", "no", 1, ... never unpickle
        if allow_pickle not in (False, None):
            raise TypeError(f"allow_pickle must be the boolean True or False, got {allow_pickle!r} "
                            f"({type(allow_pickle).__name__}); refusing to unpickle {path}")
        raise PermissionError(
            f"refusing to unpickle {path}: pickles execute arbitrary code while loading. If you trust the file, pass "
            "allow_pickle=True (config: teacher.allow_pickle=true).")
    if not path.is_file():
        raise FileNotFoundError(f"EDM network pickle {path} not found (NVlabs/edm writes network-snapshot-*.pkl)")
    with _on_sys_path(code_dir):
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"unpickling {path} needs NVlabs/edm's code (missing module {e.name!r}): `git clone "
                "https://github.com/NVlabs/edm` and pass code_dir=<the clone> (config: teacher.code_dir) or add it "
                "to PYTHONPATH", name=e.name) from e
    net = data[key] if isinstance(data, dict) else data
    if not callable(net):
        raise TypeError(f"{path}[{key!r}] is a {type(net).__name__}, not a network")
    if isinstance(net, nn.Module):
        net = net.eval().requires_grad_(False)
        if device is not None:
            net = net.to(device)
    return EDMNetDenoiser(net, **kwargs).eval()


# --------------------------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------------------------
def _import_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("the diffusers adapter needs the `diffusers` package: pip install fkdiff[diffusers]") from e
    return diffusers


class DiffusersUNet(nn.Module):
    """`UNet2DModel` as `net(x_t, t[, class_labels]) -> output`; a learned-variance output keeps its first half.

    Conditioning follows the UNet's config: `num_class_embeds` = K (an embedding table) makes it class-conditional
    (`cond_kind` "class", labels in [0, K): diffusers' tables have no null class, so cond=None or the label -1 cannot
    be evaluated), none makes it unconditional (a given condition is an error: the teacher would ignore it).
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        config = getattr(unet, "config", None)
        embed_type = getattr(config, "class_embed_type", None)
        if embed_type is not None:
            raise ValueError(f"diffusers UNet with class_embed_type={embed_type!r}: only label tables "
                             "(num_class_embeds, class_embed_type=None) are supported")
        self.unet = unet
        self.num_classes = getattr(config, "num_class_embeds", None) if getattr(unet, "class_embedding", None) is not \
            None else None
        self.cond_kind = "class" if self.num_classes else "none"

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        if self.cond_kind == "none" and cond is not None:
            raise ValueError("this diffusers teacher is unconditional (its UNet has no num_class_embeds) but a "
                             "condition was given; distil it with an unconditional student (student.conditional=false "
                             "is chosen automatically by fkdiff.distill)")
        if self.cond_kind == "class" and cond is None:
            raise ValueError(f"this diffusers teacher is class-conditional (num_class_embeds={self.num_classes}) and "
                             "has no null class: pass class labels [B] in [0, num_classes)")
        dtype = next(self.unet.parameters()).dtype
        out = self.unet(x_t.to(dtype), t.to(dtype), class_labels=cond).sample
        if out.shape[1] == 2 * x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        return out.to(x_t.dtype)


def from_diffusers(unet: Any, scheduler: Any = None, *, alphas_cumprod: Tensor | None = None,
                   prediction: str | None = None, subfolder: str | None = "unet", sigma_data: float = 0.5,
                   clamp: bool = False, t_mode: str = "interpolate",
                   device: torch.device | str | None = None) -> DiscreteVPDenoiser:
    """A diffusers `UNet2DModel` (or a folder / pipeline folder holding one) as an EDM denoiser.

    The schedule comes from `alphas_cumprod`, else `scheduler.alphas_cumprod` (a DDPM/DDIM scheduler object, or one
    loaded from the pipeline folder's `scheduler/`); the output type from `prediction`, else the scheduler's
    `prediction_type`, else eps.
    """
    diffusers = _import_diffusers()
    if isinstance(unet, (str, Path)):
        folder = Path(unet)
        if not folder.exists():
            raise FileNotFoundError(f"diffusers model folder {folder} not found")
        sub = subfolder if subfolder and (folder / subfolder).is_dir() else None
        if scheduler is None and alphas_cumprod is None:
            # a pipeline folder (unet/ + scheduler/) or a flat one (config.json + scheduler_config.json, as the
            # hub's google/ddpm-cifar10-32)
            if (folder / "scheduler").is_dir():
                scheduler = diffusers.DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
            elif (folder / "scheduler_config.json").is_file():
                scheduler = diffusers.DDPMScheduler.from_pretrained(str(folder))
        # safetensors when the folder has them; diffusers reads a *.bin with torch.load(weights_only=True)
        unet = diffusers.UNet2DModel.from_pretrained(str(folder), subfolder=sub, low_cpu_mem_usage=False)
    if alphas_cumprod is None:
        if scheduler is None:
            raise ValueError("from_diffusers needs alphas_cumprod or a scheduler with alphas_cumprod")
        alphas_cumprod = scheduler.alphas_cumprod
    if prediction is None:
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None) or "eps"
    unet = unet.eval().requires_grad_(False)
    if device is not None:
        unet = unet.to(device)
    return vp_denoiser(DiffusersUNet(unet), alphas_cumprod, prediction, sigma_data=sigma_data, clamp=clamp,
                       t_mode=t_mode).eval()


def _diffusers_spec(teacher: Any) -> dict | None:
    """The architecture of a diffusers-UNet VP teacher as plain data (`teachers.load.network_spec`)."""
    if not (isinstance(teacher, DiscreteVPDenoiser) and isinstance(teacher.net, DiffusersUNet)):
        return None
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(teacher.net.unet.config).items()
              if not k.startswith("_")}
    prediction = {cls: key for key, cls in VP_ADAPTERS.items()}[type(teacher)]
    return {"unet_config": config, "alphas_cumprod": vp_alpha_bar_from_sigma(teacher.sigmas).tolist(),
            "prediction": prediction, "sigma_data": teacher.sigma_data, "t_mode": teacher.t_mode}


def _diffusers_build(spec) -> DiscreteVPDenoiser:
    diffusers = _import_diffusers()
    unet = diffusers.UNet2DModel.from_config(dict(spec["unet_config"]))
    # clamp: a student's copy must not stop (or synchronise with the host) on a range check at every evaluation
    return vp_denoiser(DiffusersUNet(unet), torch.tensor(spec["alphas_cumprod"], dtype=torch.float64),
                       spec["prediction"], sigma_data=float(spec["sigma_data"]), clamp=True, t_mode=spec["t_mode"])


teacher_network("diffusers")((_diffusers_spec, _diffusers_build))


# --------------------------------------------------------------------------------------------------------------------
# teacher kinds: `teacher.kind=<name>` loaders (registry in teachers.load; keys in fkdiff/conf/teacher/<name>.yaml)
# --------------------------------------------------------------------------------------------------------------------
def _get(cfg, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _import_target(target: str):
    import importlib

    module, _, attr = str(target).partition(":")
    if not attr:
        raise ValueError(f"target must look like 'package.module:callable', got {target!r}")
    return getattr(importlib.import_module(module), attr)


def _target_net(cfg, kind: str) -> nn.Module:
    """The network `target(**target_kwargs)` of a `kind` config, with the state_dict at `path` when given."""
    target = cfg.get("target")
    if not target:
        raise ValueError(f"teacher.kind={kind} needs teacher.target='package.module:callable' building the network")
    # configs are code: `target` imports and calls a callable named in the config (like Hydra's `_target_`)
    net = _import_target(target)(**dict(_get(cfg, "target_kwargs", {})))
    if not isinstance(net, nn.Module):
        raise TypeError(f"teacher.target={target!r} returned a {type(net).__name__}, not a torch.nn.Module: it must "
                        f"build the network ({kind} teacher)")
    if cfg.get("path"):
        p = Path(cfg["path"])
        if not p.is_file():
            raise FileNotFoundError(f"{kind} teacher weights {p} not found (teacher.path)")
        net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
    return net


@teacher_kind("vp")
def load_vp(cfg, device=None) -> DiscreteVPDenoiser:
    """`teacher.kind=vp`: the net built by `target(**target_kwargs)`, weights from `path`, schedule from `schedule`
    (or the tensor file `alphas_cumprod`), output type `prediction`."""
    net = _target_net(cfg, "vp")
    if cfg.get("alphas_cumprod"):
        p = Path(cfg["alphas_cumprod"])
        if not p.is_file():
            raise FileNotFoundError(f"alphas_cumprod file {p} not found (teacher.alphas_cumprod)")
        abar = torch.load(p, map_location="cpu", weights_only=True)
    else:
        abar = make_alphas_cumprod(**dict(_get(cfg, "schedule", {})))
    den = vp_denoiser(net, abar, str(_get(cfg, "prediction", "eps")), sigma_data=float(_get(cfg, "sigma_data", 0.5)),
                      clamp=bool(_get(cfg, "clamp", False)), t_mode=str(_get(cfg, "t_mode", "interpolate")))
    return den.to(device).eval().requires_grad_(False)


@teacher_kind("ve")
def load_ve(cfg, device=None) -> VEDenoiser:
    """`teacher.kind=ve`: the continuous VE net built by `target(**target_kwargs)`, weights from `path`, output type
    `prediction` (x0 | eps | score), trained range `sigma_min`..`sigma_max`, data scale `sigma_data`."""
    prediction = str(_get(cfg, "prediction", "x0"))
    if prediction not in VE_ADAPTERS:
        raise ValueError(f"teacher.prediction={prediction!r} for teacher.kind=ve; use one of {', '.join(VE_ADAPTERS)}")
    den = VE_ADAPTERS[prediction](_target_net(cfg, "ve"), sigma_data=float(_get(cfg, "sigma_data", 0.5)),
                                  sigma_min=float(_get(cfg, "sigma_min", SIGMA_MIN)),
                                  sigma_max=float(_get(cfg, "sigma_max", SIGMA_MAX)))
    return den.to(device).eval().requires_grad_(False)


@teacher_kind("edm_pickle")
def _load_edm_pickle_kind(cfg, device=None) -> EDMNetDenoiser:
    """`teacher.kind=edm_pickle`: the pickle at `path`, or the one at `url` fetched into the torch hub cache
    (`teachers.hub.fetch_url`, checked against `sha256` when given); unpickled only with `allow_pickle=true`."""
    allow = strict_bool(cfg.get("allow_pickle"), "teacher.allow_pickle")  # a typo fails before any download
    path = cfg.get("path")
    if not path and cfg.get("url"):
        from teachers.hub import fetch_url

        path = fetch_url(str(cfg["url"]), sha256=cfg.get("sha256"), timeout=float(_get(cfg, "timeout", 10.0)))
    if not path:
        raise ValueError("teacher.kind=edm_pickle needs teacher.path (an NVlabs/edm network-snapshot-*.pkl) or "
                         "teacher.url (e.g. one of teachers.hub.EDM_CIFAR10)")
    return load_edm_pickle(path, allow_pickle=allow, code_dir=cfg.get("code_dir"), key=str(_get(cfg, "key", "ema")),
                           device=device)


@teacher_kind("diffusers")
def _load_diffusers_kind(cfg, device=None) -> DiscreteVPDenoiser:
    """`teacher.kind=diffusers`: the UNet2DModel folder at `path`, or hub model `hub_id` fetched into the Hugging Face
    cache (`teachers.hub.fetch_hub_model`: configs and safetensors only, offline a clear error at once)."""
    path = cfg.get("path")
    if not path and cfg.get("hub_id"):
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:  # the package first (found without importing it)
            _import_diffusers()
        from teachers.hub import fetch_hub_model

        path = fetch_hub_model(str(cfg["hub_id"]), revision=cfg.get("revision"),
                               timeout=float(_get(cfg, "timeout", 10.0)))
    if not path:
        raise ValueError("teacher.kind=diffusers needs teacher.path (a UNet2DModel or pipeline folder) or "
                         "teacher.hub_id (a Hugging Face hub model, e.g. google/ddpm-cifar10-32)")
    return from_diffusers(path, prediction=cfg.get("prediction"), sigma_data=float(_get(cfg, "sigma_data", 0.5)),
                          clamp=bool(_get(cfg, "clamp", False)), t_mode=str(_get(cfg, "t_mode", "interpolate")),
                          device=device)
