import math

import numpy as np
import pytest

from cmkit.metrics import energy_distance, sliced_wasserstein
from cmkit.metrics.vectors import wasserstein_1d
import torch


def test_sliced_w1_of_a_shift_is_two_over_pi_times_its_length_in_2d():
    # Projecting a shift v on a uniform unit direction gives E|<theta, v>| = |v| * 2/pi in 2-D.
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 2))
    v = np.array([0.6, -0.8])
    sw = sliced_wasserstein(a, a + v, n_projections=4000)
    assert sw == pytest.approx(2 / math.pi, rel=0.03)
    assert sliced_wasserstein(a, a) == 0.0


def test_w1_1d_unequal_sizes_matches_cdf_integral():
    u = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5], [2.5]], dtype=torch.float64)
    # integral |F_u - F_v| over x, computed by hand: quantile grid 1/3, 1/2, 2/3, 1
    expected = (1 / 3) * 0.5 + (1 / 6) * 0.5 + (1 / 6) * 1.5 + (1 / 3) * 0.5
    assert wasserstein_1d(u, v).item() == pytest.approx(expected)
    # a one-point mass against a uniform grid: W1 = mean absolute deviation
    w = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None]
    assert wasserstein_1d(w, torch.zeros(1, 1, dtype=torch.float64)).item() == pytest.approx(0.5)


def test_energy_distance_of_1d_gaussians_matches_closed_form():
    # For N(0,1) vs N(d,1): ED = 2 E|X - Y| - 2 E|X - X'| with E|N(m, 2)| closed form.
    rng = np.random.default_rng(1)
    d = 1.0
    a, b = rng.standard_normal((6000, 1)), rng.standard_normal((6000, 1)) + d
    s = math.sqrt(2)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-d**2 / (2 * s**2)) + d * math.erf(d / (s * math.sqrt(2)))
    e_xx = s * math.sqrt(2 / math.pi)
    assert energy_distance(a, b) == pytest.approx(2 * e_xy - 2 * e_xx, abs=0.02)
    same = energy_distance(a, rng.standard_normal((6000, 1)))
    assert abs(same) < 0.01
