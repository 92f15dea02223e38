"""Zero-shot editing: operators, exact data consistency for any model, the Gaussian conditional,
interpolation endpoints, and the command line's handling of bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cmkit
from cmkit.cli import main
from cmkit.data import TOY_TRUTH
from cmkit.errors import CmkitError
from cmkit.editing import (LUMA, ChannelMix, Identity, LinearOperator, PatchOrthogonal, check_invertible, colorize,
                           denoise, edit, inpaint, interpolate, stroke, superres)
from cmkit.editing.algorithm import slerp

W = torch.tensor(LUMA, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- operators

def test_colorization_operator_is_orthogonal_with_luma_first():
    op = ChannelMix.colorization()
    torch.testing.assert_close(op.q.T @ op.q, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(op.q[:, 0], W / W.norm())
    check_invertible(op, (3, 4, 4))
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(op.forward(x)[:, 0] * W.norm(), torch.einsum("c,nchw->nhw", W, x))


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_superresolution_operator_keeps_patch_means_in_coefficient_zero(p):
    op = PatchOrthogonal.superresolution(p)
    torch.testing.assert_close(op.q.T @ op.q, torch.eye(p * p, dtype=torch.float64))
    torch.testing.assert_close(op.q[:, 0], torch.full((p * p,), 1 / p, dtype=torch.float64))
    check_invertible(op, (2, 2 * p, 3 * p))
    x = torch.rand(2, 2, 2 * p, 3 * p, dtype=torch.float64)
    coeff0 = op.forward(x) * (1 - op.coefficient_mask(x.shape))
    means = torch.nn.functional.avg_pool2d(x, p)
    torch.testing.assert_close(coeff0.sum((2, 3)), (p * means).sum((2, 3)))
    torch.testing.assert_close(coeff0[:, :, ::p, ::p], p * means)


def test_operators_refuse_what_is_not_orthogonal_or_invertible():
    with pytest.raises(ValueError, match="orthogonal"):
        ChannelMix(torch.ones(3, 3))
    with pytest.raises(ValueError, match="orthogonal"):
        PatchOrthogonal(torch.eye(4) * 2, 2)

    class Lossy(LinearOperator):  # a user's operator that forgets a channel
        def forward(self, x):
            return x * torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).to(x)

        def inverse(self, y):
            return y
    with pytest.raises(ValueError, match="not invertible"):
        check_invertible(Lossy(), (2, 4, 4))


# ------------------------------------------------------------------- the algorithm on exact models

def test_inpainting_the_gaussian_gives_its_conditional_law():
    """With the exact consistency function (the Gaussian's ODE flow map), Algorithm 4 at small
    levels is Langevin dynamics with step sigma^2 / 2 on the unknown coordinate, so its samples
    approach the conditional law given the known one: mean -0.02, variance 0.14 here. A short grid
    does not get there (mean -0.50, the prior's, with 2 levels): the test can fail."""
    g = TOY_TRUTH["gaussian"]

    def f(x, sigma, class_labels=None):
        return g.flow(x, torch.full((len(x),), float(sigma), dtype=x.dtype), 0.0)
    mu, cov = g.mean().double(), g.cov().double()
    known = 1.8
    cond_mean = mu[1] + cov[1, 0] / cov[0, 0] * (known - mu[0])
    cond_var = cov[1, 1] - cov[1, 0] ** 2 / cov[0, 0]
    y = torch.zeros(20000, 2, dtype=torch.float64)
    y[:, 0] = known
    mask = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sigmas = [80.0] + np.geomspace(0.5, 0.05, 100).tolist()
    x = edit(f, y, sigmas, mask=mask, generator=torch.Generator().manual_seed(0))
    assert bool((x[:, 0] == known).all())
    assert abs(float(x[:, 1].mean() - cond_mean)) < 0.015
    assert float(x[:, 1].var()) == pytest.approx(float(cond_var), rel=0.05)
    short = edit(f, y, [80.0, 1.0], mask=mask, generator=torch.Generator().manual_seed(0))
    assert abs(float(short[:, 1].mean() - cond_mean)) > 0.2


def test_slerp_keeps_the_endpoints_and_the_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    z = slerp(a, b, torch.linspace(0, 1, 5))
    torch.testing.assert_close(z[0], a[0])
    torch.testing.assert_close(z[-1], b[0])
    norms = z.flatten(1).norm(dim=1)
    assert float(norms.max() - norms.min()) < 0.05 * float(norms.mean())


# ------------------------------------------------------------------- tasks on untrained image models

def _tiny_run(tmp_path, name, data, method="ict", image=True):
    extra = {"model.preset": "tiny", "train.sample_every": 0} if image else {}
    if data == "digits":  # labelled: a class-conditional run, which edits with its null label by default
        extra["train.label_dropout"] = 0.1
    config = cmkit.build_config(method, **{"data.name": str(data), "train.steps": 2, "train.batch_size": 8, **extra})
    return cmkit.load_run(cmkit.train(config, tmp_path / name, progress=False))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("edit")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    np.save(tmp / "rgb.npy", rgb)
    return {"grey": _tiny_run(tmp, "grey", "digits"), "rgb": _tiny_run(tmp, "rgb", tmp / "rgb.npy"),
            "teacher": _tiny_run(tmp, "teacher", "digits", method="edm"), "tmp": tmp,
            "vector": _tiny_run(tmp, "vector", "moons", image=False)}


def _images(c, n=3, size=8, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (n, c, size, size), dtype=np.uint8)


@pytest.mark.parametrize("which", ["grey", "rgb", "teacher"])
def test_inpainting_keeps_every_known_pixel(runs, which):
    run = runs[which]
    images = _images(run.shape[0])
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:6, 1:5] = True
    out = inpaint(run, images, mask, n=2, steps=3, seed=4)
    assert out.shape == (6, *run.shape)
    kept = np.repeat(images, 2, axis=0)[..., ~mask]
    np.testing.assert_array_equal(out[..., ~mask], kept)
    assert not np.array_equal(out[..., mask], np.repeat(images, 2, axis=0)[..., mask])


def test_superresolution_output_averages_to_the_input(runs):
    for run in (runs["grey"], runs["rgb"]):
        low = _images(run.shape[0], size=4)
        low[0] = 255  # a white image: only white is consistent, so clipping must not break it
        out = superres(run, low, 2, steps=3, seed=0)
        means = out.reshape(len(out), run.shape[0], 4, 2, 4, 2).astype(np.float64).mean((3, 5))
        assert np.abs(means - low).max() <= 0.51
        assert (out[0] == 255).all()


def test_colorization_keeps_the_luminance(runs):
    run = runs["rgb"]
    grey = _images(1)
    out = colorize(run, grey, n=2, steps=3, seed=0)
    lum_out = np.einsum("c,nchw->nhw", np.array(LUMA), out.astype(np.float64))
    lum_in = np.einsum("c,nchw->nhw", np.array(LUMA), np.repeat(np.repeat(grey, 3, 1), 2, 0).astype(np.float64))
    assert np.abs(lum_out - lum_in).max() <= 0.51
    assert out.std(axis=1).mean() > 1  # the channels are not all equal: it is coloured


def test_edit_is_exactly_consistent_in_model_units(runs):
    run = runs["rgb"]
    y = torch.rand(2, 3, 8, 8) * 2 - 1
    for op, mask in ((ChannelMix.colorization(), torch.tensor([0.0, 1, 1]).view(1, 3, 1, 1)),
                     (PatchOrthogonal.superresolution(4), PatchOrthogonal.superresolution(4).coefficient_mask(y.shape)),
                     (Identity(), (torch.rand(1, 1, 8, 8) > 0.5).float())):
        x = edit(run.model, y, [80.0, 2.0, 0.1], operator=op, mask=mask, generator=torch.Generator().manual_seed(0))
        keep = (1 - mask).expand_as(y).bool()
        torch.testing.assert_close(op.forward(x)[keep], op.forward(y)[keep], atol=1e-5, rtol=0)


def test_stroke_and_denoise_are_seeded_and_move_toward_the_model(runs):
    run = runs["grey"]
    images = _images(1)
    a, b = stroke(run, images, seed=3), stroke(run, images, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, stroke(run, images, seed=4))
    # denoising is one call of the consistency function
    y = run.scaler.to_model(torch.from_numpy(images))
    np.testing.assert_array_equal(denoise(run, images, 0.3), run.scaler.to_data(run.model(y, 0.3)))


def test_strength_levels_are_diffusers_lcm_img2img_and_the_karras_axis(runs, tmp_path):
    from diffusers import LCMScheduler

    from cmkit.discrete_vp import lcm_timesteps
    from cmkit.editing.tasks import strength_levels
    for steps, strength in ((1, 1.0), (4, 1.0), (1, 0.5), (2, 0.5), (4, 0.5), (4, 0.3), (3, 0.08)):
        scheduler = LCMScheduler()
        scheduler.set_timesteps(steps, strength=strength)
        assert lcm_timesteps(1000, steps, strength=strength).tolist() == scheduler.timesteps.tolist(), (steps, strength)
    with pytest.raises(ValueError, match="fewer than 4 steps"):
        lcm_timesteps(1000, 4, strength=0.06)
    run = runs["grey"]  # no table: the Karras axis, evenly spaced in u below the strength
    noise = run.noise_range
    lo, hi = noise.sigma_min ** (1 / noise.rho), noise.sigma_max ** (1 / noise.rho)
    assert strength_levels(run, 1.0, 1) == pytest.approx([noise.sigma_max])
    assert strength_levels(run, 0.6, 3) == pytest.approx([(lo + u * (hi - lo)) ** noise.rho for u in (0.6, 0.4, 0.2)])
    images = _images(1, n=1)
    picture = _png(tmp_path / "in.png", images[0, 0])
    assert main(["edit", "stroke", "--checkpoint", str(run.path), "--input", picture, "--strength", "0.6", "--steps", "2",
               "--seed", "4", "--out", str(tmp_path / "out.npz"), "--quiet"]) == 0
    with np.load(tmp_path / "out.npz") as z:
        got = z["images"]
    want = stroke(run, images, sigmas=strength_levels(run, 0.6, 2), seed=4)
    np.testing.assert_array_equal(got, want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("which", ["grey", "teacher"])
def test_interpolation_endpoints_are_the_seeds_one_step_samples(runs, which):
    run = runs[which]
    assert run.num_classes == 10
    frames = interpolate(run, 5, 9, 6, class_labels=3)
    steps = 1 if which == "grey" else None
    np.testing.assert_array_equal(frames[0], run.sample(1, steps=steps, seed=5, class_labels=3)[0])
    np.testing.assert_array_equal(frames[-1], run.sample(1, steps=steps, seed=9, class_labels=3)[0])
    assert not np.array_equal(frames[2], frames[0])
    # without a class: the one run.sample draws for the first seed, for every frame
    np.testing.assert_array_equal(interpolate(run, 5, 9, 2)[0], run.sample(1, steps=steps, seed=5)[0])


# ----------------------------------------------------------------------------------------- the CLI

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cmkit", "edit", *args], capture_output=True, text=True, timeout=300)


def _png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.mark.slow
def test_cli_edits_and_writes_grids_npz_and_gifs(runs):
    tmp, grey, rgb = runs["tmp"], str(runs["grey"].path), str(runs["rgb"].path)
    picture = _png(tmp / "in.png", _images(1, n=1)[0, 0])
    r = _cli("inpaint", "--checkpoint", grey, "--input", picture, "--box", "2,2,4,3", "--n", "2", "--steps", "3",
             "--out", str(tmp / "inpaint.npz"), "--quiet")
    assert r.returncode == 0, r.stderr
    with np.load(tmp / "inpaint.npz") as z:
        out, inputs = z["images"], z["inputs"]
    assert out.shape == (2, 8, 8, 1)
    known = np.ones((8, 8), bool)
    known[2:5, 2:6] = False
    np.testing.assert_array_equal(out[:, known], np.repeat(inputs, 2, 0)[:, known])
    r = _cli("colorize", "--checkpoint", rgb, "--input", picture, "--steps", "2", "--out", str(tmp / "c.png"))
    assert r.returncode == 0 and (tmp / "c.png").is_file(), r.stderr
    r = _cli("interpolate", "--checkpoint", grey, "--seed-a", "1", "--seed-b", "2", "--frames", "4",
             "--class", "7", "--out", str(tmp / "i.gif"))
    assert r.returncode == 0, r.stderr
    with Image.open(tmp / "i.gif") as gif:
        assert gif.n_frames == 4


@pytest.mark.slow
def test_cli_bad_input_is_one_line_and_exit_2(runs, capsys):
    tmp, grey, rgb = runs["tmp"], str(runs["grey"].path), str(runs["rgb"].path)
    picture = _png(tmp / "p.png", _images(1, n=1)[0, 0])
    wrong_mask = _png(tmp / "m.png", np.zeros((5, 5), np.uint8))
    cases = [
        (("inpaint", "--checkpoint", grey, "--input", picture, "--mask", wrong_mask), "must match"),
        (("superres", "--checkpoint", grey, "--input", picture, "--factor", "3"), "divide"),
        (("colorize", "--checkpoint", grey, "--input", picture), "RGB model"),
        (("stroke", "--checkpoint", rgb, "--input", picture), "input is grey"),
        (("denoise", "--checkpoint", str(runs["vector"].path), "--input", picture, "--sigma", "0.2"), "image model"),
        (("inpaint", "--checkpoint", grey, "--input", picture, "--box", "6,6,5,5"), "does not fit"),
        (("inpaint", "--checkpoint", grey, "--input", str(tmp / "missing.png"), "--box", "1,1,2,2"), "no such"),
        (("inpaint", "--checkpoint", grey, "--input", picture, "--box", "1,1,2,2", "--class", "10"), "out of range"),
        (("colorize", "--checkpoint", rgb, "--input", picture, "--class", "1"), "unconditional"),
    ]
    r = _cli(*cases[0][0], "--out", str(tmp / "x.png"))  # one real process: its exit status
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and cases[0][1] in r.stderr, r.stderr
    for args, message in cases[1:]:  # the rest in-process, through the same entry point
        assert main(["edit", *args, "--out", str(tmp / "x.png")]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)


@pytest.mark.slow
def test_superres_from_a_full_size_png_with_downscale(runs):
    """--downscale makes the low-resolution input by patch means, and the result averages back to
    it; the batch-shape error names the count and size; no warning (read-only PNG arrays)."""
    from cmkit.editing.tasks import downscale
    tmp, grey = runs["tmp"], str(runs["grey"].path)
    full = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    low = downscale(full[None, None], 2)
    np.testing.assert_array_equal(low[0, 0], np.round(full.reshape(4, 2, 4, 2).astype(float).mean((1, 3))))
    r = subprocess.run([sys.executable, "-W", "error::UserWarning", "-m", "cmkit", "edit", "superres", "--checkpoint",
                        grey, "--input", _png(tmp / "full.png", full), "--factor", "2", "--downscale", "--steps", "2",
                        "--out", str(tmp / "sr.npz"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    with np.load(tmp / "sr.npz") as z:
        out = z["images"][..., 0].astype(np.float64)
    assert np.abs(out.reshape(-1, 4, 2, 4, 2).mean((2, 4)) - low[:, 0]).max() <= 0.51
    with pytest.raises(CmkitError, match=r"got 3 image\(s\) of 8x8 with 1 channel\(s\); pass --downscale"):
        superres(runs["grey"], np.zeros((3, 1, 8, 8), np.uint8), 2)
