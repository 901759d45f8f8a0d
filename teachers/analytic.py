"""Analytic teachers: exact diffused densities, scores and denoisers (ground truth for tests and toy recipes).

Both families are closed under Gaussian smoothing, q_sigma = p * N(0, sigma^2 I):

Gaussian mixture p = sum_k w_k N(mu_k, C_k):
    q_sigma(x) = sum_k w_k N(x; mu_k, C_k + sigma^2 I)
    E[x_0 | x] = sum_k r_k(x) [mu_k + C_k (C_k + sigma^2 I)^{-1} (x - mu_k)],  r_k = posterior responsibilities.
With C_k = U_k diag(lam_k) U_k^T computed once, (C_k + sigma^2 I)^{-1} = U_k diag(1/(lam_k + sigma^2)) U_k^T, so a
different sigma per sample costs nothing extra.

Uniform box on [l, h] (product over dimensions i):
    q_sigma(x) = prod_i (Phi((h_i - x_i)/sigma) - Phi((l_i - x_i)/sigma)) / (h_i - l_i)
computed as a difference of normal CDFs in log space (fkdiff.special: both arguments moved to the lower tail, the
CDF ratio and the score via erfcx / the Mills ratio), stable in float64 from sigma = 1e-4 to 1e4 inside and far
outside the box.

Every method accepts x `[B, d]` and sigma as a float or a `[B]` tensor; energies are normalised (-log q_sigma).
Computation happens in the teacher's dtype (float64 by default); inputs are cast to it and outputs cast back.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fkdiff.diffusion import SIGMA_MAX, SIGMA_MIN, append_dims, as_sigma, check_batch
from fkdiff.special import box_log_mass, box_log_mass_grad

__all__ = ["GaussianMixture", "Box", "gmm_product"]

_LOG2PI = math.log(2 * math.pi)


class _Analytic:
    """Shared plumbing: input checks, dtype handling and the denoiser/score relations."""

    dim: int
    dtype: torch.dtype
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    sigma_data: float

    def _prep(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        check_batch(x, 1)
        if x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} is {self.dim}-dimensional, got x of shape {tuple(x.shape)}")
        xd = x.to(self.dtype)
        if isinstance(sigma, Tensor):
            sigma = sigma.to(device=x.device, dtype=self.dtype)
        return xd, as_sigma(sigma, xd)

    def energy(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """-log q_sigma(x), normalised. `[B]`."""
        xd, s = self._prep(x, sigma)
        return (-self._log_prob(xd, s)).to(x.dtype)

    def log_prob(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        xd, s = self._prep(x, sigma)
        return self._log_prob(xd, s).to(x.dtype)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """grad_x log q_sigma(x). `[B, d]`."""
        xd, s = self._prep(x, sigma)
        return self._score(xd, s).to(x.dtype)

    def __call__(self, x: Tensor, sigma: float | Tensor, cond=None) -> Tensor:
        """Exact denoiser E[x_0 | x_sigma = x] = x + sigma^2 score. `[B, d]`."""
        if cond is not None:
            raise ValueError(f"{type(self).__name__} is unconditional; got cond={cond!r}")
        xd, s = self._prep(x, sigma)
        return self._denoise(xd, s).to(x.dtype)

    def _denoise(self, x: Tensor, s: Tensor) -> Tensor:
        return x + append_dims(s, 2) ** 2 * self._score(x, s)


class GaussianMixture(_Analytic):
    """Mixture of full-covariance Gaussians: means `[K, d]`, covs `[K, d, d]`, weights `[K]` (normalised here)."""

    def __init__(
        self,
        means,
        covs,
        weights=None,
        *,
        dtype: torch.dtype = torch.float64,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        sigma_data: float | None = None,
        device=None,
    ):
        means = torch.as_tensor(means, dtype=dtype, device=device)
        covs = torch.as_tensor(covs, dtype=dtype, device=device)
        if means.ndim != 2:
            raise ValueError(f"means must have shape [K, d], got {tuple(means.shape)}")
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape [K, d, d] = [{k}, {d}, {d}], got {tuple(covs.shape)}")
        if weights is None:
            weights = torch.ones(k, dtype=dtype, device=device)
        weights = torch.as_tensor(weights, dtype=dtype, device=device)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape [K] = [{k}], got {tuple(weights.shape)}")
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be non-negative with a positive sum")
        if not torch.allclose(covs, covs.transpose(-1, -2), atol=1e-10 * (1 + covs.abs().max().item())):
            raise ValueError("covs must be symmetric")
        lam, u = torch.linalg.eigh(covs)
        if (lam < -1e-12 * (1 + lam.abs().max())).any():
            raise ValueError("covs must be positive semi-definite")
        self.means, self.covs = means, covs
        self.weights = weights / weights.sum()
        self.log_weights = self.weights.log()
        self.lam, self.u = lam.clamp_min(0.0), u
        self.dim, self.num_components, self.dtype = d, k, dtype
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        # sigma_data: RMS about zero, sqrt(E|x|^2 / d) (the zero-mean Gaussian scale of EDM preconditioning)
        second = self.covariance().trace() + self.mean().square().sum()
        self.sigma_data = float(sigma_data) if sigma_data is not None else float(second.div(d).sqrt())

    # -- moments and sampling ------------------------------------------------------------------
    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        m = self.mean()
        dm = self.means - m
        return (self.weights[:, None, None] * (self.covs + dm[:, :, None] * dm[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n exact samples `[n, d]` in the teacher's dtype."""
        dev = self.means.device
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype, device=dev)
        return self.means[comp] + torch.einsum("nij,nj->ni", self.u[comp], self.lam[comp].sqrt() * z)

    def smoothed(self, sigma: float) -> "GaussianMixture":
        """The mixture q_sigma = p * N(0, sigma^2 I) as a GaussianMixture."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.means.device)
        return GaussianMixture(self.means, self.covs + sigma**2 * eye, self.weights, dtype=self.dtype,
                               sigma_min=self.sigma_min, sigma_max=self.sigma_max, sigma_data=self.sigma_data)

    def component_probs(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Posterior responsibilities r_k(x) under q_sigma. `[B, K]`."""
        xd, s = self._prep(x, sigma)
        logp, _, _ = self._terms(xd, s)
        return torch.softmax(logp, dim=1).to(x.dtype)

    # -- exact diffused quantities ------------------------------------------------------------
    def _terms(self, x: Tensor, s: Tensor):
        """Per-component log w_k N(x; mu_k, C_k + s^2 I) `[B, K]`, eigen-coordinates z `[B, K, d]`, lam + s^2 `[B, K, d]`."""
        z = torch.einsum("kji,bkj->bki", self.u, x[:, None, :] - self.means[None])
        var = self.lam[None] + (s**2)[:, None, None]
        logp = self.log_weights[None] - 0.5 * ((z**2 / var).sum(-1) + var.log().sum(-1) + self.dim * _LOG2PI)
        return logp, z, var

    def _log_prob(self, x: Tensor, s: Tensor) -> Tensor:
        logp, _, _ = self._terms(x, s)
        return torch.logsumexp(logp, dim=1)

    def _score(self, x: Tensor, s: Tensor) -> Tensor:
        logp, z, var = self._terms(x, s)
        r = torch.softmax(logp, dim=1)
        comp = torch.einsum("kij,bkj->bki", self.u, -z / var)  # -(C_k + s^2)^{-1} (x - mu_k)
        return (r[..., None] * comp).sum(1)

    def _denoise(self, x: Tensor, s: Tensor) -> Tensor:
        logp, z, var = self._terms(x, s)
        r = torch.softmax(logp, dim=1)
        shrink = self.lam[None] / var  # C_k (C_k + s^2)^{-1} in the eigenbasis
        comp = self.means[None] + torch.einsum("kij,bkj->bki", self.u, shrink * z)
        return (r[..., None] * comp).sum(1)


