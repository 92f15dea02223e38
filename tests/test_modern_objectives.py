"""iCT, ECT, sCT/sCD and MeanFlow: each loss on a fixed batch against a few lines of plain torch,
the curricula, JVPs against finite differences, and the closed forms of Gaussian data."""

import math

import pytest
import torch
from torch import nn

from cmkit.analytic import Gaussian
from cmkit.nets import ResidualMLP
from cmkit.noise import NoiseConfig
from cmkit.objectives import (ContinuousConsistencyLoss, EasyConsistencyTuningLoss, ImprovedConsistencyTrainingLoss,
                              MeanFlowLoss, ect_r, ict_num_levels, lognormal_pair_probs, teacher_velocity, trigflow_F)
from cmkit.objectives.scm import jvp_F
from cmkit.objectives.meanflow import meanflow_jvp
from cmkit.precond import ConsistencyFunction, EDMDenoiser, MeanFlowModel

NOISE = NoiseConfig()
SD = NOISE.sigma_data


class ScaleNet(nn.Module):
    """f(x, sigma) = x * a(sigma) + b: simple, deterministic, differentiable."""

    def forward(self, x, sigma, class_labels=None):
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        return x / (1 + 0.3 * s) + 0.1 * torch.sin(s)


# ---------------------------------------------------------------------------------------------- iCT


def test_ict_curriculum_doubles_and_guards_short_runs():
    # K' = floor(8000 / (log2(128) + 1)) = 1000
    assert [ict_num_levels(k, 8000) for k in (0, 999, 1000, 2000, 6999, 7000, 7999)] == \
        [11, 11, 21, 41, 641, 1281, 1281]
    assert [ict_num_levels(k, 3) for k in (0, 1, 2)] == [11, 21, 41]  # K' >= 1
    assert ict_num_levels(10**6, 100) == 1281


def test_ict_lognormal_pairs():
    sigmas = NOISE.karras(41)
    probs = lognormal_pair_probs(sigmas, -1.1, 2.0)
    cdf = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)))  # noqa: E731
    manual = torch.tensor([cdf(sigmas[i]) - cdf(sigmas[i + 1]) for i in range(40)])
    torch.testing.assert_close(probs, (manual / manual.sum()).float(), rtol=1e-5, atol=1e-7)
    # the most likely pair sits around exp(-1.1) = 0.33 (a sign error would put it near 3)
    best = int(probs.argmax())
    assert 0.1 < float(sigmas[best]) < 1.0


def test_ict_loss_matches_a_plain_computation():
    torch.manual_seed(0)
    x0 = torch.randn(64, 3)
    loss_fn = ImprovedConsistencyTrainingLoss(NOISE, total_steps=8000)
    net = ScaleNet()
    loss, logs = loss_fn(net, x0, step=1500, generator=torch.Generator().manual_seed(5))
    assert logs["num_levels"] == 21
    # by hand, replaying the same draws
    g = torch.Generator().manual_seed(5)
    N = 21
    i = torch.arange(N, dtype=torch.float64)
    rho = NOISE.rho
    sig = (NOISE.sigma_max ** (1 / rho) + i / (N - 1) * (NOISE.sigma_min ** (1 / rho) - NOISE.sigma_max ** (1 / rho))) ** rho
    cdf = torch.erf((sig.log() + 1.1) / (math.sqrt(2) * 2.0))
    p = (cdf[:-1] - cdf[1:]).float()
    n = torch.multinomial(p / p.sum(), 64, replacement=True, generator=g)
    z = torch.randn(64, 3, generator=g)
    hi, lo = sig[n].float(), sig[n + 1].float()
    online = net(x0 + hi[:, None] * z, hi)
    target = net(x0 + lo[:, None] * z, lo)
    c = 0.00054 * math.sqrt(3)
    expected = ((online - target).pow(2).sum(1) + c**2).sqrt() - c
    torch.testing.assert_close(loss, expected / (hi - lo), rtol=1e-4, atol=1e-6)


