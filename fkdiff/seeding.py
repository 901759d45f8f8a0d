"""Generator seeds derived from (seed, step, rank, stream): the one way fkdiff turns a run's seed into random streams.

Every stochastic draw of a training or evaluation run comes from its own `torch.Generator`, seeded by

    derive_seed(seed, step, rank, stream) = first 63 bits of SHA-256("fkdiff-distill:{seed}:{step}:{rank}:{stream}")

so a draw depends only on what it is (which step, which share of the work, which purpose), never on how many draws
came before it, on the number of processes, or on whether the run was resumed from a checkpoint (EDM's rule: sample i
depends on seed i only). Streams in use:

    "noise"       training sigma / eps / condition dropout of step `step`, drawn for the global batch (rank 0)
    "data"        the permutation of epoch `step` in `fkdiff.data.StepBatches`
    "val"         validation noise of validation batch `step` (the same at every validation)
    "hutchinson"  the Jacobian-asymmetry probes of step `step`, per rank
    "plot"        validation plots; "eval" the end-of-run evaluation

The "fkdiff-distill" prefix is the one distillation used first; it is kept so that earlier runs reproduce.
Generators are CPU generators: draws are made on the CPU and moved, so a run gives the same numbers on any device.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "seeded_generator"]

_NAMESPACE = "fkdiff-distill"


def derive_seed(seed: int, step: int = 0, rank: int = 0, stream: str = "noise") -> int:
    """A 63-bit generator seed that is a pure function of (seed, step, rank, stream)."""
    h = hashlib.sha256(f"{_NAMESPACE}:{int(seed)}:{int(step)}:{int(rank)}:{stream}".encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def seeded_generator(seed: int, step: int = 0, rank: int = 0, stream: str = "noise") -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed(seed, step, rank, stream)`."""
    return torch.Generator().manual_seed(derive_seed(seed, step, rank, stream))
