"""The diffusers UNet behind cmkit's interface: diffusers' own consistency parametrization,
the boundary condition, config and weight round trips, presets."""

import numpy as np
import pytest
import torch
from diffusers import CMStochasticIterativeScheduler

from cmkit import checkpoint
from cmkit.config import build_config
from cmkit.nets import UNet, build_backbone
from cmkit.noise import NoiseConfig
from cmkit.precond import ConsistencyFunction
from cmkit.run import Run
from cmkit.training import Trainer


def tiny_unet(channels=1, res=8):
    return build_backbone({"backbone": "unet", "preset": "tiny", "image_channels": channels, "resolution": res,
                           "c_noise": "openai"})


@pytest.mark.parametrize("sigma", [0.002, 0.05, 1.3, 80.0])
def test_consistency_function_matches_diffusers_scheduler(sigma):
    """What ConsistencyModelPipeline computes with CMStochasticIterativeScheduler, step by step."""
    torch.manual_seed(0)
    backbone = tiny_unet(3, 8)
    f = ConsistencyFunction(backbone, NoiseConfig(), c_noise="openai").eval()
    x = torch.randn(2, 3, 8, 8) * max(sigma, 1.0)
    scheduler = CMStochasticIterativeScheduler()
    t = torch.tensor(scheduler.sigma_to_t(np.array(sigma)), dtype=torch.float32)
    scaled = x / (sigma ** 2 + scheduler.config.sigma_data ** 2) ** 0.5
    with torch.no_grad():
        model_output = backbone.unet(scaled, t.expand(2)).sample
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition(torch.tensor(sigma))
        expected = c_skip * x + c_out * model_output
        torch.testing.assert_close(f(x, sigma), expected, rtol=1e-5, atol=1e-5)


def test_boundary_condition_holds_for_image_models():
    torch.manual_seed(0)
    f = ConsistencyFunction(tiny_unet(1, 8), NoiseConfig(), c_noise="openai")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(f(x, 0.002), x)


def _image_config(method="edm", **sets):
    config = build_config(method, **{"data.name": "digits", "model.preset": "tiny", "train.steps": 3,
                                     "train.batch_size": 8, "train.sample_every": 0, **sets})
    return config


def test_tiny_unet_round_trips_config_and_weights(tmp_path):
    trainer = Trainer(_image_config())
    for k in range(3):
        trainer.step(k)
    trainer.save(tmp_path, 3)
    (tmp_path / "config.json").write_text(__import__("json").dumps(trainer.config))
    run = Run(tmp_path, weights="model")
    assert run.shape == (1, 8, 8) and run.is_image
    saved, loaded = trainer.net.state_dict(), run.model.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 5.0, 80.0])
    trainer.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(run.model(x, sigma), trainer.net(x, sigma), rtol=0, atol=0)
    assert checkpoint.load_weights(tmp_path, "ema").keys() == saved.keys()


def test_presets_and_overrides():
    torch.manual_seed(0)
    small = UNet(1, 32, "small")
    assert small.unet.config.block_out_channels == (64, 128, 256)
    assert "AttnDownBlock2D" in small.unet.config.down_block_types[-1]
    custom = UNet(3, 16, "small", channels=[32, 64], layers_per_block=1, attention=[16], dropout=0.0)
    assert custom.unet.config.down_block_types == ("AttnDownBlock2D", "ResnetDownsampleBlock2D")
    assert custom.unet.config.resnet_time_scale_shift == "scale_shift"
    with pytest.raises(ValueError, match="not divisible"):
        UNet(1, 30, "small")
    with pytest.raises(ValueError, match="attention resolutions"):
        UNet(1, 32, "small", attention=[5])
    with pytest.raises(ValueError, match="unknown UNet preset"):
        UNet(1, 32, "huge")


def test_image_runs_default_to_unet_and_openai_c_noise():
    config = _image_config()
    assert config["model"]["backbone"] == "unet" and config["model"]["c_noise"] == "openai"
    vector = build_config("edm", **{"data.name": "moons"})
    assert vector["model"]["backbone"] == "mlp" and "resolution" not in vector["model"]


def test_forward_mode_jvp_through_the_unet_equals_finite_differences():
    """torch.func.jvp through diffusers' UNet (GroupNorm and attention swapped for AD-capable
    equivalents inside ``forward_ad_safe``) against float64 central differences; afterwards the
    model runs its own kernels again and gives the same output. diffusers computes the time
    embedding in float32, so the time direction is checked with EDM's small c_noise (OpenAI's
    250 ln(sigma) leaves float32 rounding of ~1e-3 in any difference quotient along t)."""
    from cmkit.nets.unet import forward_ad_safe
    from cmkit.objectives.jvp import jvp
    from cmkit.objectives.scm import trigflow_F
    from cmkit.precond import EDMDenoiser

    torch.manual_seed(0)
    u, du = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8, 1.2], dtype=torch.float64)
    for c_noise, dt, tol in [("openai", 0.0, 1e-5), ("edm", 1.0, 1e-4)]:
        backbone = build_backbone({"backbone": "unet", "preset": "tiny", "image_channels": 1, "resolution": 8,
                                   "c_noise": c_noise, "attention": [4]})
        model = EDMDenoiser(backbone, c_noise=c_noise).double()
        assert any(type(m).__name__ == "Attention" for m in model.modules())
        F = trigflow_F(model)
        before = F(u, t)
        tangents = (du, torch.full_like(t, dt))
        out, auto = jvp(F, (u, t), tangents, "autograd", module=model)
        _, fd = jvp(F, (u, t), tangents, "finite_difference", eps=1e-3, module=model)
        torch.testing.assert_close(out, before)
        assert float((auto - fd).detach().norm() / fd.detach().norm()) < tol, c_noise
        norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert norms and all("forward" not in vars(m) for m in norms)
        with forward_ad_safe(model):  # the swapped GroupNorm computes what torch's does
            torch.testing.assert_close(F(u, t), before)
