"""FID and KID with the standard Inception-v3 weights, through torchmetrics + torch-fidelity (optional extra `fid`).

    FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})       (Heusel et al. 2017, eq. 6; 2048-d pool features)
    KID = unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3  (Bińkowski et al. 2018), mean +- std over subsets

Both use torch-fidelity's `FeatureExtractorInceptionV3` (the TF-ported Inception of the original FID code) via
torchmetrics' `NoTrainInceptionV3`, images as uint8 RGB (grey images are repeated to 3 channels; the extractor
resizes to 299 x 299 itself). Nothing is downloaded: the weights file is looked up in the user's torch hub cache,
`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth` (where torch-fidelity would have put it), or
passed as `weights_path`. Missing packages or weights raise errors saying what to install or where to put the file.

The extra is imported lazily (`fid_kid` only), so `import fkdiff.metrics` never needs torchvision. On machines where
torchvision does not match the installed torch (e.g. a CPU-only torch build without a matching torchvision wheel),
the import fails and `fid_kid` raises `FIDUnavailableError` naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["FIDUnavailableError", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "inception_weights_path",
           "fid_available", "to_uint8_rgb", "fid_kid"]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)


class FIDUnavailableError(ImportError):
    """torchmetrics' Inception metrics cannot be imported here (torch-fidelity / torchvision missing or broken)."""


def _import_metrics():
    """(FrechetInceptionDistance, KernelInceptionDistance, NoTrainInceptionV3) or FIDUnavailableError."""
    hint = ("FID/KID need the optional extra: `pip install 'fkdiff[fid]'` (torch-fidelity and torchvision), with a "
            f"torchvision build that matches the installed torch {torch.__version__} (install both from the same "
            "index, e.g. https://download.pytorch.org/whl/cpu or /cu124). The offline alternative needs neither: "
            "fkdiff.metrics.classifier_frechet_distance (not comparable with FID).")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
        from torchmetrics.image.kid import KernelInceptionDistance
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except (ImportError, RuntimeError, AttributeError) as e:  # torchvision built for another torch: RuntimeError
        raise FIDUnavailableError(f"cannot import torchmetrics' FID/KID ({type(e).__name__}: {e}). {hint}") from e
    if not _TORCH_FIDELITY_AVAILABLE:
        raise FIDUnavailableError(f"torch-fidelity is not importable. {hint}")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics only checks that the package exists)
    except (ImportError, RuntimeError, AttributeError) as e:
        raise FIDUnavailableError(f"torch-fidelity does not import ({type(e).__name__}: {e}). {hint}") from e
    return FrechetInceptionDistance, KernelInceptionDistance, NoTrainInceptionV3


def fid_available() -> bool:
    """Whether `fid_kid` can import its dependencies here (the weights are checked separately)."""
    try:
        _import_metrics()
    except FIDUnavailableError:
        return False
    return True


def inception_weights_path(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path`, else `<torch.hub.get_dir()>/checkpoints/<INCEPTION_WEIGHTS_FILE>`.

    Raises FileNotFoundError naming the file, the folder and the URL when it is missing (nothing is downloaded).
    """
    if path is not None:
        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found at {p}. Download {INCEPTION_WEIGHTS_URL} "
                                    f"(torch-fidelity's standard FID weights) and pass its path.")
        return p
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    p = folder / INCEPTION_WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: expected {p} (the torch hub cache; set TORCH_HOME to move it). "
            f"On a machine with network: `mkdir -p {folder} && curl -L -o {p} {INCEPTION_WEIGHTS_URL}`, or pass "
            f"weights_path=<file>. fkdiff never downloads them itself.")
    return p


def to_uint8_rgb(x: Tensor) -> Tensor:
    """Images `[B, C, H, W]` with values in [-1, 1] (C = 1 or 3) -> uint8 `[B, 3, H, W]` in 0..255 (clamped)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be a [B, 1 or 3, H, W] tensor in [-1, 1], got {tuple(getattr(x, 'shape', ()))}")
    u = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u


def fid_kid(real: Tensor, fake: Tensor, *, weights_path: str | os.PathLike | None = None, kid_subsets: int = 100,
            kid_subset_size: int | None = None, batch_size: int = 64,
            device: torch.device | str = "cpu") -> dict[str, float]:
    """FID and KID between image sets `real` and `fake` `[B, C, H, W]` in [-1, 1] (module docstring).

    Returns {"fid", "kid_mean", "kid_std", "num_real", "num_fake"}. KID uses subsets of size
    `kid_subset_size` (default min(1000, num_real, num_fake)). Raises `FIDUnavailableError` when torchmetrics /
    torch-fidelity / torchvision do not import, FileNotFoundError when the Inception weights are missing.
    EDM's protocol for CIFAR-10 is 50k generated images against the 50k training images.
    """
    FID, KID, Inception = _import_metrics()
    weights = inception_weights_path(weights_path)
    r, f = to_uint8_rgb(real), to_uint8_rgb(fake)
    if r.shape[0] < 2 or f.shape[0] < 2:
        raise ValueError("FID/KID need at least 2 real and 2 generated images")
    sub = int(kid_subset_size or min(1000, r.shape[0], f.shape[0]))
    extractor = Inception(name="inception-v3-compat", features_list=["2048"],
                          feature_extractor_weights_path=str(weights))
    fid = FID(feature=extractor, normalize=False).to(device)  # a module: its input is what the extractor takes (uint8)
    kid = KID(feature=extractor, subsets=int(kid_subsets), subset_size=sub, normalize=False).to(device)
    for imgs, is_real in ((r, True), (f, False)):
        for i in range(0, imgs.shape[0], batch_size):
            chunk = imgs[i:i + batch_size].to(device)
            fid.update(chunk, real=is_real)
            kid.update(chunk, real=is_real)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "num_real": int(r.shape[0]), "num_fake": int(f.shape[0])}
