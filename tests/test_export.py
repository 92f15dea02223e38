"""diffusers in and out, and ONNX: the exported or imported model computes what the original does.

- cmkit -> ConsistencyModelPipeline: the same images from the same noise, 1 step and multistep
  (the pipeline's generator set to where cmkit's stands after its starting noise, so the
  re-noising draws agree too), unconditional and class-conditional.
- A pipeline built and saved by diffusers itself, loaded by cmkit, samples as diffusers does
  (with the scheduler's clip_denoised); a bare UNet folder with a scheduler config too.
- ONNX at batch 1, 3 and 16 within 1e-4 of torch; the torch-free example script reproduces
  `cmkit sample` from the same noise; broken inputs end in one line.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
import torch

import cmkit
from cmkit.condition import Condition
from cmkit.export.diffusers_io import diffusers_timesteps
from cmkit.export.onnx import onnx_parity
from cmkit.run import generate
from helpers import TINY, cli, refused

REPO = Path(__file__).resolve().parents[1]
DIGITS = ["--data", "digits", "--batch-size", "8", "--quiet", "--set", "train.sample_every=0"]


@pytest.fixture(scope="module")
def image_runs(tmp_path_factory):
    """{"uncond": CD run, "cond": class-conditional CD run} on 8x8 digits (a few steps each)."""
    tmp = tmp_path_factory.mktemp("export")
    runs = {}
    for name, extra in (("uncond", ["--set", "model.num_classes=0"]), ("cond", ["--label-dropout", "0.1"])):
        cd_extra = ["--label-dropout", "0.1"] if name == "cond" else []
        assert cli("train", "--method", "edm", *DIGITS, "--set", "model.preset=tiny", *extra, "--steps", 3,
                   "--out", tmp / f"edm-{name}") == 0
        assert cli("train", "--method", "cd", *DIGITS, *cd_extra, "--teacher", tmp / f"edm-{name}", "--steps", 3,
                   "--out", tmp / f"cd-{name}") == 0
        runs[name] = tmp / f"cd-{name}"
    return runs


def _pipeline(folder):
    from diffusers import ConsistencyModelPipeline
    return ConsistencyModelPipeline.from_pretrained(str(folder), low_cpu_mem_usage=False)


def _diffusers_samples(pipe, n, seed, noise=None, labels=None, **steps):
    """The pipeline's n images in [0, 1] (NCHW). Without ``noise`` it draws the starting noise
    from a generator seeded ``seed``, as cmkit does; with it, the generator is first moved to where
    cmkit's stands after that draw (cmkit draws it even when --noise replaces it). The pipeline
    takes ``latents`` only for 3-channel models (its check_inputs assumes RGB)."""
    gen = torch.Generator().manual_seed(seed)
    if noise is not None:
        torch.randn(noise.shape, generator=gen)
    out = pipe(batch_size=n, latents=noise, generator=gen, class_labels=labels, output_type="pt", **steps)
    return out.images  # "pt": NCHW


def _cmkit_samples(run, n, seed, sigmas, noise=None, labels=None):
    x = generate(run.model, run.shape, torch.tensor(sigmas), is_diffusion=False, n=n, seed=seed,
                 noise=noise, sigma_min=run.noise_range.sigma_min, condition=Condition(labels=labels))
    return ((x / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("name", ["uncond", "cond"])
def test_exported_pipeline_generates_what_cmkit_does(image_runs, tmp_path, name):
    run = cmkit.load_run(image_runs[name])
    assert cli("export", "diffusers", "--checkpoint", image_runs[name], "--out", tmp_path / "pipe", "--quiet") == 0
    pipe = _pipeline(tmp_path / "pipe")
    levels = pipe.scheduler.config.num_train_timesteps
    labels = torch.tensor([0, 1, 2, 3, 4]) if name == "cond" else None
    grid = run.noise_range.karras(levels).tolist()
    for sigmas in ([run.noise_range.sigma_max], [run.noise_range.sigma_max, grid[levels // 2]],
                   [run.noise_range.sigma_max, grid[4], grid[levels - 3]]):
        ours = _cmkit_samples(run, 5, 3, sigmas, labels=labels)
        steps = ({"num_inference_steps": 1} if len(sigmas) == 1
                 else {"num_inference_steps": None, "timesteps": diffusers_timesteps(sigmas, run.noise_range, levels)})
        theirs = _diffusers_samples(pipe, 5, 3, labels=labels, **steps)
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
        assert float((ours - ours.mean()).abs().max()) > 0.01  # not a constant image: the check can fail

    # The CLI's uint8 output for the same seed agrees to rounding.
    args = ["--class", "0,1,2,3,4"] if name == "cond" else []
    assert cli("sample", "--checkpoint", image_runs[name], "--n", 5, "--seed", 3, *args,
               "--out", tmp_path / "cli.npy", "--quiet") == 0
    ours_u8 = np.load(tmp_path / "cli.npy").astype(int)  # NHWC
    theirs = _diffusers_samples(pipe, 5, 3, labels=labels, num_inference_steps=1)
    theirs_u8 = np.rint(theirs.permute(0, 2, 3, 1).numpy() * 255).astype(int)
    assert np.abs(ours_u8 - theirs_u8).max() <= 1


def _diffusers_made_pipeline(folder: Path, classes: int, layout: str):
    """A tiny pipeline made and saved by diffusers itself (random weights, clip_denoised on)."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=classes or None,
                       resnet_time_scale_shift="scale_shift")
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=12, sigma_min=0.002, sigma_max=80.0)
    if layout == "pipeline":
        ConsistencyModelPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    else:  # a UNet folder with the scheduler's config beside its own
        unet.save_pretrained(str(folder))
        scheduler.save_config(str(folder))
    return ConsistencyModelPipeline(unet=unet, scheduler=scheduler)


