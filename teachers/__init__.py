"""Teachers: analytic ground-truth diffusions, trained EDM denoisers, and adapters for external networks.

Every teacher is seen by the rest of fkdiff only as a denoiser `D(x, sigma, cond=None)` (fkdiff.protocols.Denoiser).
"""

from teachers.analytic import Box, GaussianMixture, gmm_product
from teachers.presets import PRESETS, columns_left, columns_right, fractal, gaussian, make_preset, ring8, strip
from teachers.edm import EDMDenoiser, EDMLoss, drop_condition
from teachers.adapters import (EDMNetDenoiser, DiscreteVPDenoiser, VPEpsDenoiser, VPVDenoiser, VPX0Denoiser,
                               from_diffusers, load_edm_pickle, make_alphas_cumprod, vp_denoiser)
from teachers.load import load_teacher, save_teacher

__all__ = ["GaussianMixture", "Box", "gmm_product", "PRESETS", "make_preset", "ring8", "strip",
           "columns_left", "columns_right", "fractal", "gaussian",
           "EDMDenoiser", "EDMLoss", "drop_condition", "EDMNetDenoiser", "DiscreteVPDenoiser", "VPEpsDenoiser",
           "VPX0Denoiser", "VPVDenoiser", "vp_denoiser", "make_alphas_cumprod", "from_diffusers", "load_edm_pickle",
           "load_teacher", "save_teacher"]
