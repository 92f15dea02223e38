"""Built-in 2-D data sets. Each is a function (n, rng) -> float64 array (n, 2)."""

from __future__ import annotations

import math

import numpy as np

from ..analytic import Gaussian, GaussianMixture

# Data sets whose exact distribution is known: tests and benchmarks compare against it.
GAUSSIAN = Gaussian(mean=[1.0, -0.5], cov=[[1.0, 0.6], [0.6, 0.5]])
GMM = GaussianMixture(
    weights=[0.5, 0.3, 0.2],
    means=[[-2.0, 0.0], [2.0, 1.0], [0.5, -2.5]],
    covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.1, 0.0], [0.0, 0.4]], [[0.2, -0.1], [-0.1, 0.15]]],
)


def _from_mixture(mixture: GaussianMixture):
    def sample(n: int, rng: np.random.Generator) -> np.ndarray:
        k = rng.choice(len(mixture.weights), size=n, p=mixture.weights.numpy())
        chol = np.linalg.cholesky(mixture.covs.numpy())
        z = rng.standard_normal((n, mixture.dim))
        return mixture.means.numpy()[k] + np.einsum("nij,nj->ni", chol[k], z)
    return sample


def moons(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """Two interleaving half circles."""
    upper = rng.random(n) < 0.5
    t = rng.random(n) * math.pi
    x = np.where(upper, np.cos(t), 1 - np.cos(t))
    y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
    return np.stack([x, y], 1) + noise * rng.standard_normal((n, 2))


def eight_gaussians(n: int, rng: np.random.Generator, radius: float = 2.0, std: float = 0.1) -> np.ndarray:
    """Eight isotropic Gaussians evenly spaced on a circle."""
    angle = rng.integers(0, 8, n) * (math.pi / 4)
    centres = radius * np.stack([np.cos(angle), np.sin(angle)], 1)
    return centres + std * rng.standard_normal((n, 2))


def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform on the 8 dark squares of a 4x4 board covering [-2, 2]^2."""
    cell = rng.integers(0, 8, n)
    row = cell // 2
    col = 2 * (cell % 2) + (row % 2)
    return np.stack([col, row], 1) - 2 + rng.random((n, 2))


def swiss_roll(n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """A 2-D spiral, scaled to about [-2.5, 2.5]^2."""
    t = 1.5 * math.pi * (1 + 2 * rng.random(n))
    return np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5 + noise * rng.standard_normal((n, 2))


TOY_SETS = {
    "moons": moons,
    "8gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "swissroll": swiss_roll,
    "gaussian": _from_mixture(GAUSSIAN),
    "gmm": _from_mixture(GMM),
}

# The known distribution of a toy set, where it has one.
TOY_TRUTH = {"gaussian": GAUSSIAN, "gmm": GMM}