@pytest.mark.parametrize("classes, layout", [(0, "pipeline"), (3, "pipeline"), (0, "unet")])
def test_a_diffusers_made_model_samples_in_cmkit_as_in_diffusers(tmp_path, classes, layout):
    pipe = _diffusers_made_pipeline(tmp_path / "model", classes, layout)
    run = cmkit.load_run(tmp_path / "model")
    assert run.shape == (3, 8, 8) and run.num_classes == classes and not run.is_diffusion
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0]) if classes else None
    grid = run.noise_range.karras(12).tolist()
    for sigmas in ([80.0], [80.0, grid[6]]):
        steps = ({"num_inference_steps": 1} if len(sigmas) == 1
                 else {"num_inference_steps": None, "timesteps": diffusers_timesteps(sigmas, run.noise_range, 12)})
        theirs = _diffusers_samples(pipe, 4, 5, noise, labels, **steps)  # RGB: the pipeline takes latents
        ours = _cmkit_samples(run, 4, 5, sigmas, noise, labels)
        torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=0)
    # cmkit's own tools run on it: the CLI sampler, with classes by index.
    np.save(tmp_path / "noise.npy", noise.numpy())
    args = ["--class", "0,1,2,0"] if classes else []
    assert cli("sample", "--checkpoint", tmp_path / "model", "--n", 4, "--noise", tmp_path / "noise.npy",
               *args, "--out", tmp_path / "x.npy", "--quiet") == 0


