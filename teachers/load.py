"""Saving and loading teachers: every kind of teacher comes back as a `Denoiser` `D(x, sigma, cond=None)`.

`save_teacher(denoiser, path)` writes a `teacher.pt`: a plain dict (loadable with `torch.load(weights_only=True)`, so
no code runs) holding the format tag, the `EDMDenoiser.spec` (event shape, backbone kwargs, conditioning,
sigma_data / sigma_min / sigma_max) and the weights (EMA weights when trained with EMA).

`load_teacher(source, device=...)` takes
- a path: a `teacher.pt`, or a Lightning checkpoint (`*.ckpt`) written by `python -m teachers.train` (its
  `state_dict` holds the EMA weights when EMA is on), and returns an eval-mode `EDMDenoiser`;
- a mapping / the `teacher:` config section, dispatching on `kind`:
    analytic    `preset` (a name from teachers.presets, or a list of names -> a list of teachers), `preset_kwargs`
    checkpoint  `path` (as above)
    vp          `target` ("module:callable" building the eps/x0/v net, with `target_kwargs`), `path` (its
                state_dict, optional), `prediction` (eps | x0 | v), `schedule` (make_alphas_cumprod kwargs) or
                `alphas_cumprod` (path of a saved tensor), `sigma_data`, `clamp`, `t_mode`
    edm_pickle  `path`, `allow_pickle` (must be true: pickles run code), `code_dir` (a clone of NVlabs/edm), `key`
    diffusers   `path` (a UNet2DModel or pipeline folder), `prediction`, `sigma_data`, `clamp`, `t_mode`
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from teachers.edm import EDMDenoiser

__all__ = ["FORMAT", "TEACHER_KINDS", "save_teacher", "load_teacher", "load_teacher_checkpoint", "strict_bool"]

FORMAT = "fkdiff.teacher/1"
TEACHER_KINDS = ("analytic", "checkpoint", "vp", "edm_pickle", "diffusers")
_HOW_TO_TRAIN = ("train one with `python -m teachers.train recipe=<name>` (it writes <run_dir>/teacher.pt) and point "
                 "teacher.path at it")


def save_teacher(denoiser: EDMDenoiser, path: str | Path, **extra: Any) -> Path:
    """Write `denoiser`'s spec and weights to `path` (extra plain-data entries, e.g. step, config, are stored too)."""
    if not isinstance(denoiser, EDMDenoiser) or denoiser.spec is None:
        raise TypeError("save_teacher needs an EDMDenoiser built with EDMDenoiser.build / from_spec (it records the "
                        "spec needed to rebuild the network)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}
    torch.save({"format": FORMAT, "spec": dict(denoiser.spec), "state_dict": state, **extra}, path)
    return path


def _missing(path: Path, what: str = "teacher checkpoint") -> FileNotFoundError:
    return FileNotFoundError(f"{what} {path} not found; {_HOW_TO_TRAIN}")


def load_teacher_checkpoint(path: str | Path, device: torch.device | str | None = None) -> EDMDenoiser:
    """An eval-mode `EDMDenoiser` from a `teacher.pt` or a `teachers.train` Lightning checkpoint (`*.ckpt`)."""
    if path is None or str(path) in ("", "None", "null"):
        raise FileNotFoundError(f"no teacher checkpoint given (teacher.path is empty); {_HOW_TO_TRAIN}")
    path = Path(path)
    if path.is_dir() and (path / "teacher.pt").is_file():
        path = path / "teacher.pt"
    if not path.is_file():
        raise _missing(path)
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} is not a teacher checkpoint (got a {type(data).__name__})")
    if data.get("format") == FORMAT:
        spec, state = data["spec"], data["state_dict"]
    elif "hyper_parameters" in data and "spec" in (data["hyper_parameters"] or {}):
        # a Lightning checkpoint from teachers.train: EMAWeightAveraging stores the averaged weights in state_dict
        spec = data["hyper_parameters"]["spec"]
        prefix = "denoiser."
        state = {k[len(prefix):]: v for k, v in data["state_dict"].items() if k.startswith(prefix)}
    else:
        raise ValueError(f"{path} is neither a teacher.pt ({FORMAT}) nor a teachers.train Lightning checkpoint")
    denoiser = EDMDenoiser.from_spec(spec)
    denoiser.load_state_dict(state)
    return denoiser.to(device).eval().requires_grad_(False)


