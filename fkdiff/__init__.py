"""fkdiff: distil diffusion models into energies and sample compositions with Feynman-Kac SMC."""

from fkdiff import diffusion
from fkdiff.energy import load_energy
from fkdiff.protocols import Denoiser, EnergyModel

__all__ = ["diffusion", "Denoiser", "EnergyModel", "load_energy"]
__version__ = "0.1.0"
