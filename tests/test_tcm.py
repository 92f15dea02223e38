"""Truncated consistency models (TCM): the time distribution against scipy, the loss against a
plain transcription of FastGen's step (targets below sigma_t' from the frozen stage-1 model, the
boundary subset and its weight), draws that do not depend on how the batch is split, what a TCM
run is (its stage-1 run's network, sampled at or above sigma_t'), and the refusals."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

import cmkit
from cmkit.batch_rng import BatchRNG
from cmkit.noise import NoiseConfig
from cmkit.objectives import TruncatedConsistencyLoss, TruncatedLogStudentT
from cmkit.objectives.registry import export_formats

from helpers import TINY_TRAIN, cli
from test_diffusers_teachers import save_ddpm, tiny_unet


def test_time_distribution_is_the_truncated_student_t_on_log_sigma():
    for mean, std, df, low in ((0.0, 0.2, 0.01, 1.0), (-1.1, 2.0, 3.0, 0.002), (0.5, 1.0, 30.0, 0.3)):
        times = TruncatedLogStudentT(mean, std, df, low, 80.0)
        q = torch.linspace(0.001, 0.999, 41, dtype=torch.float64)
        a, b = (scipy.stats.t.cdf((math.log(s) - mean) / std, df) for s in (low, 80.0))
        expected = np.exp(mean + std * scipy.stats.t.ppf(a + (b - a) * q.numpy(), df))
        np.testing.assert_allclose(times.icdf(q).numpy(), expected, rtol=2e-4)


class Affine(torch.nn.Module):
    """out = a x + b sigma: a network whose outputs the test can write down."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(a)), b

    def forward(self, x, sigma, condition=None):
        return self.a * x + self.b * sigma.view(-1, *[1] * (x.dim() - 1))


def test_loss_is_fastgen_step_with_the_stage1_target_below_the_transition():
    noise = NoiseConfig()
    stage1, student = Affine(2.0, 1.0), Affine(3.0, -1.0)
    tcm = TruncatedConsistencyLoss(stage1, noise, transition_sigma=1.0, boundary_prob=0.25, w_boundary=0.1,
                                   ratio=0.99, distance="l2", huber_c=None)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    draws = tcm.draw(x0, generator=torch.Generator().manual_seed(1))
    t, r, z, boundary = draws["t"], draws["r"], draws["z"], draws["boundary"].bool()
    # The boundary part: exactly a quarter of the batch, at sigma_t' itself; the rest at or above it.
    assert int(boundary.sum()) == 16 and bool((t[boundary] == 1.0).all()) and bool((t >= 1.0).all())
    assert bool((r < t).all()) and bool((r[boundary] < 1.0).all())
    # FastGen's step, transcribed: f_tcm answers with the stage-1 model below sigma_t'.
    f_tcm = lambda x, s: torch.where((s < 1.0)[:, None], stage1(x, s), student(x, s))  # noqa: E731
    x_t, x_r = x0 + t[:, None] * z, x0 + r[:, None] * z
    cm = ((student(x_t, t) - f_tcm(x_r, r).detach()) ** 2).mean(1) / (t - r)
    expected = cm[~boundary].mean() + 0.1 * cm[boundary].mean()
    per_sample, logs = tcm.loss(student, x0, draws)
    torch.testing.assert_close(per_sample.mean(), expected, rtol=1e-5, atol=0)
    assert float(logs["boundary"]) == 0.25 and 0.25 <= float(logs["below_transition"]) < 1
    # Below sigma_t' the target is the stage-1 model's output exactly: the gradient of a boundary
    # row pulls the student toward it, and changing the stage-1 model changes only those rows.
    other = TruncatedConsistencyLoss(Affine(-5.0, 0.0), noise, transition_sigma=1.0, ratio=0.99, distance="l2",
                                     huber_c=None)
    changed = (other.loss(student, x0, draws)[0] != per_sample)
    assert torch.equal(changed, r < 1.0)


def test_draws_do_not_depend_on_how_the_batch_is_split():
    tcm = TruncatedConsistencyLoss(Affine(1.0, 0.0), NoiseConfig())
    x0 = torch.zeros(32, 3)
    whole = tcm.draw(x0, generator=BatchRNG(torch.Generator().manual_seed(5)))
    for start in (0, 16):
        half = tcm.draw(x0[:16], generator=BatchRNG(torch.Generator().manual_seed(5), start=start, total=32))
        for key in ("t", "r", "z", "weight", "boundary"):
            torch.testing.assert_close(half[key], whole[key][start:start + 16], msg=key)


