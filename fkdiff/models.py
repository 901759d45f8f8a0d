"""Models from their specs: what a `sample.models.<name>` entry of the command line describes.

A spec is a mapping `{kind: <a MODEL_KINDS name>, ..., cond: <optional condition>}`:

    analytic   an exact analytic teacher from `teachers.presets` (`preset:`, optional `preset_kwargs:`): energies,
               scores and denoisers in closed form
    energy     a distilled energy student (`path:` to a student.pt, a distillation checkpoint or a run folder with
               one student; `fkdiff.energy.load_energy`); `fast_path:` the keywords of `EnergyStudent.fast_path`
               (`precision: bf16` autocast, `channels_last: true`, `compile: true`)
    teacher    a denoiser through `teachers.load_teacher` (`teacher:` holding a teacher config, or the spec itself):
               a score field only (no energy), usable as the SMC proposal

`cond:` binds a condition to a conditional model (`fkdiff.compose.conditioned`). A new kind is one function
`(spec, device) -> model` registered in `MODEL_KINDS`.

`use_students(specs, run)` swaps every analytic model for the student `python -m fkdiff.distill` distilled from the
same preset (`run` = that run's folder or `latest`), so the same composition runs on the exact teachers and on the
students.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["MODEL_KINDS", "load_model", "use_students", "infer_shape"]


def _analytic(spec: Mapping[str, Any], device) -> Any:
    from teachers.presets import make_preset

    if not spec.get("preset"):
        raise ValueError("an analytic model needs `preset:` (one of teachers.presets.PRESETS)")
    return make_preset(spec["preset"], **dict(spec.get("preset_kwargs") or {}), device=device)


def _energy(spec: Mapping[str, Any], device) -> Any:
    from fkdiff.energy import load_energy

    if not spec.get("path"):
        raise ValueError("an energy model needs `path:` to a distilled student (written by python -m fkdiff.distill)")
    model = load_energy(spec["path"], device=device)
    if spec.get("fast_path"):  # e.g. {precision: bf16, channels_last: true, compile: true} (EnergyStudent.fast_path)
        model.fast_path(**dict(spec["fast_path"]))
    return model


def _teacher(spec: Mapping[str, Any], device) -> Any:
    from teachers import load_teacher

    return load_teacher(spec.get("teacher", spec), device=device)


MODEL_KINDS: dict[str, Callable[[Mapping[str, Any], Any], Any]] = {
    "analytic": _analytic,
    "energy": _energy,
    "teacher": _teacher,
}


def load_model(spec: Mapping[str, Any], device: str | torch.device = "cpu") -> Any:
    """The model a spec describes (see the module docstring), with its condition bound when `cond:` is given."""
    from fkdiff.compose import conditioned

    spec = dict(spec)
    kind = spec.get("kind", "energy")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use {', '.join(MODEL_KINDS)}")
    model = MODEL_KINDS[kind](spec, device)
    return conditioned(model, spec["cond"]) if spec.get("cond") is not None else model


def use_students(models: Mapping[str, Any], students: str, runs_root: str | Path = "runs/distill") -> dict:
    """Replace every analytic model spec by the student distilled from the same preset in a `fkdiff.distill` run.

    `students` is that run's folder, or `latest` for the newest folder under `runs_root` holding all the students
    needed. A distill run stores the student of preset P as `<run>/<P>/student.pt`.
    """
    need = {name: spec["preset"] for name, spec in models.items() if spec.get("kind") == "analytic"}
    if students == "latest":
        root = Path(runs_root)
        runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
        found = [d for d in runs if all((d / p / "student.pt").is_file() for p in need.values())]
        if not found:
            raise FileNotFoundError(
                f"sample.students=latest: no run under {root.resolve()} holds students for "
                f"{sorted(set(need.values()))}; run `python -m fkdiff.distill` first or pass the run folder")
        run_dir = found[0]
    else:
        run_dir = Path(students)
    out = {}
    for name, spec in models.items():
        if name in need:
            path = run_dir / need[name] / "student.pt"
            if not path.is_file():
                raise FileNotFoundError(f"sample.students={students}: {path} does not exist (students there: "
                                        f"{sorted(p.parent.name for p in run_dir.glob('*/student.pt'))})")
            out[name] = {"kind": "energy", "path": str(path), "cond": spec.get("cond")}
        else:
            out[name] = dict(spec)
    return out


def infer_shape(models: Mapping[str, Any]) -> tuple:
    """The event shape of the first model that declares one (`event_shape`, `shape` or `dim`)."""
    for m in models.values():
        inner = getattr(m, "model", m)
        for attr in ("event_shape", "shape"):
            if getattr(inner, attr, None) is not None:
                return tuple(getattr(inner, attr))
        if hasattr(inner, "dim"):
            return (int(inner.dim),)
    raise ValueError("cannot infer the sample shape from the models; set sample.shape (e.g. [2] or [3, 16, 16])")
