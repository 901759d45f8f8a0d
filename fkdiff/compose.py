"""Composition algebra of energy-based diffusion models at every noise level (DESIGN.md section 6; Du et al. 2023,
sec. 3, eqs. 8-10 and 13).

| operator                         | energy E(x, sigma)                          | score                               |
|----------------------------------|---------------------------------------------|-------------------------------------|
| product(*t)           (eq. 8)    | sum_j E_j                                   | sum_j s_j                           |
| mixture(*t, weights)  (eq. 9)    | -logsumexp_j (log w_j - E_j)                | sum_j softmax_j(log w_j - E_j) s_j  |
| negation(b, o, alpha) (eq. 10)   | E_b - alpha E_o                             | s_b - alpha s_o                     |
| tempered(t, beta)                | beta E                                      | beta s                              |
| conditional(u, conds, w) (eq.13) | E_u + sum_i w_i (E_{c_i} - E_u)             | s_u + sum_i w_i (s_{c_i} - s_u)     |

Product, negation, temperature and conditioning are one linear operator, `Linear(components, coefficients)`:
energy sum_j c_j E_j, score sum_j c_j s_j, with c = (1, ..., 1), (1, -alpha), (beta), (1 - sum_i w_i, w_1, ..., w_c).
Each component is anything with `energy(x, sigma) -> [B]` and optionally `score(x, sigma)` (else -grad energy by
autograd); the result is again such a target (and a denoiser, D = x + sigma^2 score), so operators nest.
The mixture's score is the exact gradient of its energy, computed from the component scores with softmax weights
(stable, no autograd); its weights are normalised to sum to one (Du et al. use 1/K), so a mixture of normalised
components is normalised. Energies keep any autograd graph of the components; scores are detached.
Components whose energies are only defined up to a constant shift the mixture's relative weights accordingly.

`conditioned(model, y)` binds a condition (a class label or a condition vector) to a conditional model, giving a
target of x alone; `parse(expr, models)` builds a composition from an expression such as
`product(ring, tempered(strip, 2.0))` over named models (the command line's `sample.target`).
"""

from __future__ import annotations

import ast
import math
import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from fkdiff.diffusion import as_sigma, denoiser_from_score, score_from_denoiser
from fkdiff.nets import checked_labels
from fkdiff.targets import has_energy
from fkdiff.targets import energy_and_score as _energy_and_score
from fkdiff.targets import score as _score

__all__ = ["Composed", "Linear", "Product", "Mixture", "Negation", "Tempered", "Conditional", "Conditioned",
           "product", "mixture", "negation", "tempered", "conditional", "conditioned", "OPERATORS", "parse",
           "ImproperTargetWarning"]


class ImproperTargetWarning(UserWarning):
    """A composition whose density may have no normaliser (negation with alpha >= 1)."""


def _check_targets(targets: Sequence[Any], op: str) -> list:
    targets = list(targets)
    if not targets:
        raise ValueError(f"{op} needs at least one target")
    for t in targets:
        if not (has_energy(t) or callable(getattr(t, "score", None)) or callable(t)):
            raise TypeError(f"{op}: {type(t).__name__} has neither energy(x, sigma) nor score(x, sigma)")
    return targets


def _energy(t: Any, x: Tensor, sigma: Tensor) -> Tensor:
    if not has_energy(t):
        raise TypeError(f"{type(t).__name__} has no energy(x, sigma): this composition's energy is undefined "
                        "(its score may still be used as a proposal)")
    e = t.energy(x, sigma)
    if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
        raise ValueError(f"{type(t).__name__}.energy must return shape [B]=[{x.shape[0]}]")
    return e


