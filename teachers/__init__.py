"""Teachers: analytic ground-truth diffusions, trained EDM denoisers, and adapters for external networks.

Every teacher is seen by the rest of fkdiff only as a denoiser `D(x, sigma, cond=None)` (fkdiff.protocols.Denoiser).
"""

from teachers.analytic import Box, GaussianMixture, gmm_product
from teachers.presets import PRESETS, columns_left, columns_right, fractal, gaussian, make_preset, ring8, strip

__all__ = ["GaussianMixture", "Box", "gmm_product", "PRESETS", "make_preset", "ring8", "strip",
           "columns_left", "columns_right", "fractal", "gaussian"]
