"""The closed forms that the rest of the suite measures against are themselves checked here."""

import torch

from cmkit.analytic import Gaussian, GaussianMixture
from cmkit.data.toys import GAUSSIAN, GMM


def test_gaussian_denoiser_matches_least_squares_regression():
    # E[x0 | x] is linear in x for Gaussian data; fit it by least squares on samples.
    g = torch.Generator().manual_seed(0)
    sigma = 0.8
    x0 = GAUSSIAN.sample(200_000, g)
    x = x0 + sigma * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(design, x0).solution
    probe = torch.tensor([[0.3, -1.0], [2.0, 0.5]], dtype=torch.float64)
    fitted = torch.cat([probe, torch.ones(2, 1, dtype=torch.float64)], 1) @ coef
    torch.testing.assert_close(GAUSSIAN.denoise(probe, sigma), fitted, atol=0.01, rtol=0)


def test_mixture_denoiser_is_posterior_mean_by_bayes_on_a_grid():
    # Brute-force E[x0 | x] by integrating p(x0) N(x; x0, s^2) over a fine grid.
    sigma = 0.7
    xs = torch.linspace(-5, 5, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).reshape(-1, 2)
    prior = GMM.log_prob(grid).exp()
    for point in ([0.0, 0.0], [1.5, 1.0], [-2.5, 0.4]):
        x = torch.tensor(point, dtype=torch.float64)
        like = torch.exp(-((grid - x) ** 2).sum(1) / (2 * sigma**2))
        w = prior * like
        brute = (w[:, None] * grid).sum(0) / w.sum()
        torch.testing.assert_close(GMM.denoise(x[None], sigma)[0], brute, atol=1e-4, rtol=0)


def test_gaussian_flow_solves_the_probability_flow_ode():
    # d/dsigma flow(x, s0, sigma) must equal (x_sigma - D(x_sigma, sigma)) / sigma.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, generator=g, dtype=torch.float64) * 3
    s0, s, h = 3.0, 1.2, 1e-5
    xs = GAUSSIAN.flow(x, s0, s)
    derivative = (GAUSSIAN.flow(x, s0, s + h) - GAUSSIAN.flow(x, s0, s - h)) / (2 * h)
    torch.testing.assert_close(derivative, (xs - GAUSSIAN.denoise(xs, s)) / s, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(GAUSSIAN.flow(GAUSSIAN.flow(x, s0, s), s, s0), x)  # invertible


def test_gaussian_flow_transports_marginals():
    # Pushing N(mu, S + s0^2 I) through the flow gives N(mu, S + s1^2 I).
    g = torch.Generator().manual_seed(2)
    x0 = GAUSSIAN.sample(200_000, g)
    x_hi = x0 + 5.0 * torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_lo = GAUSSIAN.flow(x_hi, 5.0, 0.3)
    expected = GAUSSIAN.covs[0] + 0.09 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(torch.cov(x_lo.T), expected, atol=0.02, rtol=0)
    torch.testing.assert_close(x_lo.mean(0), GAUSSIAN.means[0], atol=0.02, rtol=0)


def test_mixture_moments_and_sampling_agree():
    g = torch.Generator().manual_seed(3)
    x = GMM.sample(300_000, g)
    torch.testing.assert_close(x.mean(0), GMM.mean(), atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), GMM.cov(), atol=0.02, rtol=0)


def test_single_component_mixture_equals_gaussian():
    gm = GaussianMixture([1.0], [[0.5, 1.0]], [[[1.0, 0.2], [0.2, 0.3]]])
    ga = Gaussian([0.5, 1.0], [[1.0, 0.2], [0.2, 0.3]])
    x = torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(gm.denoise(x, 0.4), ga.denoise(x, 0.4))