class Composed:
    """Base class: a target built from components; subclasses define `energy`, `score` and `energy_and_score`
    (shapes [B], x's, and both)."""

    components: tuple

    def log_prob(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """-energy (unnormalised unless the components and the operator preserve normalisation)."""
        return -self.energy(x, sigma)

    def __call__(self, x: Tensor, sigma: float | Tensor, cond: Any = None) -> Tensor:
        """Denoiser D(x, sigma) = x + sigma^2 score (Tweedie)."""
        if cond is not None:
            raise ValueError(f"{type(self).__name__} takes no cond; compose conditional models with conditional()")
        return denoiser_from_score(self.score(x, sigma), x, sigma)


class Linear(Composed):
    """sum_j c_j log p_j: energy sum_j c_j E_j, score sum_j c_j s_j. Product, negation, temperature and conditioning
    are this one formula with their coefficients c (see the module docstring's table)."""

    def __init__(self, components: Sequence[Any], coefficients: Sequence[float], op: str = "linear"):
        self.components = tuple(_check_targets(components, op))
        c = tuple(float(v) for v in coefficients)
        if len(c) != len(self.components) or not all(math.isfinite(v) for v in c):
            raise ValueError(f"{op}: needs {len(self.components)} finite coefficients, got {coefficients}")
        self.coefficients = c

    def energy(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        sig = as_sigma(sigma, x)
        return sum(c * _energy(t, x, sig) for c, t in zip(self.coefficients, self.components))

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        sig = as_sigma(sigma, x)
        return sum(c * _score(t, x, sig) for c, t in zip(self.coefficients, self.components))

    def energy_and_score(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """(energy `[B]`, score `[B, *event]`) evaluating each component once (what SMC and MCMC call)."""
        sig = as_sigma(sigma, x)
        parts = [_energy_and_score(t, x, sig) for t in self.components]
        return (sum(c * e for c, (e, _) in zip(self.coefficients, parts)),
                sum(c * g for c, (_, g) in zip(self.coefficients, parts)))


class Product(Linear):
    """prod_j p_j: coefficients 1 (energy sum_j E_j, score sum_j s_j)."""

    def __init__(self, *targets):
        super().__init__(targets, [1.0] * len(targets), "product")


class Mixture(Composed):
    """sum_j w_j p_j: energy -logsumexp_j(log w_j - E_j); score = softmax-weighted component scores."""

    def __init__(self, *targets, weights=None):
        self.components = tuple(_check_targets(targets, "mixture"))
        k = len(self.components)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,):
            raise ValueError(f"mixture weights must have shape [{k}], got {tuple(w.shape)}")
        if (w < 0).any() or not (w.sum() > 0) or not torch.isfinite(w).all():
            raise ValueError("mixture weights must be finite, non-negative, with a positive sum")
        w = w / w.max()  # first to [0, 1]: the sum of large finite weights (1e308 + 1e308) is inf
        self.weights = w / w.sum()
        self.log_weights = self.weights.log()

    def _logits(self, x: Tensor, sig: Tensor) -> Tensor:
        e = torch.stack([_energy(t, x, sig) for t in self.components], 1)  # [B, K]
        return self.log_weights.to(device=e.device, dtype=e.dtype)[None] - e

    def energy(self, x, sigma):
        sig = as_sigma(sigma, x)
        return -torch.logsumexp(self._logits(x, sig), 1)

    def score(self, x, sigma):
        sig = as_sigma(sigma, x)
        with torch.no_grad():
            r = torch.softmax(self._logits(x, sig), 1)  # [B, K] responsibilities
        return self._weighted(r, x, lambda k: _score(self.components[k], x, sig))

    def energy_and_score(self, x, sigma):
        sig = as_sigma(sigma, x)
        parts = [_energy_and_score(t, x, sig) for t in self.components]
        e = torch.stack([p[0] for p in parts], 1)
        logits = self.log_weights.to(device=e.device, dtype=e.dtype)[None] - e
        return -torch.logsumexp(logits, 1), self._weighted(torch.softmax(logits, 1), x, lambda k: parts[k][1])

    @staticmethod
    def _weighted(r: Tensor, x: Tensor, score_k) -> Tensor:
        """sum_k r_k s_k; a component with zero responsibility contributes nothing (even if its score is inf)."""
        r = torch.nan_to_num(r, nan=0.0)
        out = torch.zeros_like(x)
        shape = (-1, *([1] * (x.ndim - 1)))
        for k in range(r.shape[1]):
            rk = r[:, k]
            nz = rk > 0
            if nz.any():
                out = out + torch.where(nz.reshape(shape), rk.to(x.dtype).reshape(shape) * score_k(k),
                                        torch.zeros_like(x))
        return out


class Negation(Linear):
    """p_base / p_other^alpha: coefficients (1, -alpha) (Du et al. eq. 10)."""

    def __init__(self, base, other, alpha: float = 0.5):
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"negation needs a finite alpha >= 0 (Du et al. use 0.5), got {alpha}; p_base * "
                             f"p_other^|alpha| is product(base, tempered(other, |alpha|))")
        if alpha >= 1:
            warnings.warn(f"negation with alpha={alpha} >= 1: p_base / p_other^alpha is an improper target (no "
                          f"normaliser: SMC samples run off to infinity and log Z is meaningless) unless p_base's tails "
                          f"are lighter than p_other^alpha's; use alpha < 1", ImproperTargetWarning, stacklevel=3)
        self.alpha = float(alpha)
        super().__init__([base, other], [1.0, -self.alpha], "negation")


class Tempered(Linear):
    """p^beta: coefficient beta."""

    def __init__(self, target, beta: float):
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be positive and finite, got {beta}")
        self.beta = float(beta)
        super().__init__([target], [self.beta], "tempered")


class Conditional(Linear):
    """Du et al. eq. 13: E(x) + sum_i w_i (E(x | y_i) - E(x)), i.e. coefficients (1 - sum_i w_i, w_1, ..., w_c) on
    (unconditional, conditional models)."""

    def __init__(self, uncond, conds: Sequence[Any], weights=None):
        if not isinstance(conds, (list, tuple)):
            raise TypeError(f"conditional(uncond, conds): conds must be a list of the conditional models (e.g. "
                            f"conditional(u, [c1, c2])), got a {type(conds).__name__}")
        conds = _check_targets(conds, "conditional")
        self.uncond = _check_targets([uncond], "conditional")[0]
        self.conds = tuple(conds)
        w = [1.0] * len(conds) if weights is None else [float(v) for v in weights]
        if len(w) != len(conds) or not all(math.isfinite(v) for v in w):
            raise ValueError(f"conditional weights must be {len(conds)} finite numbers, got {weights}")
        self.weights = tuple(w)
        super().__init__([self.uncond, *self.conds], [1.0 - sum(self.weights), *self.weights], "conditional")


def product(*targets) -> Product:
    """Product of experts prod_j p_j (Du et al. eq. 8)."""
    return Product(*targets)


def mixture(*targets, weights=None) -> Mixture:
    """Mixture sum_j w_j p_j with weights normalised to one (default uniform; Du et al. eq. 9)."""
    return Mixture(*targets, weights=weights)


def negation(base, other, alpha: float = 0.5) -> Negation:
    """p_base / p_other^alpha (Du et al. eq. 10, alpha = 0.5 in their experiments)."""
    return Negation(base, other, alpha)


def tempered(target, beta: float) -> Tempered:
    """p^beta at every noise level (beta > 1: low temperature)."""
    return Tempered(target, beta)


def conditional(uncond, conds: Sequence[Any], weights=None) -> Conditional:
    """log p(x | y_1..y_c) = log p(x) + sum_i w_i (log p(x | y_i) - log p(x)) (Du et al. eq. 13; w_i = 1 there)."""
    return Conditional(uncond, conds, weights)


class Conditioned:
    """A conditional model with its condition bound: energy(x, sigma) = E(x, sigma, cond=y) for every sample.

    `y` is a class label (an int: broadcast to `[B]` int64) or a condition vector (broadcast to `[B, c]` in x's dtype).
    The model is an energy student (energy and score) or a conditional denoiser D(x, sigma, cond) such as a teacher
    (a score field only: score = (D - x) / sigma^2, no energy; `fkdiff.targets.has_energy` says False).
    """

    def __init__(self, model: Any, cond: Any):
        self.model = model
        self.cond = cond
        k = getattr(model, "num_classes", None)  # one label checked here, once, on the host (not per evaluation)
        self._label_ok = isinstance(cond, int) and not isinstance(cond, bool) and k is not None
        if self._label_ok and not -1 <= cond < int(k):
            raise ValueError(f"class label {cond} outside [0, {k}) (or -1, the null class where the model has one)")
        for attr in ("sigma_min", "sigma_max", "sigma_data"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def _cond(self, x: Tensor):
        c = torch.as_tensor(self.cond, device=x.device)
        if c.ndim == 0:  # a class label
            labels = c.long().expand(x.shape[0])
            return checked_labels(labels) if self._label_ok else labels
        return c.to(x.dtype).reshape(1, -1).expand(x.shape[0], -1)  # a position / condition vector

    def energy(self, x, sigma):
        return self.model.energy(x, sigma, cond=self._cond(x))

    @property
    def components(self) -> tuple:
        return (self.model,)

    def score(self, x, sigma):
        if callable(getattr(self.model, "score", None)):
            return self.model.score(x, sigma, cond=self._cond(x))
        if has_energy(self.model):
            raise TypeError(f"{type(self.model).__name__} has an energy but no score(x, sigma, cond)")
        sig = as_sigma(sigma, x)  # a denoiser (a teacher): Tweedie
        with torch.no_grad():
            return score_from_denoiser(self.model(x, sig, cond=self._cond(x)), x, sig)

    def energy_and_grad(self, x, sigma):
        return self.model.energy_and_grad(x, sigma, cond=self._cond(x))

    def __call__(self, x, sigma, cond=None):
        return self.model(x, sigma, cond=self._cond(x) if cond is None else cond)


def conditioned(model: Any, y: Any) -> Conditioned:
    """`model` with its condition bound to `y` (a class label or a condition vector): a target of x alone."""
    return Conditioned(model, y)


OPERATORS = {"product": product, "mixture": mixture, "negation": negation, "tempered": tempered,
             "conditional": conditional}


def parse(expr: str, models: Mapping[str, Any]) -> Any:
    """The composition an expression such as `product(ring, tempered(strip, 2.0))` describes over `models`.

    Python call syntax restricted to the model names, numbers (also negative), lists and the `OPERATORS` with
    positional or keyword arguments; nothing else is evaluated (no attribute access, no other calls).
    """
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse composition expression {expr!r}: {e.msg}") from None

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Name):
            if node.id in models:
                return models[node.id]
            raise ValueError(f"unknown model {node.id!r} in {expr!r}; defined: {', '.join(sorted(models))}")
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in OPERATORS:
            return OPERATORS[node.func.id](*[ev(a) for a in node.args], **{k.arg: ev(k.value) for k in node.keywords})
        raise ValueError(
            f"unsupported syntax in {expr!r}: only model names, numbers, lists and "
            f"{', '.join(OPERATORS)} calls are allowed")

    return ev(tree)
