"""LightningDataModules for `toy2d`, `shapes`, `digits`, `cifar10`, and the `build_datamodule` registry (issue 2).

Contract shared by every datamodule:
- batches are dicts `{"x": float32 [B, *event], "cond": ...}`; "cond" is absent for unconditional data, a long `[B]`
  class label for cond_kind "class", a float32 `[B, 2]` normalised (x, y) position for cond_kind "position";
- attributes `event_shape`, `cond_kind`, `num_classes`, `cond_dim`, `sigma_data` (the root mean square of the
  training values about zero, pooled over coordinates -- the scale of the zero-mean Gaussian that EDM's
  preconditioning assumes; exact from the teacher for toy2d);
- data are built in memory, deterministically from `seed`, identically on every rank;
- the train loader is endless and its batch of step k is a pure function of (seed, k) (`fkdiff.data.StepBatches`,
  the one data order of every training run): attached to a Trainer it starts at the trainer's global step (a resumed
  run continues the sequence) and gives rank r of w rows r, r + w, ... of the global batch of `batch_size` rows (so
  1 and w processes see the same global batches). Batches are gathered with one tensor index per batch
  (`Dataset.__getitems__`), not per example. Validation batches come in dataset order.
- toy2d samples a distribution object (anything with `dim` and `sample(n, generator)`); preset *names* are resolved
  by the caller (the config wiring, `fkdiff.training.build_datamodule_from_config`), not here.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from fkdiff.data.order import StepBatches
from fkdiff.data.shapes import ShapesSample, generate_shapes
from fkdiff.data.sources import load_cifar10, load_digits, resolve_cifar10_dir, uint8_to_unit

__all__ = [
    "ArrayDataset",
    "Toy2DDataModule",
    "ShapesDataModule",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "MoonsDataModule",
    "DATAMODULES",
    "build_datamodule",
]


# ---------------------------------------------------------------------------------------------------------------------
# datasets, collate


class ArrayDataset(Dataset):
    """In-memory examples: example i is `{"x": transform(x[rows[i]]), "cond": cond[i]}` (rows defaults to i)."""

    def __init__(self, x: Tensor, cond: Tensor | None = None, rows: Tensor | None = None, transform=None):
        n = len(rows) if rows is not None else len(x)
        if cond is not None and len(cond) != n:
            raise ValueError(f"cond has {len(cond)} entries for {n} examples")
        self.x, self.cond, self.rows, self.transform = x, cond, rows, transform
        self._n = n

    def __len__(self) -> int:
        return self._n

    def __getitems__(self, indices) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.x[self.rows[idx] if self.rows is not None else idx]
        out = {"x": self.transform(x) if self.transform is not None else x}
        if self.cond is not None:
            out["cond"] = self.cond[idx]
        return out

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([int(i)]).items()}


def collate_batch(batch):
    """Pass through batches already gathered by `ArrayDataset.__getitems__`; default-collate anything else."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def _split(n: int, val_fraction: float, seed: int | None) -> tuple[Tensor, Tensor]:
    """Deterministic train/val index split; a seeded permutation when seed is given, else the first/last rows."""
    n_val = max(1, int(round(val_fraction * n)))
    if n_val >= n:
        raise ValueError(f"val_fraction={val_fraction} leaves no training data out of {n} examples")
    order = torch.arange(n) if seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n - n_val], order[n - n_val:]