def gmm_product(a: GaussianMixture, b: GaussianMixture, sigma: float = 0.0) -> tuple[GaussianMixture, float]:
    """The normalised product of the sigma-smoothed mixtures, and its log normaliser.

    q_a,sigma(x) q_b,sigma(x) = Z * r(x), r a GaussianMixture with K_a K_b components, using
    N(x; m1, S1) N(x; m2, S2) = N(m1; m2, S1 + S2) N(x; m, S),  S = (S1^-1 + S2^-1)^-1,  m = S (S1^-1 m1 + S2^-1 m2).
    Returns (r, log Z) with log Z = log ∫ q_a,sigma q_b,sigma dx, the exact answer an SMC log Z estimate targets.
    """
    if a.dim != b.dim:
        raise ValueError(f"dimension mismatch: {a.dim} vs {b.dim}")
    eye = torch.eye(a.dim, dtype=a.dtype, device=a.means.device)
    s1 = a.covs + sigma**2 * eye  # [Ka, d, d]
    s2 = b.covs.to(a.dtype) + sigma**2 * eye
    m1, m2 = a.means, b.means.to(a.dtype)
    ssum = s1[:, None] + s2[None]  # [Ka, Kb, d, d]
    diff = m1[:, None] - m2[None]  # [Ka, Kb, d]
    chol = torch.linalg.cholesky(ssum)
    sol = torch.cholesky_solve(diff[..., None], chol)[..., 0]
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_overlap = -0.5 * ((diff * sol).sum(-1) + logdet + a.dim * _LOG2PI)  # log N(m1; m2, S1 + S2)
    logw = a.log_weights[:, None] + b.log_weights.to(a.dtype)[None] + log_overlap
    log_z = torch.logsumexp(logw.flatten(), 0)
    # S = S1 (S1 + S2)^-1 S2 ; m = S2 (S1+S2)^-1 m1 + S1 (S1+S2)^-1 m2
    s1b = s1[:, None].expand_as(ssum)
    s2b = s2[None].expand_as(ssum)
    cov = s1b @ torch.cholesky_solve(s2b, chol)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    mean = (s2b @ torch.cholesky_solve(m1[:, None, :, None].expand(*ssum.shape[:-1], 1), chol))[..., 0] + (
        s1b @ torch.cholesky_solve(m2[None, :, :, None].expand(*ssum.shape[:-1], 1), chol)
    )[..., 0]
    k = ssum.shape[0] * ssum.shape[1]
    r = GaussianMixture(mean.reshape(k, a.dim), cov.reshape(k, a.dim, a.dim), (logw - log_z).exp().flatten(),
                        dtype=a.dtype, sigma_min=a.sigma_min, sigma_max=a.sigma_max)
    return r, float(log_z)


