"""fkdiff's own files: written whole, read without running code, checked against their checksum.

- `atomic_write_bytes` / `atomic_write_text` / `atomic_write_json` / `atomic_torch_save`: write to a temporary file in
  the target's folder, flush it to disk, then `os.replace` it over the target: a kill (or a reader at the same
  moment) sees the old file or the new one, never a torn one.
- `load_torch_file(path, what)`: `torch.load(weights_only=True)` (tensors and plain containers only: nothing in the
  file can run code) with an error that names the file and says what is wrong with it (empty, truncated, not a torch
  file, refused by the weights-only unpickler) instead of torch's bare `EOFError`, `OSError: [Errno 22]`,
  `KeyError: 101`.
- `weights_checksum(state_dict)`: SHA-256 over the tensors of a state dict (names, dtypes, shapes, bytes, in name
  order). `save_student` / `save_teacher` store it; their loaders recompute it and refuse a file whose weights changed
  (a flipped bit, a partial copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "load_torch_file",
           "sha256_file", "weights_checksum", "verify_checksum", "CorruptFileError", "ChecksumError"]


class CorruptFileError(ValueError):
    """A file that cannot be read as what it should be (empty, truncated, not a torch file, wrong contents)."""


class ChecksumError(CorruptFileError):
    """A file whose weights do not match the checksum stored with them."""


# ---------------------------------------------------------------------------------------------------------------------
# writing


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that a reader (or a kill) sees the old file or the new one, never a part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)`, atomically (see `atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------------
# reading


def load_torch_file(path: str | Path, what: str = "torch file", map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with errors that name `path` and the problem (module docstring)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    if size == 0:
        raise CorruptFileError(f"{path} is empty (0 bytes), not a {what}: an interrupted copy or write?")
    with path.open("rb") as f:
        magic = f.read(4)
    zipped = magic == b"PK\x03\x04"  # torch.save's format; before torch 1.6 a bare pickle (protocol 2: 0x80 0x02)
    if not zipped and not magic.startswith(b"\x80"):
        raise CorruptFileError(f"{path} is not a torch file (it starts with {magic!r}; {size} bytes), so it is not a "
                               f"{what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise pickle.UnpicklingError(
                f"{path}: refused to load (weights-only load failed): the file holds objects other than tensors and "
                f"plain containers, and fkdiff never runs code from a {what} (README, trust model). torch said: "
                f"{' '.join(str(e).split())[:400]}") from None
        raise CorruptFileError(f"{path} is not a readable {what} ({type(e).__name__}: {e})") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        why = (f"is truncated or damaged ({size} bytes: a torch zip archive whose end is missing or corrupt)" if zipped
               else f"is truncated or damaged ({size} bytes)")
        first = str(e).splitlines()[0][:200] if str(e) else "no message"
        raise CorruptFileError(f"{path} {why}, so it is not a readable {what} ({type(e).__name__}: {first})") from None


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_checksum(state_dict: Mapping[str, torch.Tensor]) -> str:
    """`sha256:<hex>` over the tensors of `state_dict`: for each name in sorted order, the name, dtype, shape and the
    tensor's bytes (contiguous, on the CPU)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weights_checksum: {name} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def verify_checksum(state_dict: Mapping[str, torch.Tensor], expected: str | None, path: str | Path,
                    what: str = "file") -> bool:
    """Check `state_dict` against the stored checksum; ChecksumError naming `path` on a mismatch. Returns False when
    the file stores no checksum (written before checksums existed), True when it matched."""
    if expected is None:
        return False
    got = weights_checksum(state_dict)
    if got != expected:
        raise ChecksumError(
            f"{path}: the weights do not match the checksum stored with them (stored {expected[:19]}..., computed "
            f"{got[:19]}...): the {what} was corrupted or altered after it was written. Use an intact copy or "
            f"write it again.")
    return True
