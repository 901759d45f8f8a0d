"""Training data for fkdiff: LightningDataModules for `toy2d`, `shapes`, `digits`, `cifar10`, and the data order.

Every datamodule yields batches `{"x": float32 [B, *event], "cond": ...}` ("cond" absent for unconditional data) and
exposes `event_shape`, `cond_kind` ("none" | "class" | "position"), `num_classes`, `cond_dim`, `sigma_data`,
`train_dataloader()` (endless; batch k a pure function of (seed, k): `StepBatches`), `val_dataloader()`.
Build one by name with `build_datamodule(name, **kwargs)`; a new dataset is a class in `fkdiff.data.modules` (plus its
entry in `DATAMODULES`) and a config file `fkdiff/conf/data/<name>.yaml`.

Only the datamodules import Lightning, and they are imported lazily: `fkdiff.data.order` (the batch order),
`fkdiff.data.shapes` (procedural images and the position detector used by composition metrics) and
`fkdiff.data.sources` (plain loaders) stay Lightning-free. Nothing here imports `teachers`.
"""

from __future__ import annotations

from typing import Any

from fkdiff.data.order import StepBatches

__all__ = ["DATAMODULES", "build_datamodule", "StepBatches"]


def build_datamodule(name: str, **kwargs: Any):
    """Build the datamodule registered as `name` (see `DATAMODULES`) with its keyword arguments."""
    from fkdiff.data.modules import build_datamodule as _build

    return _build(name, **kwargs)


def __getattr__(attr: str):
    if attr == "DATAMODULES":
        from fkdiff.data.modules import DATAMODULES

        return DATAMODULES
    raise AttributeError(f"module 'fkdiff.data' has no attribute {attr!r}")
