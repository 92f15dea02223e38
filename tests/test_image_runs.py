"""Image runs end to end through the command line: digits teacher + CD, grids, samples, FD;
bit-exact resume with flips; the speed options give the same training step."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import cmkit
from cmkit.config import build_config
from cmkit.evaluate import ImageScorer
from cmkit.training import Trainer
from cmkit.checkpoint import checkpoint_dir
from helpers import cli, tree_digest

pytestmark = pytest.mark.slow  # the quick loop (pytest -m 'not slow') leaves these out

DATA = ["--data", "digits", "--batch-size", "64", "--quiet", "--set", "train.log_every=10"]
DIGITS = [*DATA, "--set", "model.preset=tiny"]  # cd takes the model from its teacher


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert cli("train", "--method", "edm", "--steps", 400, "--out", root / "teacher", "--lr", "2e-3",
               "--set", "train.sample_every=200", "--set", "train.lr_warmup=50", *DIGITS) == 0
    assert cli("train", "--method", "cd", "--teacher", root / "teacher", "--steps", 200, "--out", root / "cd",
               "--set", "train.sample_every=100", *DATA) == 0
    return root


def test_training_writes_progress_grids(digits_runs):
    grids = sorted(p.name for p in (digits_runs / "teacher" / "samples").iterdir())
    assert grids == ["step-0000200.png", "step-0000400.png"]
    assert (digits_runs / "cd" / "samples" / "step-0000200.png").is_file()


def test_sample_grid_and_npz(digits_runs, tmp_path):
    assert cli("sample", "--checkpoint", digits_runs / "cd", "--n", 10, "--steps", 2, "--out", tmp_path / "s.npz",
               "--quiet") == 0
    with np.load(tmp_path / "s.npz") as f:
        images = f["images"]
    assert images.shape == (10, 8, 8, 1) and images.dtype == np.uint8
    assert cli("sample", "--checkpoint", digits_runs / "cd", "--n", 16, "--out", tmp_path / "g.png", "--quiet") == 0
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    caption = grid.shape[0] - grid.shape[1]  # 4 x 4 tiles enlarged to >= 512 px, under a caption strip
    assert grid.ndim == 2 and grid.shape[1] >= 512 and 14 < caption < 60
    assert (grid[:caption] == 255).mean() > 0.8 and (grid[:caption] < 128).any()  # black text on white
    # The same seed gives the same images; .npy holds the same NHWC array.
    assert cli("sample", "--checkpoint", digits_runs / "cd", "--n", 10, "--steps", 2, "--out", tmp_path / "s.npy",
               "--quiet") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), images)


def test_eval_reports_fd_beside_the_floor_and_beats_noise(digits_runs, tmp_path):
    results = {}
    for name, steps in (("teacher", "18"), ("cd", "1,2")):
        out = tmp_path / f"{name}.json"
        assert cli("eval", "--checkpoint", digits_runs / name, "--steps", steps, "--metric", "fd,pr",
                   "--out", out, "--quiet") == 0
        results[name] = json.loads(out.read_text())
    floor = results["teacher"]["floor"]["fd"]
    assert results["teacher"]["n"] == 180 and floor > 0
    from cmkit.data import load_images
    held = load_images("digits").holdout
    scorer = ImageScorer(held, ["fd"], None)
    noise = torch.randint(0, 256, held.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_fd = scorer.score(noise)["fd"]
    teacher_fd = results["teacher"]["results"][0]["fd"]
    cd_fd = [r["fd"] for r in results["cd"]["results"]]
    print(f"digits FD: floor {floor:.2f}, teacher {teacher_fd:.2f}, cd {cd_fd}, noise {noise_fd:.2f}")
    assert floor < teacher_fd < 0.5 * noise_fd, (floor, teacher_fd, noise_fd)
    assert max(cd_fd) < 0.5 * noise_fd, (cd_fd, noise_fd)
    assert 0 <= results["cd"]["results"][0]["precision"] <= 1


def test_eval_quiet_prints_the_table_and_few_images_are_warned_of(digits_runs, capsys):
    from cmkit.evaluate import MIN_SAMPLES
    assert cli("eval", "--checkpoint", digits_runs / "cd", "--steps", 1, "--n", 30, "--quiet") == 0
    out, err = capsys.readouterr()
    assert "30 samples against as many held-out ones" in out and "data (floor)" in out and "1 step" in out
    assert f"cmkit: warning: fd from 30 held-out images: below {MIN_SAMPLES['fd']}" in err
    assert cli("eval", "--checkpoint", digits_runs / "cd", "--steps", 1, "--quiet", "--json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == 180 and "warning" not in err  # the whole held-out split: above the minimum


def test_image_resume_is_bit_exact_with_flips(tmp_path):
    args = ["--method", "edm", *DIGITS, "--set", "data.hflip=true", "--set", "train.save_every=3",
            "--set", "train.sample_every=0", "--batch-size", "8"]
    assert cli("train", *args, "--steps", 6, "--out", tmp_path / "straight") == 0
    assert cli("train", *args, "--steps", 3, "--out", tmp_path / "split") == 0
    assert cli("train", "--method", "edm", "--resume", "--steps", 6, "--out", tmp_path / "split", "--quiet") == 0
    a, b = tree_digest(checkpoint_dir(tmp_path / "straight")), tree_digest(checkpoint_dir(tmp_path / "split"))
    assert a == b


def _first_loss(**flags):
    sets = {"data.name": "digits", "model.preset": "tiny", "train.batch_size": 16, "train.sample_every": 0,
            "train.optimizer": "adamw", **flags}
    trainer = Trainer(build_config("edm", **sets))
    return trainer.step(0)["loss"], trainer


def test_speed_options_give_the_same_step():
    eager, trainer = _first_loss()
    channels_last, t2 = _first_loss(**{"train.channels_last": True, "train.fused_optimizer": True})
    assert channels_last == pytest.approx(eager, rel=1e-5)
    assert t2.net.backbone.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(trainer.net.parameters(), t2.net.parameters()):  # fused AdamW takes the same step
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    bf16, _ = _first_loss(**{"train.bf16": True})
    assert bf16 == pytest.approx(eager, rel=0.05) and bf16 != eager


@pytest.mark.fashion_mnist
def test_npz_samples_of_a_conditional_run_carry_their_labels(image_run, tmp_path):
    """The labels in the .npz are the ones the images were drawn with: class 3 for all, and for
    a random spec the same labels as `Run.labels` draws for that seed."""
    assert cli("sample", "--checkpoint", image_run, "--n", 6, "--class", "3", "--out", tmp_path / "a.npz",
               "--quiet") == 0
    with np.load(tmp_path / "a.npz") as f:
        assert f["labels"].tolist() == [3] * 6 and f["images"].shape == (6, 8, 8, 1)
    assert cli("sample", "--checkpoint", image_run, "--n", 6, "--class", "random", "--seed", 4,
               "--out", tmp_path / "b.npz", "--quiet") == 0
    with np.load(tmp_path / "b.npz") as f:
        expected = cmkit.load_run(image_run).labels("random", 6, 4).tolist()
        assert f["labels"].tolist() == expected and len(set(expected)) > 1


def test_sample_figures_say_what_they_show(image_run):
    from argparse import Namespace

    from cmkit.cli import _samples_title
    run = cmkit.load_run(image_run)
    args = Namespace(steps=2, sigmas=None, guidance=None, seed=5)
    title = _samples_title(run, args, run.labels("3", 4, 5))
    levels = run.sigmas_for(2, None).tolist()
    assert title == f"cd, 2 steps (sigma {levels[0]:.3g}, {levels[1]:.3g}), class 3, seed 5", title
    args = Namespace(steps=None, sigmas=[80.0, 2.0, 0.5], guidance=None, seed=0)
    assert "3 steps (sigma 80, 2, 0.5)" in _samples_title(run, args, run.labels("random", 8, 0))