class Box(_Analytic):
    """Uniform distribution on the box [low, high] (per-dimension bounds, `[d]` each)."""

    def __init__(self, low, high, *, dtype: torch.dtype = torch.float64, sigma_min: float = SIGMA_MIN,
                 sigma_max: float = SIGMA_MAX, sigma_data: float | None = None, device=None):
        low = torch.as_tensor(low, dtype=dtype, device=device).reshape(-1)
        high = torch.as_tensor(high, dtype=dtype, device=device).reshape(-1)
        if low.shape != high.shape:
            raise ValueError(f"low and high must have the same shape, got {tuple(low.shape)} and {tuple(high.shape)}")
        if not (high > low).all():
            raise ValueError("need high > low in every dimension")
        self.low, self.high, self.dim, self.dtype = low, high, low.numel(), dtype
        self.log_volume = float((high - low).log().sum())
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        width = high - low
        self.sigma_data = float(sigma_data) if sigma_data is not None else float(
            ((width**2 / 12) + ((low + high) / 2) ** 2).mean().sqrt()
        )

    def mean(self) -> Tensor:
        return (self.low + self.high) / 2

    def covariance(self) -> Tensor:
        return torch.diag((self.high - self.low) ** 2 / 12)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        u = torch.rand(n, self.dim, generator=generator, dtype=self.dtype, device=self.low.device)
        return self.low + u * (self.high - self.low)

    def contains(self, x: Tensor) -> Tensor:
        """`[B]` bool: x inside the closed box."""
        return ((x >= self.low.to(x)) & (x <= self.high.to(x))).all(-1)

    def _log_prob(self, x: Tensor, s: Tensor) -> Tensor:
        return box_log_mass(x, self.low, self.high, s[:, None]).sum(-1) - self.log_volume

    def _score(self, x: Tensor, s: Tensor) -> Tensor:
        return box_log_mass_grad(x, self.low, self.high, s[:, None])