def test_a_tcm_run_is_its_stage1_network_sampled_above_the_transition(tiny_consistency, tmp_path):
    out = tmp_path / "tcm"
    assert cli("train", "--method", "tcm", "--init", tiny_consistency, "--data", "moons", "--steps", 3,
               "--out", out, *TINY_TRAIN) == 0
    run, stage1 = cmkit.load_run(out), cmkit.load_run(tiny_consistency)
    assert run.config["init_method"] == "cd" and type(run.model) is type(stage1.model)
    assert export_formats(run.config) == ("diffusers", "onnx")
    assert run.sigmas_for(2).tolist() == pytest.approx([80.0, 1.0])  # TCM's (80, sigma_t')
    assert run.sigmas_for(3).tolist() == pytest.approx([80.0, math.sqrt(80.0), 1.0])
    x = run.sample(8, steps=2, seed=0)
    assert np.isfinite(x).all() and np.array_equal(x, run.sample(8, steps=2, seed=0))


@pytest.mark.parametrize("args, message", [
    ([], "pass --init RUN (a trained"),
    (["--init", "TEACHER"], "is a cmkit edm run (a diffusion model); tcm continues a consistency model"),
    (["--init", "DDPM"], "is a diffusers DDPM teacher (a diffusion model); tcm continues a consistency model"),
    (["--init", "CM", "--set", "objective.transition_sigma=80"], "transition_sigma must lie inside the noise range"),
    (["--init", "CM", "--set", "objective.transition_sigma=0.001"], "transition_sigma must lie inside"),
    (["--init", "CM", "--set", "objective.boundary_prob=1.0"], "boundary_prob must be in [0, 1)"),
])
def test_refusals_are_one_line(args, message, tiny_teacher, tiny_consistency, tmp_path, capsys):
    if "DDPM" in args:
        save_ddpm(tmp_path / "ddpm", tiny_unet())
    args = [{"TEACHER": tiny_teacher, "CM": tiny_consistency, "DDPM": tmp_path / "ddpm"}.get(a, a) for a in args]
    capsys.readouterr()
    assert cli("train", "--method", "tcm", *args, "--data", "moons", "--steps", 2, "--out", tmp_path / "r",
               *TINY_TRAIN) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_default_levels_stay_at_or_above_the_floor():
    from cmkit.run import default_consistency_sigmas
    noise = NoiseConfig()
    for floor in (0.05, 0.5, 1.0, 2.0):
        for steps in (2, 3, 4):
            levels = default_consistency_sigmas(steps, noise, floor)
            assert levels[0] == 80.0 and levels[-1] == pytest.approx(floor) and min(levels) >= floor * (1 - 1e-6)
            assert all(a > b for a, b in zip(levels, levels[1:]))
    assert default_consistency_sigmas(2, noise) == [80.0, pytest.approx(0.8)]  # no floor: as before


@pytest.mark.slow
def test_a_tcm_image_run_exports_to_diffusers_and_comes_back_with_its_floor(tmp_path):
    digits = ["--data", "digits", "--batch-size", 8, "--quiet", "--set", "train.sample_every=0"]
    assert cli("train", "--method", "edm", *digits, "--set", "model.preset=tiny", "--steps", 2,
               "--out", tmp_path / "edm") == 0
    assert cli("train", "--method", "ect", *digits, "--init", tmp_path / "edm", "--steps", 2, "--out", tmp_path / "ect") == 0
    assert cli("train", "--method", "tcm", *digits, "--init", tmp_path / "ect", "--steps", 2,
               "--set", "objective.transition_sigma=2.0", "--out", tmp_path / "tcm") == 0
    assert cli("export", "diffusers", "--checkpoint", tmp_path / "tcm", "--out", tmp_path / "pipe", "--quiet") == 0
    run, back = cmkit.load_run(tmp_path / "tcm"), cmkit.load_run(tmp_path / "pipe")
    assert back.method == "tcm" and back.sampling_floor == 2.0
    assert back.sigmas_for(2).tolist() == pytest.approx([80.0, 2.0])
    np.testing.assert_allclose(back.sample(4, steps=1, seed=0), run.sample(4, steps=1, seed=0), atol=1)
    assert cli("export", "onnx", "--checkpoint", tmp_path / "pipe", "--out", tmp_path / "m.onnx", "--quiet") == 0
