"""Training data for fkdiff: LightningDataModules for `toy2d`, `shapes`, `digits`, `cifar10` (issue 2, "Data").

Every datamodule yields batches `{"x": float32 [B, *event], "cond": ...}` ("cond" absent for unconditional data) and
exposes `event_shape`, `cond_kind` ("none" | "class" | "position"), `num_classes`, `cond_dim`, `sigma_data`,
`train_dataloader()`, `val_dataloader()`.  Build one by name with `build_datamodule(name, **kwargs)`.

Only the datamodules import Lightning, and they are imported lazily: `fkdiff.data.shapes` (procedural images and the
position detector used by composition metrics) and `fkdiff.data.sources` (plain loaders) stay Lightning-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATAMODULES", "build_datamodule"]


def build_datamodule(name: str, **kwargs: Any):
    """Build the datamodule registered as `name` (see `DATAMODULES`) with its keyword arguments."""
    from fkdiff.data.modules import build_datamodule as _build

    return _build(name, **kwargs)


def __getattr__(attr: str):
    if attr == "DATAMODULES":
        from fkdiff.data.modules import DATAMODULES

        return DATAMODULES
    raise AttributeError(f"module 'fkdiff.data' has no attribute {attr!r}")
