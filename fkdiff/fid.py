"""FID of a distilled student, by EDM's protocol (Karras et al. 2022, NVlabs/edm `fid.py`), and its entry point.

    FID = |mu - mu_ref|^2 + tr(S + S_ref - 2 (S S_ref)^{1/2})          (Heusel et al. 2017; EDM
                                                                        `calculate_fid_from_inception_stats`)

- Features: the 2048-d pool features of the TF-ported Inception-v3 (torch-fidelity's `FeatureExtractorInceptionV3`,
  "inception-v3-compat": the network of EDM's detector pickle and of the original FID code), fed uint8 RGB images
  quantised as EDM's `generate.py` does, `(x * 127.5 + 128).clip(0, 255).to(uint8)` for x in [-1, 1]. The weights
  file is read from the user's torch hub cache (`<torch.hub.get_dir()>/checkpoints/INCEPTION_WEIGHTS_FILE`, where
  torch-fidelity itself caches it) or `fid.weights`; fkdiff never downloads it. `fkdiff.metrics.inception` checks it
  (`inception_weights_path`, the same check as `fid_kid`'s: a weights-only load that runs nothing, a state_dict of
  tensors, `fid.weights_sha256` when set) before torch-fidelity loads it; `fid.json` records its sha256.
- Statistics: mu and the unbiased covariance S, accumulated in float64 as EDM does.
- Reference statistics (stated in `fid.json`): `fid.ref=edm`, EDM's published statistics of the 50,000 CIFAR-10
  training images (`FID_REFS`, an .npz with `mu` and `sigma`, fetched once into the torch hub cache and read with
  numpy's allow_pickle=False); `fid.ref=data`, the same computed from `data.root`'s training images with the same
  extractor; or a path to such an .npz.
- Generated images: `fid.num_samples` (50,000, EDM's count; fewer is an error, as in EDM) from the student, in SMC
  batches of at most `fid.batch` particles with the `sample:` section's settings, each batch resampled to equal
  weights; a class-conditional student's batch i is drawn from class i mod K (`smc_images`). Or an existing file of
  images (`fid.samples=<.pt>`: a tensor or `{"samples": ...}` of `[N, C, H, W]` in [-1, 1]).

    python -m fkdiff.fid recipe=cifar10 data.root=<folder> fid.student=runs/cifar10/student/student.pt
    python -m fkdiff.fid recipe=cifar10 fid.samples=runs/sample/.../samples.pt fid.num_samples=2000   # a quick look

This is the one place of the FID of a run. (`fkdiff.metrics.inception.fid_kid` computes FID/KID of two image sets
through torchmetrics, with the same extractor, weights file, weights check and `FIDUnavailableError`.)
torch-fidelity needs a torchvision matching the installed torch: where it does not import, `FIDUnavailableError`
says what to install.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from fkdiff.files import sha256_file
from fkdiff.metrics.inception import (INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, FIDUnavailableError,
                                      inception_features, inception_weights_path)

__all__ = ["FIDUnavailableError", "INCEPTION_WEIGHTS_FILE", "INCEPTION_WEIGHTS_URL", "FID_REFS", "to_uint8_edm",
           "inception_weights_path", "inception_features", "FeatureStats", "frechet_distance", "load_reference",
           "smc_images", "fid", "main"]

FID_REFS = {"cifar10": "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"}  # EDM README
EDM_NUM_SAMPLES = 50_000


def to_uint8_edm(x: Tensor) -> Tensor:
    """Images `[B, C, H, W]` in [-1, 1] -> uint8 RGB `[B, 3, H, W]` exactly as EDM's generate.py writes its PNGs
    (grey images repeated to 3 channels, as EDM's fid.py does)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be a [B, 1 or 3, H, W] tensor in [-1, 1], got {tuple(getattr(x, 'shape', ()))}")
    u = (x.detach().float() * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return u.repeat(1, 3, 1, 1) if u.shape[1] == 1 else u


class FeatureStats:
    """Running sums of features for mu and the unbiased covariance, in float64 (EDM's `calculate_inception_stats`)."""

    def __init__(self):
        self.n, self.sum, self.outer = 0, None, None

    def update(self, features: Tensor) -> None:
        """Add a batch of features `[B, dim]`."""
        f = features.detach().to("cpu", torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


def frechet_distance(mu: np.ndarray, sigma: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """|mu - mu_ref|^2 + tr(S + S_ref - 2 sqrtm(S S_ref)), with scipy's sqrtm as EDM computes it."""
    import scipy.linalg

    m = float(np.square(mu - mu_ref).sum())
    s, _ = scipy.linalg.sqrtm(np.dot(sigma, sigma_ref), disp=False)
    return float(np.real(m + np.trace(sigma + sigma_ref - s * 2)))


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:  # an .npz holding objects is refused, never unpickled
        if "mu" not in data or "sigma" not in data:
            raise ValueError(f"{path} holds {sorted(data.files)}, not FID reference statistics (mu, sigma)")
        return np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)


def load_reference(ref: str, dataset: str, *, images: Callable[[], Iterable[Tensor]] | None = None,
                   features: Callable[[Tensor], Tensor] | None = None, cache: str | os.PathLike | None = None,
                   timeout: float = 10.0) -> tuple[np.ndarray, np.ndarray, str]:
    """(mu_ref, sigma_ref, description) for `ref` = "edm" (EDM's published statistics of `dataset`), "data" (computed
    from `images()`, batches in [-1, 1], with `features`; saved to / reused from `cache`), or an .npz path."""
    if ref == "edm":
        if dataset not in FID_REFS:
            raise ValueError(f"EDM publishes reference statistics for {sorted(FID_REFS)}, not {dataset!r}; use "
                             "fid.ref=data (computed from the training images) or an .npz path")
        from teachers.hub import fetch_url  # the torch hub cache, bounded waits, clear offline error

        path = fetch_url(FID_REFS[dataset], timeout=timeout, package="EDM FID reference statistics")
        return (*_read_npz(path), f"EDM's {dataset} statistics {FID_REFS[dataset]} (cached at {path})")
    if ref == "data":
        if cache is not None and Path(cache).is_file():
            return (*_read_npz(Path(cache)), f"{dataset} training images, statistics cached at {cache}")
        if images is None or features is None:
            raise ValueError("fid.ref=data needs the training images (data.root) and the Inception features")
        stats = FeatureStats()
        for batch in images():
            stats.update(features(to_uint8_edm(batch)))
        mu, sigma = stats.mu_sigma()
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, mu=mu, sigma=sigma)
        return mu, sigma, f"{dataset} training images ({stats.n}), computed here" + (f", saved to {cache}" if cache
                                                                                     else "")
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"fid.ref={ref}: no such file (use edm, data or an .npz with mu and sigma)")
    return (*_read_npz(path), f"the statistics in {path}")


# ---------------------------------------------------------------------------------------------------------------------
# the entry point


def _load_images(path: str | os.PathLike) -> Tensor:
    data = torch.load(path, map_location="cpu", weights_only=True)
    x = data.get("samples") if isinstance(data, dict) else data
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"{path} holds no [N, C, H, W] image tensor (a tensor or {{'samples': tensor}})")
    return x