def _pooled_rms(x: Tensor) -> float:
    """sigma_data = sqrt(mean x^2) over every value: the RMS about zero (the EDM preconditioning's data scale)."""
    return float(x.to(torch.float64).pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------------------------------
# base


class _InMemoryDataModule(LightningDataModule):
    """Shared plumbing: argument checks, lazy deterministic build, the step-indexed train order, dict batches."""

    name: str = ""
    event_shape: tuple[int, ...]
    cond_kind: str = "none"
    num_classes: int | None = None
    cond_dim: int | None = None

    def __init__(self, batch_size: int = 256, num_workers: int = 0, seed: int = 0,
                 val_batch_size: int | None = None):
        super().__init__()
        for key, val, lo in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{self.name}: {key} must be an int >= {lo}, got {val!r}")
        if val_batch_size is not None and (not isinstance(val_batch_size, int) or val_batch_size < 1):
            raise ValueError(f"{self.name}: val_batch_size must be an int >= 1 or None, got {val_batch_size!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"{self.name}: seed must be a non-negative int, got {seed!r}")
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.val_batch_size = val_batch_size or batch_size
        self.train_set: ArrayDataset | None = None
        self.val_set: ArrayDataset | None = None
        self._sigma_data: float | None = None

    @staticmethod
    def _check_fraction(val_fraction: float, name: str) -> float:
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise ValueError(f"{name}: val_fraction must be in (0, 1), got {val_fraction!r}")
        return float(val_fraction)

    def _build(self) -> None:
        """Fill self.train_set, self.val_set and self._sigma_data (deterministic in self.seed)."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()

    @property
    def sigma_data(self) -> float:
        """Standard deviation of the training values (pooled over coordinates)."""
        self.setup()
        return self._sigma_data

    def train_dataloader(self) -> DataLoader:
        """Endless global batches of `batch_size` rows, batch k a pure function of (seed, k) (`StepBatches`); attached
        to a Trainer, from its global step on and this rank's rows only."""
        self.setup("fit")
        trainer = self.trainer
        batches = StepBatches(self.train_set, self.batch_size, self.seed, collate_batch,
                              start_step_fn=(lambda: trainer.global_step) if trainer is not None else (lambda: 0),
                              rank=trainer.global_rank if trainer is not None else 0,
                              world_size=trainer.world_size if trainer is not None else 1)
        return DataLoader(batches, batch_size=None, num_workers=self.num_workers, generator=self._loader_generator())

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, collate_fn=collate_batch,
                          generator=self._loader_generator())

    def _loader_generator(self) -> torch.Generator:
        # a DataLoader draws a base seed for its workers per iteration: from its own generator, never the global RNG
        return torch.Generator().manual_seed(self.seed)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(event_shape={self.event_shape}, cond_kind={self.cond_kind!r}, "
                f"batch_size={self.batch_size}, seed={self.seed})")


# ---------------------------------------------------------------------------------------------------------------------
# toy2d


class Toy2DDataModule(_InMemoryDataModule):
    """Exact samples from an analytic distribution `preset` (an object with `dim` and `sample(n, generator)`, e.g.
    `teachers.make_preset("ring8")`), drawn once from `seed`: `num_samples` in all, the last `val_fraction` for
    validation. The distribution stays available as `.teacher` (exact denoiser, score, energy). Unconditional."""

    name = "toy2d"

    def __init__(self, preset: Any, num_samples: int = 65536, val_fraction: float = 0.1, batch_size: int = 512,
                 num_workers: int = 0, seed: int = 0, val_batch_size: int | None = None):
        super().__init__(batch_size, num_workers, seed, val_batch_size)
        if not (hasattr(preset, "sample") and hasattr(preset, "dim")):
            hint = (" (a name: build it first, e.g. teachers.make_preset(name); the config's data.preset is resolved "
                    "that way)" if isinstance(preset, str) else "")
            raise TypeError(f"toy2d: preset must be a distribution with .dim and .sample(n, generator), "
                            f"got {type(preset).__name__}{hint}")
        self.teacher = preset
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"toy2d: num_samples must be an int >= 2, got {num_samples!r}")
        self.num_samples = num_samples
        self.val_fraction = self._check_fraction(val_fraction, self.name)
        self.event_shape = (int(self.teacher.dim),)

    def _build(self) -> None:
        x = self.teacher.sample(self.num_samples, generator=torch.Generator().manual_seed(self.seed))
        x = x.detach().to("cpu", torch.float32).contiguous()
        tr, va = _split(self.num_samples, self.val_fraction, None)  # iid draws: first / last rows
        self.train_set, self.val_set = ArrayDataset(x[tr]), ArrayDataset(x[va])
        if hasattr(self.teacher, "sigma_data"):  # exact: sqrt(E|x|^2 / d)
            self._sigma_data = float(self.teacher.sigma_data)
        else:
            self._sigma_data = _pooled_rms(x[tr])


# ---------------------------------------------------------------------------------------------------------------------
# shapes