def test_ict_target_shares_dropout_masks(monkeypatch):
    """With dropout and sigma_hi == sigma_lo forced, the online and target passes are the same
    function: the distance is exactly 0 only if both passes drew the same masks."""
    torch.manual_seed(0)
    net = ConsistencyFunction(ResidualMLP(2, width=32, depth=2, emb_dim=16, dropout=0.5), NOISE).train()
    loss_fn = ImprovedConsistencyTrainingLoss(NOISE, total_steps=10)
    loss_fn.lower = lambda x_hi, x0, z, hi, lo, *cond: x_hi
    loss_fn.num_levels = lambda step: 2
    sigmas_same = torch.tensor([1.0, 1.0])
    loss_fn.noise = type("N", (), {"karras": staticmethod(lambda n: sigmas_same), "sigma_min": 0.002})()
    loss_fn.weighting = lambda hi, lo: torch.ones_like(hi)
    loss_fn.sample_pairs = lambda sigmas, batch, gen: torch.zeros(batch, dtype=torch.long)
    x0 = torch.randn(16, 2)
    loss, _ = loss_fn(net, x0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(loss, torch.zeros_like(loss), atol=1e-6)
    from cmkit.objectives import rng
    monkeypatch.setattr(rng.SharedRNG, "replay", lambda self: None)  # independent masks
    loss, _ = loss_fn(net, x0, generator=torch.Generator().manual_seed(0))
    assert loss.min() > 1e-4


# ---------------------------------------------------------------------------------------------- ECT


def test_ect_r_schedule():
    t = torch.tensor([0.01, 0.5, 2.0, 10.0, 80.0])
    for stage in (0, 1, 3):
        n = 1 + 8 * torch.sigmoid(-t)
        torch.testing.assert_close(ect_r(t, stage), (t * (1 - n / 2 ** (stage + 1))).clamp(min=0))
    r0, r3 = ect_r(t, 0), ect_r(t, 3)
    assert r0[0] == 0 and (r3 <= t).all() and (r3 > r0).all()  # later stages: r closer to t
    assert ((t - ect_r(t, 6)) / t <= 5 / 128 + 1e-6).all()  # n(t) <= 1 + 8 * 0.5


def test_ect_loss_matches_a_plain_computation_and_r0_targets_data():
    torch.manual_seed(0)
    x0 = torch.randn(256, 2)
    loss_fn = EasyConsistencyTuningLoss(NOISE, total_steps=80, stages=8)
    assert [loss_fn.stage(k) for k in (0, 9, 10, 79, 500)] == [0, 0, 1, 7, 7]
    net = ScaleNet()
    loss, logs = loss_fn(net, x0, step=25, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = (-1.1 + 2.0 * torch.randn(256, generator=g)).exp().clamp(0.002, 80.0)
    n = 1 + 8 * torch.sigmoid(-t)
    r = (t * (1 - n / 2 ** 3)).clamp(min=0)
    r = torch.where(r < 0.002, torch.zeros_like(r), r)
    z = torch.randn(256, 2, generator=g)
    target = torch.where((r > 0)[:, None], net(x0 + r[:, None] * z, r.clamp(min=0.002)), x0)
    expected = (net(x0 + t[:, None] * z, t) - target).norm(dim=1) / (t - r)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert 0 < logs["r_zero"] < 1 and logs["stage"] == 2


# ---------------------------------------------------------------------------------------------- sCM


def _mlp_model(dropout=0.0):
    torch.manual_seed(0)
    return EDMDenoiser(ResidualMLP(2, width=32, depth=2, emb_dim=16, dropout=dropout), NOISE)


def test_jvp_equals_central_finite_difference():
    model = _mlp_model().double()
    F = trigflow_F(model)
    u, t = torch.randn(8, 2, dtype=torch.float64), torch.rand(8, dtype=torch.float64) * 1.4 + 0.05
    du = torch.randn(8, 2, dtype=torch.float64)
    out, auto = jvp_F(F, u, t, du, "autograd")
    out_fd, fd = jvp_F(F, u, t, du, "finite_difference", eps=1e-5)
    torch.testing.assert_close(out, out_fd)
    torch.testing.assert_close(auto, fd, rtol=1e-6, atol=1e-7)


class AnalyticEDMBackbone(nn.Module):
    """F_edm of the exact Gaussian denoiser: the backbone whose EDMDenoiser is exact."""

    def __init__(self, data: Gaussian):
        super().__init__()
        self.data = data

    def forward(self, u, c_noise, class_labels=None):
        sigma = (4 * c_noise).exp()  # edm c_noise = ln(sigma) / 4
        c_in = 1 / (sigma**2 + SD**2).sqrt()
        c_skip = SD**2 / (sigma**2 + SD**2)
        c_out = sigma * SD / (sigma**2 + SD**2).sqrt()
        x = u / c_in[:, None]
        return (self.data.denoise(x, sigma) - c_skip[:, None] * x) / c_out[:, None]


GAUSS = Gaussian([0.3, -0.2], [[0.2, 0.05], [0.05, 0.1]])


def test_sct_tangent_is_cos_t_times_df_dt_along_the_exact_ode():
    model = EDMDenoiser(AnalyticEDMBackbone(GAUSS), NOISE).double()
    g = torch.Generator().manual_seed(0)
    x0 = GAUSS.sample(16, g)
    t = torch.rand(16, generator=g, dtype=torch.float64) * 1.2 + 0.2
    x_t = t.cos()[:, None] * x0 + t.sin()[:, None] * SD * torch.randn(16, 2, generator=g, dtype=torch.float64)
    loss_fn = ContinuousConsistencyLoss(NOISE)
    v = teacher_velocity(model, x_t, t, SD)  # the exact ODE velocity (the denoiser is exact)
    F_minus, dF = jvp_F(trigflow_F(model), x_t / SD, t, v / SD)
    tangent = loss_fn.tangent(F_minus, dF, x_t, v, t, warmup=1.0)

    def along_ode(h):  # x_{t+h} on the exact trajectory through x_t, and f there
        s_from, s_to = SD * t.tan(), SD * (t + h).tan()
        x_sigma = GAUSS.flow(x_t / t.cos()[:, None], s_from, s_to)
        return (t + h).cos()[:, None] * x_sigma, t + h

    def f(x, tt):  # TrigFlow f(x_t, t) = D(x_t / cos t, sd tan t)
        return model(x / tt.cos()[:, None], SD * tt.tan())
    h = 1e-5
    df_dt = (f(*along_ode(h)) - f(*along_ode(-h))) / (2 * h)
    torch.testing.assert_close(tangent, t.cos()[:, None] * df_dt, rtol=1e-5, atol=1e-6)
    assert df_dt.abs().max() > 1e-3  # f here is the exact denoiser, which moves along the ODE
    # and the teacher velocity is the derivative of x_t along that trajectory
    dx = (along_ode(h)[0] - along_ode(-h)[0]) / (2 * h)
    torch.testing.assert_close(v, dx, rtol=1e-5, atol=1e-6)


def test_sct_loss_matches_a_plain_computation():
    model = _mlp_model()
    loss_fn = ContinuousConsistencyLoss(NOISE, tangent_warmup=100, adaptive_weighting=True)
    with torch.no_grad():
        loss_fn.weight.net[-1].bias.fill_(0.3)  # a non-trivial w(t)
    x0 = torch.randn(32, 2) * SD
    loss, logs = loss_fn(model, x0, step=40, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    sigma = (-1.0 + 1.4 * torch.randn(32, generator=g)).exp().clamp(0.002, 80)
    t = torch.atan(sigma / SD)
    z = SD * torch.randn(32, 2, generator=g)
    c, s = t.cos()[:, None], t.sin()[:, None]
    x_t = c * x0 + s * z
    v = c * z - s * x0

    def F(u, tt):  # F_trig = -F_edm(u, ln(sd tan t) / 4)
        return -model.backbone(u, (SD * tt.tan()).log() / 4)
    Fm, dF = torch.func.jvp(F, (x_t / SD, t), (v / SD, torch.ones_like(t)))
    gt = -c**2 * (SD * Fm - v) - 0.4 * c * s * (x_t + SD * dF)
    gt = gt / (gt.norm(dim=1, keepdim=True) + 0.1)
    w = torch.full((32,), 0.3)
    expected = w.exp() / 2 * gt.pow(2).sum(1) - w
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert logs["tangent_warmup"] == pytest.approx(0.4)
    # its gradient moves F toward F- + g: one small step lowers ||F - (F- + g)||
    loss.mean().backward()
    assert model.backbone.out.weight.grad.abs().sum() > 0 and loss_fn.weight.net[-1].bias.grad is not None


# ----------------------------------------------------------------------------------------- MeanFlow


class ExactMeanVelocity(nn.Module):
    """u(z, r, t) = (z_t - z_r) / (t - r) along the exact flow of Gaussian data (flow time)."""

    def __init__(self, data):
        super().__init__()
        self.data = data

    def forward(self, z, times, class_labels=None):
        t, r = times[:, 0], times[:, 0] - times[:, 1]
        sig = lambda tt: tt / (1 - tt)  # noqa: E731
        z_r = (1 - r)[:, None] * self.data.flow(z / (1 - t)[:, None], sig(t), sig(r))
        return (z - z_r) / (t - r)[:, None]


def test_meanflow_identity_holds_for_the_exact_average_velocity():
    model = MeanFlowModel(ExactMeanVelocity(GAUSS), NOISE)
    g = torch.Generator().manual_seed(0)
    t = torch.rand(12, generator=g, dtype=torch.float64) * 0.6 + 0.3
    r = t * torch.rand(12, generator=g, dtype=torch.float64) * 0.8
    z = (1 - t)[:, None] * GAUSS.sample(12, g) + t[:, None] * torch.randn(12, 2, generator=g, dtype=torch.float64)
    h = 1e-5  # the exact instantaneous velocity: u over a vanishing interval
    v_inst = (model.velocity(z, t - h, t) + model.velocity(z, t + h, t)) / 2
    u, u_tgt = MeanFlowLoss().target(model, z, r, t, v_inst)
    torch.testing.assert_close(u_tgt, u, rtol=1e-5, atol=1e-6)
    # and it is the closed-form average of the flow: one jump from t = 1-ish lands on the flow map
    sigma = torch.full((12,), 3.0, dtype=torch.float64)
    torch.testing.assert_close(model(z / (1 - t)[:, None], sigma), GAUSS.flow(z / (1 - t)[:, None], sigma, 0.0))


def test_meanflow_target_at_r_equals_t_is_the_instantaneous_velocity_and_loss_matches():
    torch.manual_seed(0)
    model = MeanFlowModel(ResidualMLP(2, width=32, depth=2, emb_dim=16, time_inputs=2), NOISE, c_noise="flow")
    z, t = torch.randn(8, 2), torch.rand(8) * 0.9 + 0.05
    v = torch.randn(8, 2)
    _, u_tgt = MeanFlowLoss().target(model, z, t, t, v)
    torch.testing.assert_close(u_tgt, v)
    # JVP against finite differences in float64
    m64 = model.double()
    zd, td, vd = z.double(), t.double(), v.double()
    rd = td * 0.5
    _, auto = meanflow_jvp(m64, zd, rd, td, vd, "autograd")
    _, fd = meanflow_jvp(m64, zd, rd, td, vd, "finite_difference", eps=1e-6)
    torch.testing.assert_close(auto, fd, rtol=1e-5, atol=1e-7)
    model.float()
    # the loss on a fixed batch, by hand
    x0 = torch.randn(16, 2) * SD
    loss_fn = MeanFlowLoss(flow_fraction=0.5)
    loss, _ = loss_fn(model, x0, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    a = torch.sigmoid(-0.4 + torch.randn(16, generator=g))
    b = torch.sigmoid(-0.4 + torch.randn(16, generator=g))
    tt, rr = torch.maximum(a, b), torch.minimum(a, b)
    rr = torch.where(torch.rand(16, generator=g) < 0.5, tt, rr)
    eps = torch.randn(16, 2, generator=g)
    zz = (1 - tt)[:, None] * x0 + tt[:, None] * eps
    vv = eps - x0
    u, dudt = torch.func.jvp(model.velocity, (zz, rr, tt), (vv, torch.zeros(16), torch.ones(16)))
    sq = (u - (vv - (tt - rr)[:, None] * dudt)).pow(2).sum(1)
    torch.testing.assert_close(loss, sq / (sq + 1e-3), rtol=1e-4, atol=1e-6)


def test_finite_difference_jvp_keeps_float32_under_bf16_autocast():
    """bf16 rounding (~4e-3) over a step of 1e-3 would make the difference quotient noise."""
    torch.manual_seed(0)
    model = _mlp_model()
    F = trigflow_F(model)
    u, t = torch.randn(64, 2), torch.rand(64) * 1.4 + 0.05
    du = torch.randn(64, 2)
    _, exact = jvp_F(F, u, t, du, "autograd")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, fd = jvp_F(F, u, t, du, "finite_difference")
    assert fd.dtype == torch.float32
    torch.testing.assert_close(fd, exact, rtol=1e-3, atol=1e-3)


def test_meanflow_v1_sampler_draws_r_from_its_own_logit_normal():
    loss_fn = MeanFlowLoss(p_mean=-0.6, p_std=1.6, r_p_mean=-4.0, r_p_std=1.6, flow_fraction=0.25)
    r, t = loss_fn.sample_times(8, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    a = torch.sigmoid(-0.6 + 1.6 * torch.randn(8, generator=g))
    b = torch.sigmoid(-4.0 + 1.6 * torch.randn(8, generator=g))
    tt = torch.maximum(a, b)
    rr = torch.where(torch.rand(8, generator=g) < 0.25, tt, torch.minimum(a, b))
    torch.testing.assert_close((r, t), (rr, tt))
    # over many draws: a quarter on the diagonal, and long jumps (r < 0.05, t > 0.5) common
    r, t = loss_fn.sample_times(100000, torch.Generator().manual_seed(6))
    assert (r <= t).all() and abs((r == t).float().mean() - 0.25) < 0.01
    assert ((r < 0.05) & (t > 0.5)).float().mean() > 0.2
    with pytest.raises(ValueError, match="r_p_mean"):
        MeanFlowLoss(r_p_mean=-4.0)


def test_sct_tangent_normalisation_and_its_ablation():
    """At the first pass F_theta - sg(F_theta) = 0, so the loss (no weighting) is ||g||^2 / dim:
    the raw tangent's squared norm N^2 with tangent_norm_c null, (N / (N + c))^2 with c."""
    model, x0 = _mlp_model(), torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    losses, norms = {}, {}
    for c in (None, 0.1, 2.0):
        loss_fn = ContinuousConsistencyLoss(NOISE, tangent_warmup=0, tangent_norm_c=c, adaptive_weighting=False)
        loss, logs = loss_fn(model, x0, generator=torch.Generator().manual_seed(1))
        losses[c], norms[c] = loss.detach() * 2, logs["g_norm"]  # dim = 2
    raw = losses[None].sqrt()
    assert norms[0.1] == pytest.approx(norms[None]) and float(raw.std()) > 0.01
    for c in (0.1, 2.0):
        torch.testing.assert_close(losses[c], (raw / (raw + c)) ** 2, rtol=1e-4, atol=1e-7)
