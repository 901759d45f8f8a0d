"""A small digits classifier and the offline Fréchet distance in its feature space (not FID).

Image-quality numbers that need no download: a CNN trained on the same digits data (scikit-learn's bundled 8x8
digits, `fkdiff.data.sources.load_digits`, the train split of the `digits` datamodule) gives, per generated sample,

    p(y | x) = softmax(logits(x)),   confidence = max_y p(y | x),   entropy H = -sum_y p(y | x) log p(y | x)  (nats),

and the *classifier Fréchet distance* between two image sets A and B: the Fréchet (2-Wasserstein) distance between
Gaussians fitted to their penultimate-layer features phi(x),

    d^2 = |mu_A - mu_B|^2 + tr(S_A + S_B - 2 (S_A^{1/2} S_B S_A^{1/2})^{1/2})

(Heusel et al. 2017, eq. 6, computed with this classifier's features instead of Inception's: it is *not* FID and its
values are not comparable with FID; see `fkdiff.metrics.inception` for FID/KID). The matrix square root is taken by
symmetric eigendecompositions in float64 (exact for PSD inputs; no scipy `sqrtm` complex round-off).

Training is a pure function of `seed` (initial weights, batches, augmentation), so `train_digits_classifier(size, seed)`
gives the same network on every run on one machine; `save_classifier` / `load_classifier` keep it as a plain dict
(`torch.load(weights_only=True)`), so it is trained once and reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DigitsClassifier",
    "ClassifierScores",
    "train_digits_classifier",
    "save_classifier",
    "load_classifier",
    "classifier_scores",
    "classifier_features",
    "gaussian_frechet_distance",
    "frechet_distance",
    "classifier_frechet_distance",
]

FORMAT = "fkdiff.digits_classifier/1"


class DigitsClassifier(nn.Module):
    """CNN `[B, 1, S, S]` (values in [-1, 1], S >= 4) -> logits `[B, num_classes]`; `features(x)` -> `[B, feature_dim]`.

    conv3x3(1 -> w) - SiLU - conv3x3 stride 2 (w -> 2w) - SiLU - conv3x3 (2w -> 2w) - SiLU - adaptive average pool to
    2x2 - linear (8w -> feature_dim) - SiLU = features - linear -> logits. Works at any size (the pooling fixes the
    head's input), so one class serves the 8x8 and 16x16 digits recipes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10, size: int = 8):
        super().__init__()
        if width < 1 or feature_dim < 1 or num_classes < 2 or size < 4:
            raise ValueError(f"need width, feature_dim >= 1, num_classes >= 2, size >= 4; got {width}, "
                             f"{feature_dim}, {num_classes}, {size}")
        self.config = dict(width=int(width), feature_dim=int(feature_dim), num_classes=int(num_classes),
                           size=int(size))
        self.size = int(size)
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.feat = nn.Sequential(nn.Linear(8 * width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def _check(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[2:]) != (self.size, self.size):
            raise ValueError(f"this classifier takes digits of shape [B, 1, {self.size}, {self.size}], got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        return x.to(next(self.parameters()).dtype)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features `[B, feature_dim]` (what the Fréchet distance compares)."""
        return self.feat(self.conv(self._check(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _shift(x: Tensor, generator: torch.Generator, max_shift: int) -> Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with the background (-1)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    off = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator)
    rows = off[:, 0, None] + torch.arange(h)[None]  # [B, H]
    cols = off[:, 1, None] + torch.arange(w)[None]  # [B, W]
    return pad[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def _digits_split(size: int, data_seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_val, y_val): the `digits` datamodule's split (same permutation, same seed)."""
    from fkdiff.data.modules import DigitsDataModule

    dm = DigitsDataModule(size=size, seed=data_seed)
    dm.setup("fit")
    return dm.train_set.x, dm.train_set.cond, dm.val_set.x, dm.val_set.cond


def train_digits_classifier(size: int = 8, *, seed: int = 0, data_seed: int = 0, steps: int = 400,
                            batch_size: int = 128, lr: float = 3e-3, width: int = 32, feature_dim: int = 64,
                            max_shift: int | None = None, noise_std: float = 0.05) -> DigitsClassifier:
    """Train a `DigitsClassifier` on the train split of `DigitsDataModule(size, seed=data_seed)`; deterministic in `seed`.

    Adam, `steps` minibatches drawn with replacement, augmentation by random translations of up to `max_shift` px
    (default size // 8) and Gaussian pixel noise of std `noise_std` (so that slightly noisy generated samples are not
    out of distribution). Returns the network in eval mode, with `.report` = {"val_accuracy", "train_accuracy",
    "num_val", "num_train", "size", "seed", "data_seed", "steps"} measured on the held-out split.
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0; got {steps}, {batch_size}, {lr}")
    xtr, ytr, xva, yva = _digits_split(size, data_seed)
    shift = max(1, size // 8) if max_shift is None else int(max_shift)
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # layer initialisers use the global RNG: seed it locally
        torch.manual_seed(int(seed))
        clf = DigitsClassifier(width, feature_dim, 10, size)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    clf.train()
    for _ in range(steps):
        idx = torch.randint(0, xtr.shape[0], (batch_size,), generator=g)
        xb = _shift(xtr[idx], g, shift)
        if noise_std > 0:
            xb = xb + noise_std * torch.randn(xb.shape, generator=g)
        loss = F.cross_entropy(clf(xb), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval().requires_grad_(False)
    with torch.no_grad():
        acc_va = float((clf(xva).argmax(1) == yva).float().mean())
        acc_tr = float((clf(xtr).argmax(1) == ytr).float().mean())
    clf.report = dict(val_accuracy=acc_va, train_accuracy=acc_tr, num_val=int(xva.shape[0]),
                      num_train=int(xtr.shape[0]), size=int(size), seed=int(seed), data_seed=int(data_seed),
                      steps=int(steps))
    return clf


def save_classifier(clf: DigitsClassifier, path: str | Path) -> Path:
    """Write the classifier (config, weights, report) as a plain dict loadable with `weights_only=True`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": FORMAT, "config": dict(clf.config), "report": dict(getattr(clf, "report", {}) or {}),
                "state_dict": {k: v.detach().cpu().clone() for k, v in clf.state_dict().items()}}, path)
    return path


def load_classifier(path: str | Path, device: torch.device | str | None = None) -> DigitsClassifier:
    """A classifier written by `save_classifier`, in eval mode (no code runs from the file: weights_only)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a digits classifier written by fkdiff.metrics.save_classifier")
    clf = DigitsClassifier(**data["config"])
    clf.load_state_dict(data["state_dict"])
    clf.report = dict(data.get("report") or {})
    return clf.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class ClassifierScores:
    """Per-sample classifier outputs for images `[B, ...]`.

    probs `[B, K]`, pred `[B]` (argmax), confidence `[B]` (max_y p), entropy `[B]` (nats), label_prob `[B]` (p of the
    requested label, or None), accuracy (fraction with pred == label, or None), mean_confidence, mean_entropy.
    """

    probs: Tensor
    pred: Tensor
    confidence: Tensor
    entropy: Tensor
    label_prob: Tensor | None
    accuracy: float | None

    @property
    def mean_confidence(self) -> float:
        return float(self.confidence.mean())

    @property
    def mean_entropy(self) -> float:
        return float(self.entropy.mean())

    def summary(self) -> dict[str, Any]:
        return {"mean_confidence": self.mean_confidence, "mean_entropy": self.mean_entropy,
                "accuracy": self.accuracy,
                "mean_label_prob": None if self.label_prob is None else float(self.label_prob.mean()),
                "class_counts": torch.bincount(self.pred, minlength=self.probs.shape[1]).tolist()}


def _batched(fn, x: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


def classifier_scores(clf: DigitsClassifier, x: Tensor, labels: Tensor | int | None = None,
                      batch_size: int = 1024) -> ClassifierScores:
    """Confidence and entropy of `clf`'s prediction for each image `x` `[B, 1, S, S]` (and accuracy against
    `labels`, a `[B]` tensor or one int for all)."""
    if x.shape[0] < 1:
        raise ValueError("classifier_scores needs at least one image")
    logits = _batched(clf, x, batch_size).double()
    logp = torch.log_softmax(logits, 1)
    probs = logp.exp()
    entropy = -(probs * logp).sum(1)
    conf, pred = probs.max(1)
    label_prob = acc = None
    if labels is not None:
        lab = torch.as_tensor(labels, dtype=torch.long)
        lab = lab.expand(x.shape[0]) if lab.ndim == 0 else lab
        if lab.shape != (x.shape[0],):
            raise ValueError(f"labels must be one int or a [B]=[{x.shape[0]}] tensor, got shape {tuple(lab.shape)}")
        label_prob = probs.gather(1, lab[:, None])[:, 0]
        acc = float((pred == lab).double().mean())
    return ClassifierScores(probs, pred, conf, entropy, label_prob, acc)


def classifier_features(clf: DigitsClassifier, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Penultimate-layer features `[B, feature_dim]` (float64)."""
    return _batched(clf.features, x, batch_size).double()


def _sqrt_psd(s: Tensor) -> Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()[None]) @ v.T


def gaussian_frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2) (module docstring)."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, mu2, cov1, cov2))
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(f"need means [d] and covariances [d, d]; got {tuple(mu1.shape)}, {tuple(cov1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(cov2.shape)}")
    c1, c2 = 0.5 * (cov1 + cov1.T), 0.5 * (cov2 + cov2.T)
    r1 = _sqrt_psd(c1)
    cross = torch.linalg.eigvalsh(r1 @ c2 @ r1).clamp_min(0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * cross)


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted (mean, unbiased covariance) to features `[Na, d]` and `[Nb, d]`."""
    a, b = torch.as_tensor(feat_a, dtype=torch.float64), torch.as_tensor(feat_b, dtype=torch.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need two feature sets [N, d] with the same d and N >= 2; got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}")
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T).reshape(a.shape[1], -1),
                                     b.mean(0), torch.cov(b.T).reshape(b.shape[1], -1))


def classifier_frechet_distance(clf: DigitsClassifier, x: Tensor, reference: Tensor, batch_size: int = 1024) -> float:
    """Fréchet distance between images `x` and `reference` in `clf`'s feature space (not FID: see module docstring)."""
    return frechet_distance(classifier_features(clf, x, batch_size), classifier_features(clf, reference, batch_size))
