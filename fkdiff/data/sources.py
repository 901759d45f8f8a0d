"""Plain (Lightning-free) loaders for the image datasets: scikit-learn's bundled 8x8 digits and CIFAR-10's python
pickle batches (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

Images come back as `[N, C, H, W]` tensors: digits as float32 in [-1, 1] (value v in 0..16 maps to v / 8 - 1), CIFAR-10
as uint8 (convert with `uint8_to_unit`, x / 127.5 - 1, to save memory until batching).

CIFAR-10's batches are pickles, and a plain `pickle.load` runs whatever code a planted file names. They are read with
`safe_unpickle`, which admits only what the official batches contain (dicts, lists, bytes/str, numbers and numpy
array reconstruction with its dtypes); any other global is refused with an error naming the file, before anything
of it runs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["load_digits", "load_cifar10", "resolve_cifar10_dir", "uint8_to_unit", "safe_unpickle", "UnsafePickleError",
           "CIFAR10_URL", "CIFAR10_FILES"]

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


class UnsafePickleError(pickle.UnpicklingError):
    """A data pickle names a global outside the allow-list (it could run code): nothing of it was executed."""


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct, scalar
        from numpy._core.numeric import _frombuffer
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct, scalar
        from numpy.core.numeric import _frombuffer
    import codecs

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for mod in ("numpy.core", "numpy._core"):  # python-2 era files name numpy.core, numpy 2 writes numpy._core
        allowed[(f"{mod}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = _frombuffer
    return allowed


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the globals numpy arrays need (array/dtype/scalar reconstruction); refuses every other one."""

    def __init__(self, file, path: Path, **kwargs):
        super().__init__(file, **kwargs)
        self._path = path
        self._allowed = _numpy_globals()

    def find_class(self, module: str, name: str):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self._path}: refusing to load {module}.{name} from this pickle: data files may only hold dicts, "
                "lists, bytes/str, numbers and numpy arrays (a pickle naming anything else could execute code); "
                "re-download the file from its official source")
        return obj


def safe_unpickle(path: str | os.PathLike, encoding: str = "bytes"):
    """Load a data pickle (e.g. a CIFAR-10 batch) admitting only plain containers and numpy arrays; errors name `path`.

    Raises `UnsafePickleError` for any other global (nothing is executed), ValueError for a truncated or corrupt file.
    """
    path = Path(path)
    with open(path, "rb") as f:
        try:
            return _AllowListUnpickler(f, path, encoding=encoding).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError,
                AttributeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is truncated or not a valid data pickle ({type(e).__name__}: {e}); "
                             "re-download it") from e


def _read_batch(path: Path) -> tuple[Tensor, Tensor]:
    d = safe_unpickle(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch (a dict), got a {type(d).__name__}")
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
    meta = safe_unpickle(folder / "batches.meta")
    if not isinstance(meta, dict):
        raise ValueError(f"{folder / 'batches.meta'} is not CIFAR-10's batches.meta (a dict)")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), names