def _training_batches(cfg: DictConfig, batch: int) -> Callable[[], Iterable[Tensor]]:
    from fkdiff.training import build_datamodule_from_config

    def batches():
        dm = build_datamodule_from_config(cfg.data)
        dm.setup("fit")
        ds = dm.train_set
        for i in range(0, len(ds), batch):
            yield ds.__getitems__(list(range(i, min(i + batch, len(ds)))))["x"]

    return batches


def smc_images(cfg: DictConfig, student: str | os.PathLike, num: int, batch: int,
               device: torch.device | str = "cpu", fast_path: dict | None = None) -> Iterator[Tensor]:
    """`num` images `[b, C, H, W]` from the distilled `student`, in ceil(num / batch) SMC batches of (near-)equal size
    at most `batch` (50,000 in 100 batches of 500), run with
    the `sample:` section's settings (levels, sigma range, kernel, resampling, max_batch chunking), each batch
    resampled to equal weights; `fast_path` (`fid.fast_path`) the student's `EnergyStudent.fast_path` keywords.
    A class-conditional student draws batch i from class i mod K (EDM draws labels
    uniformly; SMC needs one target per batch: a whole number of rounds over the K classes is exactly balanced)."""
    from fkdiff import mcmc, smc
    from fkdiff.compose import conditioned
    from fkdiff.models import load_model

    opt = OmegaConf.to_container(cfg.sample, resolve=True)
    device = torch.device(device)
    model = load_model({"kind": "energy", "path": str(student), "fast_path": fast_path}, device)
    if getattr(model, "cond_kind", "none") not in ("none", "class"):
        raise ValueError(f"FID draws unconditional or class-conditional images; {student} is conditioned on "
                         f"{model.cond_kind}")
    num_classes = getattr(model, "num_classes", None)
    gen = torch.Generator(device=device).manual_seed(int(cfg.seed))
    levels = int(opt["num_steps"] if opt.get("num_steps") is not None else opt["num_levels"])
    if int(batch) < 2 or int(num) < 2:
        raise ValueError(f"SMC needs at least 2 particles a batch: got fid.batch={batch}, fid.num_samples={num}")
    sizes = [len(c) for c in torch.arange(int(num)).tensor_split(-(-int(num) // int(batch)))]  # as even as possible
    for i, n in enumerate(sizes):
        target = conditioned(model, i % num_classes) if num_classes else model
        result = smc.sample(
            target, n, shape=model.event_shape, num_levels=levels, sigma_max=float(opt["sigma_max"]),
            sigma_min=float(opt["sigma_min"]), mode=opt["mode"], mcmc=mcmc.build(opt.get("mcmc")),
            resample=opt["resample"], ess_threshold=float(opt["ess_threshold"]),
            final_denoise=bool(opt["final_denoise"]), init_std=opt.get("init_std"), generator=gen, device=device,
            max_batch=opt.get("max_batch"))
        yield result.resample(gen).to(torch.float32)


def fid(cfg: DictConfig) -> dict:
    """Compute the FID the `fid:` section asks for (module docstring); writes `<run_dir>/fid.json` and returns it."""
    f = OmegaConf.to_container(cfg.fid, resolve=True)
    num = int(f.get("num_samples") or EDM_NUM_SAMPLES)
    if bool(f.get("samples")) == bool(f.get("student")):
        raise ValueError("set exactly one of fid.student (a distilled student to sample) and fid.samples (a file of "
                         "generated images)")
    device = torch.device(f.get("device") or "cpu")
    weights = inception_weights_path(f.get("weights"), sha256=f.get("weights_sha256"))  # before anything loads it
    features = inception_features(weights, device)  # the missing package fails here, before any sampling
    run_dir = Path(str(cfg.run_dir))
    dataset = str(cfg.data.name)
    cache = None
    if f.get("ref") == "data":  # reused across runs on the same data folder
        root = hashlib.sha1(str(Path(str(cfg.data.get("root") or dataset)).resolve()).encode()).hexdigest()[:10]
        cache = Path(torch.hub.get_dir()) / "fkdiff" / f"fid-ref-{dataset}-{root}.npz"
    mu_ref, sigma_ref, ref_desc = load_reference(str(f.get("ref", "edm")), dataset,
                                                 images=_training_batches(cfg, int(f.get("batch", 500))),
                                                 features=features, cache=cache)
    if f.get("samples"):
        x = _load_images(f["samples"])
        if x.shape[0] < num:
            raise ValueError(f"{f['samples']} holds {x.shape[0]} images, fewer than fid.num_samples={num} (EDM's "
                             "protocol refuses fewer; set fid.num_samples to compute on fewer, knowing FID is biased "
                             "upward at small counts)")
        batches: Iterable[Tensor] = x[:num].split(int(f.get("batch", 500)))
        source = f"the first {num} images of {f['samples']}"
    else:
        batches = smc_images(cfg, f["student"], num, int(f.get("batch", 500)), device, f.get("fast_path"))
        source = f"{num} SMC samples of {f['student']} (sample: section, batches of {f.get('batch')})"
    stats = FeatureStats()
    for b in batches:
        stats.update(features(to_uint8_edm(b)))
    if stats.n != num:
        raise RuntimeError(f"got {stats.n} generated images, expected {num}")
    mu, sigma = stats.mu_sigma()
    out = {"fid": frechet_distance(mu, sigma, mu_ref, sigma_ref), "num_samples": num, "generated": source,
           "reference": ref_desc, "features": "Inception-v3 pool3 (2048), torch-fidelity inception-v3-compat",
           "weights": str(weights), "weights_sha256": sha256_file(weights)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "fid.json").write_text(json.dumps(out, indent=2))
    print(f"[fkdiff.fid] FID = {out['fid']:.3f} ({num} images vs {ref_desc}); {run_dir / 'fid.json'}")
    return out


def main() -> None:
    from fkdiff.recipes import main as recipes_main

    recipes_main(fid, task="fid")


if __name__ == "__main__":
    main()
