import math

import pytest
import torch

from cmkit.data.toys import GAUSSIAN, GMM
from cmkit.noise import NoiseConfig, karras_sigmas
from cmkit.objectives import (ConsistencyDistillationLoss, ConsistencyTrainingLoss, EDMLoss, PseudoHuber,
                              ct_num_levels, ct_target_rate, l1, l2, teacher_step)
from cmkit.analytic import Gaussian
from cmkit.sampling import sample_heun
from cmkit.training import ema_update


def test_edm_loss_of_ideal_denoiser_is_one_per_dimension():
    # For x0 ~ N(0, sd^2 I), lambda(sigma) * posterior variance = 1 at every sigma: the weighting
    # and the lognormal sigma sampling together give an expected loss of exactly 1.
    sd = 0.5
    data = Gaussian([0.0, 0.0, 0.0], torch.eye(3) * sd**2)
    g = torch.Generator().manual_seed(0)
    x0 = data.sample(200_000, g).float()
    loss, _ = EDMLoss(sd)(data.as_denoiser(), x0, generator=g)
    assert loss.mean().item() == pytest.approx(1.0, rel=0.01)
    worse, _ = EDMLoss(sd)(lambda x, s, c=None: data.denoise(x, s) * 0.97, x0, generator=g)
    assert worse.mean().item() > 1.02


def test_edm_loss_samples_lognormal_sigma():
    seen = []
    EDMLoss(0.5, p_mean=-1.2, p_std=1.2)(lambda x, s, c=None: (seen.append(s), x)[1], torch.zeros(100_000, 1),
                                         generator=torch.Generator().manual_seed(0))
    ln = seen[0].log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.02)
    assert ln.std().item() == pytest.approx(1.2, abs=0.02)


@pytest.mark.parametrize("mixture", [GAUSSIAN, GMM], ids=["gaussian", "gmm"])
def test_cd_heun_step_matches_exact_flow_to_third_order(mixture):
    # One Heun step has local error O(h^3): halving the step divides it by about 8.
    g = torch.Generator().manual_seed(0)
    x0 = mixture.sample(512, g)
    den = mixture.as_denoiser()
    errors = {"heun": [], "euler": []}
    for h in (0.1, 0.05, 0.025):
        s_hi, s_lo = torch.full((512,), 1.0 + h, dtype=torch.float64), torch.full((512,), 1.0, dtype=torch.float64)
        x_hi = x0 + s_hi[:, None] * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        exact = (mixture.flow(x_hi, s_hi, s_lo) if hasattr(mixture, "flow")
                 else sample_heun(den, x_hi, torch.linspace(1.0 + h, 1.0, 257, dtype=torch.float64)))
        for solver in errors:
            errors[solver].append((teacher_step(den, x_hi, s_hi, s_lo, solver) - exact).norm(dim=1).mean().item())
    heun_rates = [math.log2(a / b) for a, b in zip(errors["heun"], errors["heun"][1:])]
    euler_rates = [math.log2(a / b) for a, b in zip(errors["euler"], errors["euler"][1:])]
    assert all(r > 2.6 for r in heun_rates), heun_rates
    assert all(1.6 < r < 2.4 for r in euler_rates), euler_rates
    assert errors["heun"][-1] < 1e-3


def test_cd_loss_vanishes_for_the_ideal_consistency_function():
    # With the exact flow map as student and target, CD's only error is the Heun step's.
    noise = NoiseConfig()
    f = lambda x, s, c=None: GAUSSIAN.consistency(x, s, noise.sigma_min)
    g = torch.Generator().manual_seed(0)
    x0 = GAUSSIAN.sample(4096, g)
    for levels, bound in ((18, 1e-3), (80, 1e-5)):
        loss, _ = ConsistencyDistillationLoss(GAUSSIAN.as_denoiser(), noise, num_levels=levels)(
            f, x0, target=f, generator=g)
        assert loss.mean().item() < bound
    # ... and a student that is wrong by 1% of its output is far from zero loss.
    wrong = lambda x, s, c=None: f(x, s) * 1.01
    loss, _ = ConsistencyDistillationLoss(GAUSSIAN.as_denoiser(), noise)(wrong, x0, target=f, generator=g)
    assert loss.mean().item() > 1e-4


def test_cd_draws_adjacent_grid_levels():
    pairs = []

    def spy(x, s, c=None):
        pairs.append(s)
        return x

    loss = ConsistencyDistillationLoss(lambda x, s, c=None: x, NoiseConfig(), num_levels=10)
    loss(spy, torch.zeros(2000, 2), target=spy, generator=torch.Generator().manual_seed(0))
    target, online = pairs  # the target pass runs first, under no_grad
    grid = karras_sigmas(10)
    idx = (online[:, None] == grid[None]).float().argmax(1)
    torch.testing.assert_close(target, grid[idx + 1])
    assert set(idx.tolist()) == set(range(9))  # every n in {0..N-2}, never N-1


def test_ct_uses_the_same_noise_for_both_levels():
    seen = {}

    def spy(name):
        def f(x, s, c=None):
            seen[name] = (x, s)
            return x
        return f

    x0 = torch.randn(64, 2)
    ConsistencyTrainingLoss(NoiseConfig(), total_steps=10)(spy("online"), x0, step=5, target=spy("target"),
                                                           generator=torch.Generator().manual_seed(0))
    (x_hi, s_hi), (x_lo, s_lo) = seen["online"], seen["target"]
    torch.testing.assert_close((x_hi - x0) / s_hi[:, None], (x_lo - x0) / s_lo[:, None], rtol=1e-4, atol=1e-4)


def test_ct_curricula_match_formulas():
    # N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1; mu(k) = exp(s0 ln mu0 / N(k)).
    K, s0, s1, mu0 = 1000, 2, 150, 0.9
    assert ct_num_levels(0, K, s0, s1) == 2
    assert ct_num_levels(K, K, s0, s1) == 151
    assert ct_num_levels(500, K, s0, s1) == 107  # sqrt(0.5 * 22797 + 4) = 106.78
    assert ct_num_levels(100, K, s0, s1) == 48  # ceil(47.79 - 1) + 1
    assert ct_target_rate(2, s0, mu0) == pytest.approx(0.9)
    assert ct_target_rate(107, s0, mu0) == pytest.approx(math.exp(2 * math.log(0.9) / 107))
    loss = ConsistencyTrainingLoss(NoiseConfig(), total_steps=K, s0=s0, s1=s1, mu0=mu0)
    assert [loss.num_levels(k) for k in (0, 500, K)] == [2, 107, 151]
    levels = [loss.num_levels(k) for k in range(0, K + 1, 10)]
    assert levels == sorted(levels)


def test_distances():
    a, b = torch.zeros(3, 4), torch.ones(3, 4) * 2
    torch.testing.assert_close(l2(a, b), torch.full((3,), 4.0))
    torch.testing.assert_close(l1(a, b), torch.full((3,), 2.0))
    huber = PseudoHuber()
    c = 0.00054 * 2  # sqrt(dim = 4)
    torch.testing.assert_close(huber(a, b), torch.full((3,), math.sqrt(16 + c**2) - c))
    tiny = torch.full((1, 4), 1e-5)  # quadratic regime: ~ ||d||^2 / (2c)
    assert huber(torch.zeros(1, 4), tiny).item() == pytest.approx(4e-10 / (2 * c), rel=1e-3)


def test_target_ema_update():
    online, target = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    ema_update(target, online, 0.5)
    torch.testing.assert_close(target.weight, (before + online.weight) / 2)
    ema_update(target, online, 0.0)
    torch.testing.assert_close(target.weight, online.weight)
