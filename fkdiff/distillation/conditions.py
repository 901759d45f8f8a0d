"""Off-condition rows: distil a conditional student where compositions read it, not only on its own data (issue 10).

The projection loss and the level term train E_theta(x|y) at x ~ p_sigma(x|y): data with their own label. A
composition reads every conditional elsewhere too. The product p(x|y1) p(x|y2) weighs a particle near a y1 digit by
E(x|y2) there, off the distribution of condition y2; Du et al. 2023 eq. 13 reads the unconditional E(x) (the null
token), which a student distilled on labelled rows never trains. Measured on the digits_small student
(benchmarks/image_level_parts.py): at sigma 0.05 the relative energy of a real 1 vs a real 7 under one condition is
off by 17-23 nats rms (55 with the level term), against 5 for two digits of the condition's own class.

The fix keeps the rows' points and re-labels them: each row's condition is, independently,

    the null token                         with probability p_uncond  (the teacher's classifier-free output)
    a uniformly drawn other class          with probability p_other   (class labels only)
    its own                                otherwise

and the student copies the teacher *at that condition* (the target of the projection loss and the level term is the
teacher's denoiser / time score under the same condition), so E_theta(x|c) is trained on the mixture
sum_y p(y) p_sigma(x|y) for every c. For a conservative teacher the minimiser is unchanged (its score is a gradient
under every measure); what changes is where the student is held to it. The draws are made for the global batch and
sliced per rank (`shard`), like the teacher's condition dropout (`teachers.edm.drop_condition`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["OffConditionRows"]


class OffConditionRows:
    """Re-label distillation rows (module docstring): null token at rate `p_uncond`, another class at rate `p_other`.

    `num_classes` is needed for `p_other > 0` (class labels `[B]`, long). Position conditions (float `[B, k]`) take
    `p_uncond` only (the null token is a row of NaN). `__call__(cond, generator, shard)` returns the new conditions.
    """

    def __init__(self, p_other: float = 0.0, p_uncond: float = 0.0, num_classes: int | None = None):
        p_other, p_uncond = float(p_other), float(p_uncond)
        if not (0 <= p_other <= 1 and 0 <= p_uncond <= 1 and p_other + p_uncond <= 1):
            raise ValueError(f"off-condition rows: need p_other, p_uncond >= 0 with p_other + p_uncond <= 1, got "
                             f"p_other={p_other}, p_uncond={p_uncond}")
        if p_other > 0 and not (num_classes and int(num_classes) >= 2):
            raise ValueError(f"off-condition rows: p_other > 0 needs class labels with >= 2 classes (got num_classes="
                             f"{num_classes}); position conditions take p_uncond only")
        self.p_other, self.p_uncond = p_other, p_uncond
        self.num_classes = None if num_classes is None else int(num_classes)

    @property
    def active(self) -> bool:
        return self.p_other > 0 or self.p_uncond > 0

    def __call__(self, cond: Any, generator: torch.Generator, shard: tuple[int, int] = (0, 1)) -> Any:
        if cond is None or not self.active:
            return cond
        if not isinstance(cond, Tensor):
            raise TypeError(f"cond must be a tensor (class labels [B] or positions [B, k]), got {type(cond)}")
        rank, world = shard
        n = cond.shape[0] * world
        u = torch.rand(n, generator=generator, dtype=torch.float64)[rank::world].to(cond.device)
        shift = torch.randint(1, max(self.num_classes or 2, 2), (n,), generator=generator)[rank::world].to(cond.device)
        null = u < self.p_uncond
        if cond.is_floating_point():
            if self.p_other > 0:
                raise ValueError("off-condition rows: p_other needs class labels; this batch has position conditions")
            return torch.where(null.view(-1, *([1] * (cond.ndim - 1))), torch.full_like(cond, float("nan")), cond)
        other = (u >= self.p_uncond) & (u < self.p_uncond + self.p_other) & (cond >= 0)
        relabelled = torch.where(other, (cond + shift) % self.num_classes, cond) if self.p_other > 0 else cond
        return torch.where(null, torch.full_like(cond, -1), relabelled)
