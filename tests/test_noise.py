import math

import pytest
import torch

from cmkit.nets import ResidualMLP
from cmkit.noise import (NoiseConfig, c_noise_edm, c_noise_openai, consistency_scalings, edm_scalings,
                         flow_from_sigma, flow_state, karras_sigmas, parse_sigmas, sigma_from_flow,
                         sigma_from_trigflow, sigma_state_from_flow, sigma_state_from_trigflow,
                         trigflow_from_sigma, trigflow_state)
from cmkit.precond import ConsistencyFunction, EDMDenoiser


def test_karras_grid_matches_formula():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    sig = karras_sigmas(n, smin, smax, rho).double()
    for i in (0, 5, 17):
        expected = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert sig[i].item() == pytest.approx(expected, rel=1e-6)
    assert sig[0] == pytest.approx(smax) and sig[-1] == pytest.approx(smin)
    assert (sig[1:] < sig[:-1]).all()


def test_karras_grid_rejects_one_level():
    with pytest.raises(ValueError):
        karras_sigmas(1)


class ShapeAgnostic(torch.nn.Module):
    """A random backbone for any input shape: F = tanh(conv-free mixing) + time."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(()))

    def forward(self, x, c_noise, class_labels=None):
        return torch.tanh(self.w * x + c_noise.reshape(-1, *([1] * (x.ndim - 1)))) * 3.7


@pytest.mark.parametrize("shape", [(7, 2), (3, 5), (2, 3, 4, 4), (4, 1, 6)])
def test_consistency_boundary_condition_is_exact(shape):
    noise = NoiseConfig()
    backbone = ResidualMLP(shape[1]) if len(shape) == 2 else ShapeAgnostic()
    f = ConsistencyFunction(backbone, noise)
    x = torch.randn(shape) * 10
    torch.testing.assert_close(f(x, noise.sigma_min), x, rtol=0, atol=0)
    per_sample = torch.full((shape[0],), noise.sigma_min)
    torch.testing.assert_close(f(x, per_sample), x, rtol=0, atol=0)
    assert not torch.allclose(f(x, 1.0), x)  # the network does act away from the boundary


def test_edm_scalings_give_unit_variance_input_and_target():
    # x0 ~ N(0, sd^2), x = x0 + sigma z: Var(c_in x) = 1 and the effective training target
    # (x0 - c_skip x) / c_out has unit variance, at every sigma (EDM's design criteria).
    sd = 0.5
    g = torch.Generator().manual_seed(0)
    x0 = sd * torch.randn(400_000, generator=g, dtype=torch.float64)
    z = torch.randn(400_000, generator=g, dtype=torch.float64)
    for sigma in (0.01, 0.5, 3.0, 80.0):
        s = torch.tensor(sigma, dtype=torch.float64)
        c_skip, c_out, c_in = edm_scalings(s, sd)
        x = x0 + s * z
        assert (c_in * x).var().item() == pytest.approx(1.0, rel=0.01)
        assert ((x0 - c_skip * x) / c_out).var().item() == pytest.approx(1.0, rel=0.01)


def test_consistency_scalings_approach_edm_far_from_sigma_min():
    s = torch.tensor([5.0, 80.0])
    for a, b in zip(consistency_scalings(s, 0.5, 0.002), edm_scalings(s, 0.5)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    c_skip, c_out, _ = consistency_scalings(torch.tensor(0.002), 0.5, 0.002)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0


def test_c_noise_conventions():
    s = torch.tensor([0.002, 1.0, 80.0])
    torch.testing.assert_close(c_noise_edm(s), s.log() / 4)
    torch.testing.assert_close(c_noise_openai(s), 250 * s.log())
    assert c_noise_openai(torch.tensor(1.0)).item() == 0.0


def test_trigflow_conversion_matches_its_forward_process():
    # x_t = cos t x0 + sin t z' (z' ~ N(0, sd^2)) must equal cos t * (x0 + sigma z) with
    # sigma = sd tan t and z = z'/sd, sample by sample.
    sd = 0.5
    t = torch.tensor([0.1, 0.7, 1.3, 1.55])
    x0, z = torch.randn(4, 3), torch.randn(4, 3)
    x_t = torch.cos(t)[:, None] * x0 + torch.sin(t)[:, None] * (sd * z)
    sigma = sigma_from_trigflow(t, sd)
    x_sigma = x0 + sigma[:, None] * z
    torch.testing.assert_close(trigflow_state(x_sigma, t), x_t)
    torch.testing.assert_close(sigma_state_from_trigflow(x_t, t), x_sigma)
    torch.testing.assert_close(trigflow_from_sigma(sigma, sd), t)
    assert sigma_from_trigflow(torch.tensor(math.pi / 4), sd).item() == pytest.approx(sd)


def test_flow_matching_conversion_matches_its_forward_process():
    # z_t = (1 - t) x0 + t eps must equal (1 - t)(x0 + sigma eps) with sigma = t / (1 - t).
    t = torch.tensor([0.01, 0.3, 0.5, 0.95])
    x0, eps = torch.randn(4, 3), torch.randn(4, 3)
    z_t = (1 - t)[:, None] * x0 + t[:, None] * eps
    sigma = sigma_from_flow(t)
    x_sigma = x0 + sigma[:, None] * eps
    torch.testing.assert_close(flow_state(x_sigma, t), z_t)
    torch.testing.assert_close(sigma_state_from_flow(z_t, t), x_sigma)
    torch.testing.assert_close(flow_from_sigma(sigma), t)
    assert sigma_from_flow(torch.tensor(0.5)).item() == 1.0


def test_parse_sigmas():
    assert parse_sigmas("80, 0.8") == [80.0, 0.8]
    for bad in ("", "1,2", "80,-1", "a,b", "80,nan"):
        with pytest.raises(ValueError):
            parse_sigmas(bad)


def test_denoiser_accepts_scalar_and_per_sample_sigma():
    d = EDMDenoiser(ResidualMLP(3))
    x = torch.randn(5, 3)
    torch.testing.assert_close(d(x, 0.7), d(x, torch.full((5,), 0.7)))
