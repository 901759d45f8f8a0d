"""Library objects from config sections, for the training entry points: the datamodule of `data:`.

`fkdiff.data` does not know the analytic presets of `teachers` (no import between the two): a `preset` given by name
in the config (toy2d's `data.preset`, with `data.preset_kwargs`) is built here with `teachers.make_preset`, and the
datamodule receives the distribution object.
"""

from __future__ import annotations

from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

__all__ = ["build_datamodule_from_config"]


def build_datamodule_from_config(data_cfg: DictConfig | Mapping, preset: Any = None, **override: Any):
    """`fkdiff.data.build_datamodule(data.name, **the other keys)`; null values take the datamodule's defaults.

    `preset`: a distribution object that replaces `data.preset` (fkdiff.distill passes the analytic teacher it
    distils); a string `data.preset` is resolved with `teachers.make_preset(name, **data.preset_kwargs)`.
    `override`: more keyword arguments (e.g. `val_batch_size`).
    """
    from fkdiff.data import build_datamodule

    data = OmegaConf.to_container(data_cfg, resolve=True) if isinstance(data_cfg, DictConfig) else dict(data_cfg)
    name = data.pop("name")
    preset_kwargs = data.pop("preset_kwargs", None) or {}
    if preset is not None:
        data["preset"] = preset
    elif isinstance(data.get("preset"), str):
        from teachers.presets import make_preset

        data["preset"] = make_preset(data["preset"], **preset_kwargs)
    data.update(override)
    return build_datamodule(name, **{k: v for k, v in data.items() if v is not None})
