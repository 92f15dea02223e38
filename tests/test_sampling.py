import math

import pytest
import torch

from cmkit.data.toys import GAUSSIAN, GMM
from cmkit.noise import append_zero, karras_sigmas
from cmkit.sampling import sample_consistency, sample_euler, sample_heun


def _order(sampler, denoiser, x, exact, ns=(8, 16, 32)):
    errors = []
    for n in ns:
        sigmas = torch.linspace(2.0, 0.5, n + 1, dtype=torch.float64)
        errors.append((sampler(denoiser, x, sigmas) - exact).abs().max().item())
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


def test_heun_is_second_order_and_euler_first_order_on_gaussian():
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    exact = GAUSSIAN.flow(x, 2.0, 0.5)
    den = GAUSSIAN.as_denoiser()
    for rate in _order(sample_heun, den, x, exact):
        assert rate == pytest.approx(2.0, abs=0.2)
    for rate in _order(sample_euler, den, x, exact):
        assert rate == pytest.approx(1.0, abs=0.15)


def test_heun_is_second_order_on_gaussian_mixture():
    x = torch.randn(64, 2, dtype=torch.float64) * 2
    den = GMM.as_denoiser()
    reference = sample_heun(den, x, torch.linspace(2.0, 0.5, 2049, dtype=torch.float64))
    for rate in _order(sample_heun, den, x, reference, ns=(16, 32, 64)):
        assert rate == pytest.approx(2.0, abs=0.25)


@pytest.mark.parametrize("churn", [0.0, 10.0])
def test_heun_sampler_reproduces_gaussian_data(churn):
    # (18 steps leave a ~9% covariance error on this unit-scale Gaussian; 50 steps ~0.2%.)
    g = torch.Generator().manual_seed(0)
    sigmas = append_zero(karras_sigmas(50).double())
    x = sigmas[0] * torch.randn(100_000, 2, generator=g, dtype=torch.float64)
    out = sample_heun(GAUSSIAN.as_denoiser(), x, sigmas, s_churn=churn, s_tmin=0.05, s_tmax=50,
                      generator=g)
    torch.testing.assert_close(out.mean(0), GAUSSIAN.mean(), atol=0.03, rtol=0)
    torch.testing.assert_close(torch.cov(out.T), GAUSSIAN.cov(), atol=0.03, rtol=0)


def test_churn_uses_the_generator():
    sigmas = append_zero(karras_sigmas(10).double())
    x = sigmas[0] * torch.randn(8, 2, dtype=torch.float64)
    den = GMM.as_denoiser()
    run = lambda seed: sample_heun(den, x, sigmas, s_churn=10, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(1), run(1), rtol=0, atol=0)
    assert not torch.allclose(run(1), run(2))
    torch.testing.assert_close(sample_heun(den, x, sigmas), sample_heun(den, x, sigmas), rtol=0, atol=0)


def test_heun_costs_2n_minus_1_evaluations():
    calls = []

    def counting(x, sigma, class_labels=None):
        calls.append(float(sigma))
        return x * 0

    sample_heun(counting, torch.ones(2, 2), append_zero(karras_sigmas(18)))
    assert len(calls) == 35


def test_consistency_sampler_with_ideal_model_gives_data_distribution():
    g = torch.Generator().manual_seed(0)
    f = lambda x, s, c=None: GAUSSIAN.consistency(x, s, 0.002)
    for sigmas in ([80.0], [80.0, 0.8], [80.0, 2.0, 0.3]):
        x = 80.0 * torch.randn(100_000, 2, generator=g, dtype=torch.float64)
        out = sample_consistency(f, x, torch.tensor(sigmas, dtype=torch.float64), generator=g)
        torch.testing.assert_close(out.mean(0), GAUSSIAN.mean(), atol=0.03, rtol=0)
        torch.testing.assert_close(torch.cov(out.T), GAUSSIAN.cov(), atol=0.05, rtol=0)


def test_consistency_sampler_renoises_by_sqrt_sigma2_minus_sigma_min2():
    # With f(x, s) = x the output is x + sum_i sqrt(s_i^2 - smin^2) z_i: its variance is exact.
    g = torch.Generator().manual_seed(0)
    sigmas, smin = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 0.9
    x = 3.0 * torch.randn(400_000, 1, generator=g, dtype=torch.float64)
    out = sample_consistency(lambda x, s, c=None: x, x, sigmas, sigma_min=smin, generator=g)
    expected = 9.0 + (4.0 - smin**2) + (1.0 - smin**2)
    assert out.var().item() == pytest.approx(expected, rel=0.01)


def test_consistency_sampler_calls_model_once_per_level_and_is_seeded():
    levels = []
    f = lambda x, s, c=None: (levels.append(float(s)), x * 0.5)[1]
    x = torch.randn(4, 2)
    a = sample_consistency(f, x, torch.tensor([80.0, 0.8, 0.2]), generator=torch.Generator().manual_seed(3))
    assert levels == pytest.approx([80.0, 0.8, 0.2])
    b = sample_consistency(f, x, torch.tensor([80.0, 0.8, 0.2]), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", [sample_consistency, sample_heun, sample_euler])
@pytest.mark.parametrize("bad", [[1.0, 2.0], [1.0, 1.0], [-1.0, -2.0], [0.0, 0.0]])
def test_samplers_reject_bad_sigmas(sampler, bad):
    with pytest.raises(ValueError):
        sampler(lambda x, s, c=None: x, torch.zeros(1, 2), torch.tensor(bad))
