"""Plain (Lightning-free) loaders for the image datasets: scikit-learn's bundled 8x8 digits and CIFAR-10's python
pickle batches (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

Images come back as `[N, C, H, W]` tensors: digits as float32 in [-1, 1] (value v in 0..16 maps to v / 8 - 1), CIFAR-10
as uint8 (convert with `uint8_to_unit`, x / 127.5 - 1, to save memory until batching).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits", "load_cifar10", "resolve_cifar10_dir", "uint8_to_unit", "CIFAR10_URL", "CIFAR10_FILES"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = CIFAR10_TRAIN_FILES + ("test_batch", "batches.meta")


def uint8_to_unit(x: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float32 in [-1, 1]."""
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def _check_size(size: int) -> int:
    size = int(size)
    if size < 4 or size & (size - 1):
        raise ValueError(f"size must be a power of two >= 4 (8 keeps the native digits), got {size}")
    return size


def load_digits(size: int = 16) -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits (1797 images, offline): images `[1797, 1, size, size]` float32 in [-1, 1],
    labels `[1797]` long. size 8 keeps the native 8x8; larger powers of two upsample bilinearly (align_corners=False,
    a convex combination, so values stay in [-1, 1]); smaller ones average-pool."""
    from sklearn.datasets import load_digits as _sk_load_digits

    size = _check_size(size)
    bunch = _sk_load_digits()
    x = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32)[:, None] / 8.0 - 1.0
    if size > 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    elif size < 8:
        x = F.adaptive_avg_pool2d(x, size)
    return x.clamp_(-1, 1).contiguous(), torch.as_tensor(np.asarray(bunch.target), dtype=torch.long)


def resolve_cifar10_dir(root: str | os.PathLike) -> Path:
    """The folder holding CIFAR-10's batches: `root/cifar-10-batches-py/` if present, else `root` itself.

    Raises FileNotFoundError naming the expected files, the folder searched and where to get them.
    """
    root = Path(os.path.expanduser(str(root)))
    sub = root / "cifar-10-batches-py"
    folder = sub if sub.is_dir() else root
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        where = f"{folder}" + ("" if folder == sub else f" (nor {sub})")
        raise FileNotFoundError(
            f"CIFAR-10 not found: missing {', '.join(missing)} in {where}. Expected the python-pickle batches "
            f"{', '.join(CIFAR10_FILES)}. Download {CIFAR10_URL} and extract it into {root} "
            f"(e.g. `tar -xzf cifar-10-python.tar.gz -C {root}`), or set data.root to the folder holding them."
        )
    return folder


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    try:
        data = np.asarray(d[b"data"], dtype=np.uint8)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (needs keys b'data' and b'labels')") from e
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: expected b'data' uint8 [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar10(root: str | os.PathLike, train: bool = True) -> tuple[Tensor, Tensor, list[str]]:
    """CIFAR-10 images `[N, 3, 32, 32]` uint8, labels `[N]` long, class names; train = data_batch_1..5, else
    test_batch."""
    folder = resolve_cifar10_dir(root)
    files = CIFAR10_TRAIN_FILES if train else ("test_batch",)
    parts = [_read_batch(folder / f) for f in files]
    with open(folder / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="bytes")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), names
