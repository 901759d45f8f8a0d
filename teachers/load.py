"""Saving and loading teachers: every kind of teacher comes back as a `Denoiser` `D(x, sigma, cond=None)`.

`save_teacher(denoiser, path)` writes a `teacher.pt`: a plain dict (loadable with `torch.load(weights_only=True)`, so
no code runs) holding the format tag, the `EDMDenoiser.spec` (event shape, backbone kwargs, conditioning,
sigma_data / sigma_min / sigma_max) and the weights (EMA weights when trained with EMA).

`load_teacher(source, device=...)` takes
- a path: a `teacher.pt`, or a Lightning checkpoint (`*.ckpt`) written by `python -m teachers.train` (its
  `state_dict` holds the EMA weights when EMA is on), and returns an eval-mode `EDMDenoiser`;
- a mapping / the `teacher:` config section, dispatching on `kind` through the registry `TEACHER_KINDS` (kinds
  register their loader with `@teacher_kind(name)`: analytic and checkpoint here, the adapters' kinds in
  `teachers.adapters`; each kind's keys are listed in `fkdiff/conf/teacher/<kind>.yaml`):
    analytic    `preset` (a name from teachers.presets, or a list of names -> a list of teachers), `preset_kwargs`
    checkpoint  `path` (as above)
    vp          `target` ("module:callable" building the eps/x0/v net, with `target_kwargs`), `path` (its
                state_dict, optional), `prediction` (eps | x0 | v), `schedule` (make_alphas_cumprod kwargs) or
                `alphas_cumprod` (path of a saved tensor), `sigma_data`, `clamp`, `t_mode`
    edm_pickle  `path`, `allow_pickle` (must be true: pickles run code), `code_dir` (a clone of NVlabs/edm), `key`
    diffusers   `path` (a UNet2DModel or pipeline folder), `prediction`, `sigma_data`, `clamp`, `t_mode`
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from teachers.edm import EDMDenoiser

__all__ = ["FORMAT", "TEACHER_KINDS", "teacher_kind", "save_teacher", "load_teacher", "load_teacher_checkpoint",
           "strict_bool", "TEACHER_NETWORKS", "teacher_network", "network_spec", "build_network", "conditioning"]

FORMAT = "fkdiff.teacher/1"
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


# ---------------------------------------------------------------------------------------------------------------------
# the registry of teacher kinds


TeacherLoader = Callable[[Mapping, Any], Any]
TEACHER_KINDS: dict[str, TeacherLoader] = {}


def teacher_kind(name: str) -> Callable[[TeacherLoader], TeacherLoader]:
    """Register `loader(cfg, device) -> teacher` as `teacher.kind=<name>` (cfg: the `teacher:` section, plain data).

    A new kind is its loader (next to its adapter, e.g. in `teachers.adapters`, decorated with this) and its config
    file `fkdiff/conf/teacher/<name>.yaml` listing its keys.
    """

    def register(loader: TeacherLoader) -> TeacherLoader:
        if name in TEACHER_KINDS and TEACHER_KINDS[name] is not loader:
            raise ValueError(f"teacher kind {name!r} is registered twice")
        TEACHER_KINDS[name] = loader
        return loader

    return register


@teacher_kind("checkpoint")
def _load_checkpoint(cfg: Mapping, device) -> EDMDenoiser:
    return load_teacher_checkpoint(cfg.get("path"), device)


@teacher_kind("analytic")
def _load_analytic(cfg: Mapping, device):
    from teachers.presets import make_preset

    preset = cfg.get("preset")
    if not preset:
        raise ValueError("teacher.kind=analytic needs teacher.preset (a name or a list of names from "
                         "teachers.presets.PRESETS)")
    kw = dict(_get(cfg, "preset_kwargs", {}))
    if device is not None:
        kw.setdefault("device", device)
    if isinstance(preset, str):
        return make_preset(preset, **kw)
    return [make_preset(p, **kw) for p in preset]


# ---------------------------------------------------------------------------------------------------------------------
# teacher networks as plain data: a student over a copy of its teacher's network (fkdiff.energy.student_from_teacher)
# records the architecture (no weights) so that its student.pt can be rebuilt without the teacher's files.


NetworkSpecFn = Callable[[Any], "dict | None"]
NetworkBuildFn = Callable[[Mapping], nn.Module]
TEACHER_NETWORKS: dict[str, tuple[NetworkSpecFn, NetworkBuildFn]] = {}


def teacher_network(name: str) -> Callable:
    """Register `(spec_fn, build_fn)` for the denoisers of one kind: `spec_fn(teacher)` returns a plain-data dict
    describing its architecture (or None: not this kind), `build_fn(spec)` the denoiser module with that architecture
    (its weights are then loaded from a state_dict). Only trusted code runs: the spec names no module to import."""

    def register(fns):
        if name in TEACHER_NETWORKS:
            raise ValueError(f"teacher network kind {name!r} is registered twice")
        TEACHER_NETWORKS[name] = fns
        return fns

    return register


def network_spec(teacher: Any) -> dict | None:
    """The plain-data architecture of `teacher`'s network (`{"kind": ..., ...}`), or None when no registered kind
    describes it (then a student over a copy can be trained but not rebuilt without the teacher itself)."""
    import teachers.adapters  # noqa: F401  (registers the diffusers kind)

    for name, (spec_fn, _) in TEACHER_NETWORKS.items():
        spec = spec_fn(teacher)
        if spec is not None:
            return {"kind": name, **spec}
    return None


def build_network(spec: Mapping) -> nn.Module:
    """The denoiser module described by `network_spec(...)`'s dict, with fresh weights."""
    import teachers.adapters  # noqa: F401

    kind = spec.get("kind")
    if kind not in TEACHER_NETWORKS:
        raise ValueError(f"unknown teacher network kind {kind!r}; registered: {', '.join(TEACHER_NETWORKS)}")
    return TEACHER_NETWORKS[kind][1]({k: v for k, v in spec.items() if k != "kind"})


def _edm_spec(teacher: Any) -> dict | None:
    if isinstance(teacher, EDMDenoiser) and teacher.spec is not None:
        return {"spec": dict(teacher.spec)}
    return None


teacher_network("edm")((_edm_spec, lambda spec: EDMDenoiser.from_spec(spec["spec"])))


def conditioning(teacher: Any) -> tuple[str | None, int | None]:
    """(cond_kind, num_classes) a teacher declares (`cond_kind` "none" | "class" | "position"), or (None, None) when
    it declares nothing (a network given as code: the data's conditioning is assumed)."""
    kind = getattr(teacher, "cond_kind", None)
    return (None, None) if kind is None else (str(kind), getattr(teacher, "num_classes", None))


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
    if kind not in TEACHER_KINDS:
        raise ValueError(f"unknown teacher.kind {kind!r}; use one of {', '.join(TEACHER_KINDS)}")
    return TEACHER_KINDS[kind](source, device)