class ShapesDataModule(_InMemoryDataModule):
    """Procedural multi-object scenes (`fkdiff.data.shapes`): `num_samples` images generated from `seed`, the last
    `val_fraction` of them for validation. Every (image, one of its objects) pair is an example, cond = that object's
    normalised (x, y) position (cond_kind "position", cond_dim 2), as in Du et al.'s CLEVR experiment.
    The generated scenes (positions, counts, kinds, colours) are kept as `.scenes`; `.num_train_images` splits them."""

    name = "shapes"
    cond_kind = "position"
    cond_dim = 2

    def __init__(self, canvas: int = 16, num_samples: int = 8192, min_objects: int = 1, max_objects: int = 5,
                 radius: int | None = None, min_separation: int | None = None, val_fraction: float = 0.1,
                 batch_size: int = 128, num_workers: int = 0, seed: int = 0, val_batch_size: int | None = None):
        super().__init__(batch_size, num_workers, seed, val_batch_size)
        if isinstance(canvas, bool) or not isinstance(canvas, int) or canvas < 8 or canvas & (canvas - 1):
            raise ValueError(f"shapes: canvas must be a power of two >= 8 (16 or 32 typical), got {canvas!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"shapes: num_samples (images) must be an int >= 2, got {num_samples!r}")
        if not (isinstance(min_objects, int) and isinstance(max_objects, int) and 1 <= min_objects <= max_objects):
            raise ValueError(f"shapes: need 1 <= min_objects <= max_objects, got {min_objects!r}, {max_objects!r}")
        self.canvas, self.num_samples = canvas, num_samples
        self.min_objects, self.max_objects = min_objects, max_objects
        self.radius, self.min_separation = radius, min_separation
        self.val_fraction = self._check_fraction(val_fraction, self.name)
        self.event_shape = (3, canvas, canvas)
        self.scenes: ShapesSample | None = None
        self.num_train_images: int | None = None

    def _pairs(self, image_ids: Tensor) -> tuple[Tensor, Tensor]:
        counts = self.scenes.counts[image_ids]
        rows = image_ids.repeat_interleave(counts)
        obj = torch.cat([torch.arange(int(c)) for c in counts.tolist()])
        return rows, self.scenes.positions[rows, obj].contiguous()

    def _build(self) -> None:
        self.scenes = generate_shapes(self.num_samples, self.canvas, self.min_objects, self.max_objects,
                                      self.radius, self.min_separation,
                                      generator=torch.Generator().manual_seed(self.seed))
        tr, va = _split(self.num_samples, self.val_fraction, None)  # iid scenes: first / last images
        self.num_train_images = len(tr)
        images = self.scenes.images
        rows, cond = self._pairs(tr)
        self.train_set = ArrayDataset(images, cond, rows=rows)
        rows, cond = self._pairs(va)
        self.val_set = ArrayDataset(images, cond, rows=rows)
        self._sigma_data = _pooled_rms(images[tr])


# ---------------------------------------------------------------------------------------------------------------------
# digits


class DigitsDataModule(_InMemoryDataModule):
    """scikit-learn's bundled 8x8 digits (1797 images, offline) at `size` x `size` (a power of two; 8 native,
    bilinear upsampling above), 1 channel in [-1, 1], cond = class label (10 classes). Train/val split: a permutation
    drawn from `seed`, the last `val_fraction` to validation."""

    name = "digits"
    cond_kind = "class"
    num_classes = 10

    def __init__(self, size: int = 16, val_fraction: float = 0.1, batch_size: int = 128, num_workers: int = 0,
                 seed: int = 0, val_batch_size: int | None = None):
        super().__init__(batch_size, num_workers, seed, val_batch_size)
        if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size & (size - 1):
            raise ValueError(f"digits: size must be a power of two >= 4 (8 keeps the native 8x8), got {size!r}")
        self.size = size
        self.val_fraction = self._check_fraction(val_fraction, self.name)
        self.event_shape = (1, size, size)

    def _build(self) -> None:
        x, y = load_digits(self.size)
        tr, va = _split(len(x), self.val_fraction, self.seed)
        self.train_set, self.val_set = ArrayDataset(x[tr], y[tr]), ArrayDataset(x[va], y[va])
        self._sigma_data = _pooled_rms(x[tr])


# ---------------------------------------------------------------------------------------------------------------------
# cifar10


class CIFAR10DataModule(_InMemoryDataModule):
    """CIFAR-10 from the python-pickle batches in a local folder `root` (`root/cifar-10-batches-py/` or `root`):
    train = data_batch_1..5, val = test_batch; images `[3, 32, 32]` in [-1, 1] (kept as uint8 until batching),
    cond = class label (10 classes). Nothing is downloaded; a missing file raises FileNotFoundError at construction."""

    name = "cifar10"
    cond_kind = "class"
    num_classes = 10
    event_shape = (3, 32, 32)

    def __init__(self, root: str | None = None, batch_size: int = 128, num_workers: int = 0, seed: int = 0,
                 val_batch_size: int | None = None):
        super().__init__(batch_size, num_workers, seed, val_batch_size)
        if root is None or str(root) == "":
            raise ValueError("cifar10: root is required: the folder holding cifar-10-batches-py/ (or its files)")
        self.root = str(root)
        self.folder = resolve_cifar10_dir(self.root)  # fails early with the expected files and the URL
        self.class_names: list[str] | None = None

    def _build(self) -> None:
        x, y, self.class_names = load_cifar10(self.folder, train=True)
        xv, yv, _ = load_cifar10(self.folder, train=False)
        self.train_set = ArrayDataset(x, y, transform=uint8_to_unit)
        self.val_set = ArrayDataset(xv, yv, transform=uint8_to_unit)
        # exact pooled RMS of x / 127.5 - 1 from a histogram of the uint8 values (no float copy of the data)
        hist = torch.zeros(256, dtype=torch.float64)
        flat = x.reshape(-1)
        for i in range(0, flat.numel(), 1 << 24):
            hist += torch.bincount(flat[i:i + (1 << 24)].to(torch.int64), minlength=256).to(torch.float64)
        v = torch.arange(256, dtype=torch.float64) / 127.5 - 1
        self._sigma_data = float(((hist * v**2).sum() / hist.sum()).sqrt())


# ---------------------------------------------------------------------------------------------------------------------
# moons


class MoonsDataModule(_InMemoryDataModule):
    """scikit-learn's two interleaving half circles (`sklearn.datasets.make_moons`, offline), centred at the origin:
    `num_samples` points drawn once from `seed` with Gaussian noise of std `noise`, the last `val_fraction` for
    validation. A 2D dataset with no closed-form density: the trained-teacher path (`python -m teachers.train
    data=moons`, then `fkdiff.distill teacher=checkpoint`) in minutes on a CPU. Unconditional."""

    name = "moons"
    event_shape = (2,)

    def __init__(self, num_samples: int = 65536, noise: float = 0.05, val_fraction: float = 0.1,
                 batch_size: int = 256, num_workers: int = 0, seed: int = 0, val_batch_size: int | None = None):
        super().__init__(batch_size, num_workers, seed, val_batch_size)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"moons: num_samples must be an int >= 2, got {num_samples!r}")
        if not (isinstance(noise, (int, float)) and noise >= 0):
            raise ValueError(f"moons: noise must be a float >= 0, got {noise!r}")
        self.num_samples, self.noise = num_samples, float(noise)
        self.val_fraction = self._check_fraction(val_fraction, self.name)

    def _build(self) -> None:
        from sklearn.datasets import make_moons

        x, _ = make_moons(self.num_samples, noise=self.noise, random_state=self.seed)
        x = torch.as_tensor(x, dtype=torch.float32) - torch.tensor([0.5, 0.25])  # the half circles' joint centre
        tr, va = _split(self.num_samples, self.val_fraction, None)  # iid draws (make_moons shuffles): first / last
        self.train_set, self.val_set = ArrayDataset(x[tr]), ArrayDataset(x[va])
        self._sigma_data = _pooled_rms(x[tr])


# ---------------------------------------------------------------------------------------------------------------------
# registry


DATAMODULES: dict[str, type[_InMemoryDataModule]] = {
    "toy2d": Toy2DDataModule,
    "shapes": ShapesDataModule,
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "moons": MoonsDataModule,
}


def _accepted_kwargs(cls) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def build_datamodule(name: str, **kwargs: Any) -> _InMemoryDataModule:
    """Build the datamodule registered as `name`; an unknown name or keyword lists what is available."""
    if name not in DATAMODULES:
        raise KeyError(f"unknown datamodule {name!r}; available: {', '.join(sorted(DATAMODULES))}")
    cls = DATAMODULES[name]
    accepted = _accepted_kwargs(cls)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"datamodule {name!r} got unexpected argument(s) {', '.join(unknown)}; "
                        f"it accepts: {', '.join(accepted)}")
    return cls(**kwargs)
