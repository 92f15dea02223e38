"""Gaussian and Gaussian-mixture data with closed-form denoisers and flow maps.

These are the ground truth cmkit's tests and benchmarks measure against: for x_sigma = x0 +
sigma z with x0 ~ sum_k w_k N(mu_k, S_k), the ideal denoiser E[x0 | x_sigma] is closed form; for a
single Gaussian so is the probability-flow ODE map between any two noise levels, and hence the
ideal consistency function.
"""

from __future__ import annotations

import torch

from .condition import as_condition
from .noise import broadcast_to_batch


class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]) in D dimensions (computations in float64)."""

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        K, D = self.means.shape
        if self.weights.shape != (K,) or self.covs.shape != (K, D, D):
            raise ValueError("weights (K,), means (K, D) and covs (K, D, D) disagree")
        if abs(float(self.weights.sum()) - 1) > 1e-6:
            raise ValueError("mixture weights must sum to 1")
        self._chol = torch.linalg.cholesky(self.covs)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        centred = self.means - mu
        return torch.einsum("k,kij->ij", self.weights, self.covs + centred[:, :, None] * centred[:, None, :])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], z)

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        """log density of x_sigma (sigma = 0: of the data itself)."""
        x = x.to(torch.float64)
        covs = self.covs + sigma**2 * torch.eye(self.dim, dtype=torch.float64)
        comp = torch.distributions.MultivariateNormal(self.means, covariance_matrix=covs)
        return torch.logsumexp(comp.log_prob(x[:, None, :]) + self.weights.log(), dim=1)

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The ideal denoiser E[x0 | x_sigma = x] for x of shape (B, D), sigma scalar or (B,)."""
        dtype = x.dtype
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        eye = torch.eye(self.dim, dtype=torch.float64)
        covs = self.covs[None] + sigma[:, None, None, None] ** 2 * eye  # (B, K, D, D)
        diff = x[:, None, :] - self.means[None]  # (B, K, D)
        sol = torch.linalg.solve(covs, diff[..., None])[..., 0]  # (S_k + s^2 I)^-1 (x - mu_k)
        logdet = torch.linalg.slogdet(covs)[1]
        logits = self.weights.log() - 0.5 * (diff * sol).sum(-1) - 0.5 * logdet
        resp = torch.softmax(logits, dim=1)  # p(k | x_sigma)
        post = self.means[None] + torch.einsum("kij,bkj->bki", self.covs, sol)
        return (resp[..., None] * post).sum(1).to(dtype)

    def component(self, k: int) -> "Gaussian":
        return Gaussian(self.means[k], self.covs[k])

    def as_denoiser(self):
        """A callable D(x, sigma, condition=None) for the samplers and the CD objective."""
        return AnalyticDenoiser(self)

    def as_class_denoiser(self):
        """The ideal class-conditional denoiser with one class per component: label k gives
        component k's denoiser, the null label K (or None) the whole mixture's."""
        return AnalyticClassDenoiser(self)


class AnalyticDenoiser(torch.nn.Module):
    """Wraps a GaussianMixture's ideal denoiser as a module with the denoiser signature."""

    def __init__(self, mixture: GaussianMixture):
        super().__init__()
        self.mixture = mixture

    def forward(self, x, sigma, condition=None):
        return self.mixture.denoise(x, sigma)


class AnalyticClassDenoiser(AnalyticDenoiser):
    @property
    def num_classes(self) -> int:
        return len(self.mixture.weights)

    def forward(self, x, sigma, condition=None):
        K = self.num_classes
        out = self.mixture.denoise(x, sigma)
        class_labels = as_condition(condition).labels
        if class_labels is None:
            return out
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        for k in range(K):
            rows = class_labels == k
            if bool(rows.any()):
                out[rows] = self.mixture.component(k).denoise(x[rows], sigma[rows])
        return out


class Gaussian(GaussianMixture):
    """N(mean, cov): adds the exact PF-ODE flow map and the ideal consistency function.

    With cov = U diag(lam) U^T, the ODE dx/dsigma = (x - D(x, sigma))/sigma decouples in the
    eigenbasis: d y/d sigma = sigma y / (lam + sigma^2), so y(s) = y(s0) sqrt((lam + s^2)/(lam + s0^2)).
    """

    def __init__(self, mean, cov):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        super().__init__(torch.ones(1), mean[None], cov[None])
        self.lam, self.U = torch.linalg.eigh(cov)

    def flow(self, x: torch.Tensor, sigma_from, sigma_to) -> torch.Tensor:
        """The exact probability-flow ODE map from noise level sigma_from to sigma_to."""
        dtype = x.dtype
        x = x.to(torch.float64)
        s0 = broadcast_to_batch(torch.as_tensor(sigma_from, dtype=torch.float64), x)
        s1 = broadcast_to_batch(torch.as_tensor(sigma_to, dtype=torch.float64), x)
        y = (x - self.means[0]) @ self.U
        y = y * ((self.lam + s1**2) / (self.lam + s0**2)).sqrt()
        return (self.means[0] + y @ self.U.T).to(dtype)

    def consistency(self, x: torch.Tensor, sigma, sigma_min: float) -> torch.Tensor:
        """The ideal consistency function: the flow from sigma to sigma_min."""
        return self.flow(x, sigma, sigma_min)