def strict_bool(value: Any, key: str) -> bool:
    """A config flag that must be a real boolean: True / False (None: False), or the strings "true" / "false"
    (any case). Anything else ("no", "off", "0", 1, ...) is an error, so that a typo can never enable a dangerous
    option such as `teacher.allow_pickle` (Python's `bool("false")` is True)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key} must be true or false, got {value!r} ({type(value).__name__})")


def _get(cfg: Mapping, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def _import_target(target: str):
    module, _, attr = str(target).partition(":")
    if not attr:
        raise ValueError(f"target must look like 'package.module:callable', got {target!r}")
    return getattr(importlib.import_module(module), attr)


def _load_vp(cfg: Mapping, device) -> nn.Module:
    from teachers.adapters import make_alphas_cumprod, vp_denoiser

    target = cfg.get("target")
    if not target:
        raise ValueError("teacher.kind=vp needs teacher.target='package.module:callable' building the network")
    # configs are code: `target` imports and calls a callable named in the config (like Hydra's `_target_`)
    net = _import_target(target)(**dict(_get(cfg, "target_kwargs", {})))
    if not isinstance(net, nn.Module):
        raise TypeError(f"teacher.target={target!r} returned a {type(net).__name__}, not a torch.nn.Module: it must "
                        "build the network net(x_t, t[, cond])")
    if cfg.get("path"):
        p = Path(cfg["path"])
        if not p.is_file():
            raise FileNotFoundError(f"VP teacher weights {p} not found (teacher.path)")
        net.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
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


def load_teacher(source: Any, device: torch.device | str | None = None):
    """A teacher `D(x, sigma, cond=None)` from a checkpoint path or a `teacher:` config mapping (module docstring)."""
    if isinstance(source, (str, Path)):
        return load_teacher_checkpoint(source, device)
    try:  # a Hydra/OmegaConf section: plain containers, interpolations resolved
        from omegaconf import DictConfig, OmegaConf

        if isinstance(source, DictConfig):
            source = OmegaConf.to_container(source, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(source, Mapping):
        raise TypeError(f"load_teacher takes a path or a teacher config mapping, got {type(source).__name__}")
    if "teacher" in source and "kind" not in source:
        source = source["teacher"]  # the whole config was passed
    kind = source.get("kind")
    if kind == "checkpoint":
        return load_teacher_checkpoint(source.get("path"), device)
    if kind == "analytic":
        from teachers.presets import make_preset

        preset = source.get("preset")
        if not preset:
            raise ValueError("teacher.kind=analytic needs teacher.preset (a name or a list of names from "
                             "teachers.presets.PRESETS)")
        kw = dict(_get(source, "preset_kwargs", {}))
        if device is not None:
            kw.setdefault("device", device)
        if isinstance(preset, str):
            return make_preset(preset, **kw)
        return [make_preset(p, **kw) for p in preset]
    if kind == "vp":
        return _load_vp(source, device)
    if kind == "edm_pickle":
        from teachers.adapters import load_edm_pickle

        if not source.get("path"):
            raise ValueError("teacher.kind=edm_pickle needs teacher.path (an NVlabs/edm network-snapshot-*.pkl)")
        return load_edm_pickle(source.get("path"), allow_pickle=strict_bool(source.get("allow_pickle"), "teacher.allow_pickle"),
                               code_dir=source.get("code_dir"), key=str(_get(source, "key", "ema")), device=device)
    if kind == "diffusers":
        from teachers.adapters import from_diffusers

        if not source.get("path"):
            raise ValueError("teacher.kind=diffusers needs teacher.path (a UNet2DModel or pipeline folder)")
        return from_diffusers(source["path"], prediction=source.get("prediction"),
                              sigma_data=float(_get(source, "sigma_data", 0.5)),
                              clamp=bool(_get(source, "clamp", False)),
                              t_mode=str(_get(source, "t_mode", "interpolate")), device=device)
    raise ValueError(f"unknown teacher.kind {kind!r}; use one of {', '.join(TEACHER_KINDS)}")
