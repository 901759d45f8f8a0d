"""Image metrics (issue 10): offline classifier scores and feature distance for digits, FID/KID where torchmetrics'
Inception metrics import, and the shapes composition accuracy.

- `fkdiff.metrics.classifier`: `train_digits_classifier(size, seed=0)` (a small CNN on the digits train split,
  deterministic), `classifier_scores(clf, x, labels)` (confidence, entropy, accuracy per sample),
  `classifier_frechet_distance(clf, x, reference)` (Fréchet distance of Gaussians fitted to its features: *not* FID),
  `save_classifier` / `load_classifier`.
- `fkdiff.metrics.inception`: `fid_kid(real, fake)` through torchmetrics + torch-fidelity (extra `fid`, imported
  lazily) with the standard Inception weights from the torch hub cache; clear errors when either is missing.
- `fkdiff.metrics.composition`: `composition_accuracy(images, positions)` with the exact shapes detector.
"""

from fkdiff.metrics.classifier import (ClassifierScores, DigitsClassifier, classifier_features,
                                       classifier_frechet_distance, classifier_scores, frechet_distance,
                                       gaussian_frechet_distance, load_classifier, save_classifier,
                                       train_digits_classifier)
from fkdiff.metrics.composition import CompositionScore, composition_accuracy
from fkdiff.metrics.inception import (FIDUnavailableError, fid_available, fid_kid, inception_weights_path,
                                      to_uint8_rgb)

__all__ = [
    "DigitsClassifier", "ClassifierScores", "train_digits_classifier", "save_classifier", "load_classifier",
    "classifier_scores", "classifier_features", "gaussian_frechet_distance", "frechet_distance",
    "classifier_frechet_distance",
    "CompositionScore", "composition_accuracy",
    "FIDUnavailableError", "fid_available", "fid_kid", "inception_weights_path", "to_uint8_rgb",
]