def test_export_and_import_refusals(tmp_path, tiny_teacher, image_runs, capsys):
    def error(*args):
        assert cli(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cmkit: error: ")
        return err[0]

    assert "trained on vectors" in error("export", "diffusers", "--checkpoint", tiny_teacher, "--out", tmp_path / "d")
    edm = image_runs["uncond"].parent / "edm-uncond"
    assert "this is a cmkit edm run (a diffusion model)" in error("export", "diffusers", "--checkpoint", edm,
                                                                  "--out", tmp_path / "d")
    assert "edm teacher" in error("export", "onnx", "--checkpoint", edm, "--out", tmp_path / "e.onnx")
    assert "must end in .onnx" in error("export", "onnx", "--checkpoint", image_runs["uncond"], "--out", tmp_path / "x")
    # A diffusers folder whose weights are only a pickle (.bin) is refused, not unpickled.
    _diffusers_made_pipeline(tmp_path / "pkl", 0, "pipeline")
    unet = tmp_path / "pkl" / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    assert "never unpickles" in error("sample", "--checkpoint", tmp_path / "pkl", "--n", 2, "--out", tmp_path / "s.npy")


def test_an_export_is_replaced_only_with_force(tmp_path, image_runs, capsys):
    run_dir = image_runs["uncond"]
    onnx = ["export", "onnx", "--checkpoint", run_dir, "--out", tmp_path / "m.onnx", "--no-check", "--quiet"]
    assert cli(*onnx, "--with-f") == 0
    assert "pass --force to replace them" in refused(capsys, *onnx)
    (tmp_path / "m.json").write_text("{}")
    assert cli(*onnx, "--force") == 0  # replaced: the JSON of an export without f(x, sigma)
    meta = json.loads((tmp_path / "m.json").read_text())
    assert meta["shape"] == [1, 8, 8] and meta["consistency_function"] is None

    diffusers = ["export", "diffusers", "--checkpoint", run_dir, "--out", tmp_path / "pipe", "--quiet"]
    assert cli(*diffusers) == 0
    (tmp_path / "pipe" / "stale.txt").write_text("from before")
    assert "pass --force to replace the export" in refused(capsys, *diffusers)
    assert cli(*diffusers, "--force") == 0
    assert not (tmp_path / "pipe" / "stale.txt").exists() and (tmp_path / "pipe" / "model_index.json").is_file()
    assert cmkit.load_run(tmp_path / "pipe").shape == (1, 8, 8)
    other = tmp_path / "other"  # not an export: never deleted
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not a cmkit export" in refused(capsys, *diffusers[:-3], "--out", other, "--force")
    assert (other / "notes.txt").read_text() == "mine" and not list(tmp_path.glob(".pipe.*"))


@pytest.mark.parametrize("which", ["vectors", "cond-images"])
def test_onnx_matches_torch_at_several_batch_sizes(which, tmp_path, image_runs, tiny_teacher):
    if which == "vectors":
        source = tmp_path / "cd"
        assert cli("train", "--method", "cd", "--data", "moons", "--teacher", tiny_teacher, *TINY[6:],
                   "--steps", 5, "--out", source) == 0
    else:
        source = image_runs["cond"]
    assert cli("export", "onnx", "--checkpoint", source, "--out", tmp_path / "m.onnx", "--with-f", "--quiet") == 0
    run = cmkit.load_run(source)
    assert onnx_parity(run, tmp_path / "m.onnx", batch_sizes=(1, 3, 16)) < 1e-4
    if which == "vectors":  # the example script plots 2-D samples to a real PNG (not grid.png.npy)
        done = onnx_example(tmp_path / "m.onnx", "--n", 50, "--out", tmp_path / "grid.png")
        assert done.returncode == 0 and "grid.png" in done.stdout, done.stderr
        with Image.open(tmp_path / "grid.png") as im:
            assert im.format == "PNG" and im.width >= 400
        assert not (tmp_path / "grid.png.npy").exists()

    # f(x, sigma) for multistep: onnxruntime against torch.
    import onnxruntime as ort
    f = ort.InferenceSession(str(tmp_path / "m-f.onnx"))
    for b in (1, 3, 16):
        x = torch.randn(b, *run.shape)
        sigma = torch.rand(b) * 5 + 0.01
        feeds = {"x": x.numpy(), "sigma": sigma.numpy()}
        labels = None
        if run.num_classes:
            labels = torch.arange(b) % run.num_classes
            feeds["class_labels"] = labels.numpy()
        with torch.no_grad():
            ref = run.model(x, sigma, labels).numpy()
        assert np.abs(f.run(None, feeds)[0] - ref).max() / np.abs(ref).max() < 1e-4


def onnx_example(*args):
    """examples/onnx_sample.py in a Python where torch cannot be imported."""
    script = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", script, str(REPO / "examples" / "onnx_sample.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_onnx_example_script_needs_no_torch_and_matches_cmkit(image_runs, tmp_path):
    run_dir = image_runs["uncond"]
    assert cli("export", "onnx", "--checkpoint", run_dir, "--out", tmp_path / "m.onnx", "--with-f",
               "--no-check", "--quiet") == 0
    noise = np.random.default_rng(0).standard_normal((6, *cmkit.load_run(run_dir).shape)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    example = onnx_example

    done = example(tmp_path / "m.onnx", "--n", 6, "--noise", tmp_path / "noise.npy", "--out", tmp_path / "onnx.npy")
    assert done.returncode == 0, done.stderr
    assert cli("sample", "--checkpoint", run_dir, "--n", 6, "--noise", tmp_path / "noise.npy",
               "--out", tmp_path / "torch.npy", "--quiet") == 0
    assert np.abs(np.load(tmp_path / "onnx.npy").astype(int) - np.load(tmp_path / "torch.npy").astype(int)).max() <= 1
    assert example(tmp_path / "m.onnx", "--n", 4, "--steps", 2, "--out", tmp_path / "grid.png").returncode == 0
    # A .png grid: one pixel per sample pixel (8x8 tiles, 2 px apart, 3 per row for 6), --scale 3 enlarged.
    done = example(tmp_path / "m.onnx", "--n", 6, "--noise", tmp_path / "noise.npy", "--scale", 3,
                   "--out", tmp_path / "big.png")
    assert done.returncode == 0 and "2 x 3 tiles of 24x24 px, 3x enlarged" in done.stdout, done.stdout + done.stderr
    with Image.open(tmp_path / "big.png") as im:
        big = np.asarray(im)
    assert big.shape == (3 * (2 * 10 + 2), 3 * (3 * 10 + 2))
    grid, samples = big[::3, ::3], np.load(tmp_path / "onnx.npy")[..., 0]
    for i, sample in enumerate(samples):
        top, left = 2 + (i // 3) * 10, 2 + (i % 3) * 10
        assert np.array_equal(grid[top:top + 8, left:left + 8], sample)
    assert np.array_equal(big, grid.repeat(3, axis=0).repeat(3, axis=1))

    (tmp_path / "m.onnx").write_bytes(b"\x08\x07 not a model")  # corrupted
    done = example(tmp_path / "m.onnx", "--n", 2, "--out", tmp_path / "x.npy")
    assert done.returncode == 2 and done.stderr.strip().startswith("onnx_sample: error: cannot load")
    assert len(done.stderr.strip().splitlines()) == 1
