"""FID and KID with the standard Inception-v3 weights, through torchmetrics + torch-fidelity (optional extra `fid`).

    FID = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^{1/2})       (Heusel et al. 2017, eq. 6; 2048-d pool features)
    KID = unbiased MMD^2 with the kernel k(a, b) = (a.b / d + 1)^3  (Bińkowski et al. 2018), mean +- std over subsets

Both use torch-fidelity's `FeatureExtractorInceptionV3` (the TF-ported Inception of the original FID code) via
torchmetrics' `NoTrainInceptionV3`, images as uint8 RGB (grey images are repeated to 3 channels; the extractor
resizes to 299 x 299 itself). Nothing is downloaded: the weights file is looked up in the user's torch hub cache,
`$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth` (where torch-fidelity would have put it), or
passed as `weights_path`. Missing packages or weights raise errors saying what to install or where to put the file.
`inception_weights_path` is the one check of the weights for both FID paths (`fid_kid` here and the EDM-protocol
command `python -m fkdiff.fid`, which takes its extractor from `inception_features`): a weights-only load that runs
nothing, a state_dict of tensors, and the file's sha256 when one is given, all before torch-fidelity opens the file.

The extra is imported lazily (`fid_kid` only), so `import fkdiff.metrics` never needs torchvision. On machines where
torchvision does not match the installed torch (e.g. a CPU-only torch build without a matching torchvision wheel),
the import fails and `fid_kid` raises `FIDUnavailableError` naming the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Callable

import torch
from torch import Tensor

from fkdiff.files import ChecksumError, sha256_file

__all__ = ["FIDUnavailableError", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "inception_weights_path",
           "inception_features", "fid_available", "to_uint8_rgb", "fid_kid"]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         + INCEPTION_WEIGHTS_FILE)


_HINT = ("FID/KID need the optional extra: `pip install 'fkdiff[fid]'` (torch-fidelity and torchvision), with a "
         f"torchvision build that matches the installed torch {torch.__version__} (install both from the same index, "
         "e.g. https://download.pytorch.org/whl/cpu or /cu124). The offline alternative needs neither: "
         "fkdiff.metrics.classifier_frechet_distance (not comparable with FID).")


class FIDUnavailableError(ImportError):
    """torchmetrics' Inception metrics cannot be imported here (torch-fidelity / torchvision missing or broken)."""


def _import_metrics():
    """(FrechetInceptionDistance, KernelInceptionDistance, NoTrainInceptionV3) or FIDUnavailableError."""
    hint = _HINT
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


def _import_fidelity_extractor():
    """torch-fidelity's FeatureExtractorInceptionV3, or FIDUnavailableError (without torchmetrics)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError, AttributeError, OSError) as e:  # a mismatched torchvision: RuntimeError
        raise FIDUnavailableError(f"torch-fidelity does not import here ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}). {_HINT}") from e
    return FeatureExtractorInceptionV3


def fid_available() -> bool:
    """Whether `fid_kid` can import its dependencies here (the weights are checked separately)."""
    try:
        _import_metrics()
    except FIDUnavailableError:
        return False
    return True


def inception_weights_path(path: str | os.PathLike | None = None, *, sha256: str | None = None) -> Path:
    """The Inception weights file, checked before anything unpickles it: `path`, else
    `<torch.hub.get_dir()>/checkpoints/<INCEPTION_WEIGHTS_FILE>`. The one check of both FID paths (`fid_kid` here and
    the `python -m fkdiff.fid` command).

    - missing: FileNotFoundError naming the file, the folder and the URL (nothing is downloaded);
    - not a plain weights file: ValueError. It is opened with a weights-only load (tensors and plain containers only:
      nothing in the file runs) and must be a state_dict of tensors; only then may torch-fidelity load it;
    - `sha256` given (`fid.weights_sha256`, `--weights-sha256`): the file's sha256 must equal it (ChecksumError).
    """
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    p = Path(os.path.expanduser(str(path))) if path is not None else folder / INCEPTION_WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {p}. On a machine with network: `mkdir -p {folder} && curl -L -o "
            f"{folder / INCEPTION_WEIGHTS_FILE} {INCEPTION_WEIGHTS_URL}` (TORCH_HOME moves the torch hub cache), "
            "then copy it here, or pass its path (fid.weights=<file>, --weights <file>). fkdiff never downloads it.")
    if sha256 is not None:
        got = sha256_file(p)
        if got != str(sha256).lower().removeprefix("sha256:"):
            raise ChecksumError(f"{p}: sha256 {got} differs from the expected {sha256}; refusing these Inception "
                                "weights (a damaged or different file)")
    try:  # refuses anything but tensors and plain containers, without running any of it
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{p} is not a plain weights file ({type(e).__name__}: {first}); refusing to let "
                         "torch-fidelity unpickle it") from e
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{p} is not a state_dict of tensors; refusing to let torch-fidelity load it")
    return p


def inception_features(weights: str | os.PathLike | None = None, device: torch.device | str = "cpu", *,
                       sha256: str | None = None) -> Callable[[Tensor], Tensor]:
    """`features(uint8 [B, 3, H, W]) -> float64 [B, 2048]`: the 2048-d pool features of torch-fidelity's
    `FeatureExtractorInceptionV3` ("inception-v3-compat", the network of the original FID code and of EDM's detector),
    its weights checked first (`inception_weights_path`)."""
    path = inception_weights_path(weights, sha256=sha256)
    extractor_cls = _import_fidelity_extractor()
    net = extractor_cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(device).eval()

    @torch.no_grad()
    def features(images: Tensor) -> Tensor:
        (feat,) = net(images.to(device))
        return feat.to(torch.float64)

    return features


def to_uint8_rgb(x: Tensor) -> Tensor:
    """Images `[B, C, H, W]` with values in [-1, 1] (C = 1 or 3) -> uint8 `[B, 3, H, W]` in 0..255 (clamped)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be a [B, 1 or 3, H, W] tensor in [-1, 1], got {tuple(getattr(x, 'shape', ()))}")
    u = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u


def fid_kid(real: Tensor, fake: Tensor, *, weights_path: str | os.PathLike | None = None, kid_subsets: int = 100,
            kid_subset_size: int | None = None, batch_size: int = 64, device: torch.device | str = "cpu",
            weights_sha256: str | None = None) -> dict[str, float]:
    """FID and KID between image sets `real` and `fake` `[B, C, H, W]` in [-1, 1] (module docstring).

    Returns {"fid", "kid_mean", "kid_std", "num_real", "num_fake"}. KID uses subsets of size
    `kid_subset_size` (default min(1000, num_real, num_fake)). Raises `FIDUnavailableError` when torchmetrics /
    torch-fidelity / torchvision do not import, FileNotFoundError when the Inception weights are missing, ValueError
    when they are not a plain weights file (`inception_weights_path`, checked first).
    EDM's protocol for CIFAR-10 is 50k generated images against the 50k training images.
    """
    weights = inception_weights_path(weights_path, sha256=weights_sha256)  # checked before anything loads it
    FID, KID, Inception = _import_metrics()
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
