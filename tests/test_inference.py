"""Inference: streamed sampling to disk, bfloat16, and the noise-level search (tune-sigmas)."""

import json
import math

import numpy as np
import pytest

import cmkit
from cmkit.tune import tune_levels
from helpers import TINY, TINY_TRAIN, cli


@pytest.fixture(scope="module")
def gaussian_cd(tmp_path_factory):
    """A small CD model of the 2-D Gaussian (whose law is known), distilled from a small teacher."""
    tmp = tmp_path_factory.mktemp("tune")
    common = ["--data", "gaussian", "--set", "data.n=4000", "--set", "data.n_holdout=2000", "--quiet",
              "--set", "train.log_every=100"]
    assert cli("train", "--method", "edm", *common, "--steps", 400, "--batch-size", 256, "--out", tmp / "edm") == 0
    assert cli("train", "--method", "cd", *common, "--teacher", tmp / "edm", "--steps", 200, "--batch-size", 256,
               "--out", tmp / "cd") == 0
    return tmp / "cd"


def test_ternary_search_finds_a_known_optimum():
    # A score with its minimum at sigma = 0.3 for the second level and 0.05 for the third.
    target = [80.0, 0.3, 0.05]
    score = lambda s: sum((math.log(a) - math.log(b)) ** 2 for a, b in zip(s, target))
    levels, best, evaluations = tune_levels(score, [80.0, 0.8, 0.1], sigma_min=0.002, iterations=20)
    assert levels[0] == 80.0
    np.testing.assert_allclose(levels[1:], target[1:], rtol=0.01)
    assert best < 1e-4 and evaluations == 1 + 2 * (2 * 20 + 1)


def test_tune_sigmas_stores_levels_no_worse_than_the_default(gaussian_cd, tmp_path, capsys):
    assert cli("tune-sigmas", "--checkpoint", gaussian_cd, "--steps", 2, "--n", 1500, "--iterations", 5) == 0
    out = capsys.readouterr().out
    assert "default 80,0.8" in out and "stored in" in out
    config = json.loads((gaussian_cd / "config.json").read_text())
    tuned = config["sampling"]["sigmas"]["2"]
    record = config["sampling"]["tuned"]["2"]
    assert tuned[0] == 80.0 and 0.002 < tuned[1] < 80.0
    assert record["score"] <= record["default_score"] and record["metric"] == "sw1"
    # `sample --steps 2` now samples at the stored levels.
    assert cli("sample", "--checkpoint", gaussian_cd, "--n", 500, "--steps", 2, "--out", tmp_path / "a.npy",
               "--quiet") == 0
    assert cli("sample", "--checkpoint", gaussian_cd, "--n", 500, "--sigmas", ",".join(map(repr, tuned)),
               "--out", tmp_path / "b.npy", "--quiet") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    # The training run still resumes with the extra section in its config.
    assert cli("train", "--method", "cd", "--steps", 201, "--resume", "--quiet", "--out", gaussian_cd) == 0


def test_tune_sigmas_refusals(tiny_teacher, capsys):
    assert cli("tune-sigmas", "--checkpoint", tiny_teacher, "--steps", 2) == 2
    assert "edm teacher" in capsys.readouterr().err


def test_streamed_npy_equals_in_memory_samples(tmp_path, tiny_teacher):
    assert cli("train", "--method", "cd", "--data", "moons", "--teacher", tiny_teacher, *TINY_TRAIN, "--steps", 3,
               "--out", tmp_path / "cd") == 0
    args = ["sample", "--checkpoint", tmp_path / "cd", "--n", 50, "--steps", 2, "--batch-size", 16, "--quiet"]
    assert cli(*args, "--out", tmp_path / "streamed.npy") == 0
    assert cli(*args, "--out", tmp_path / "memory.npz") == 0
    streamed = np.load(tmp_path / "streamed.npy")
    np.testing.assert_array_equal(streamed, np.load(tmp_path / "memory.npz")["samples"])
    run = cmkit.load_run(tmp_path / "cd")
    np.testing.assert_array_equal(streamed, run.sample(50, steps=2, batch_size=16))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["memory.npz", "streamed.npy"]


def test_bf16_sampling_is_close_to_fp32(tmp_path, tiny_teacher):
    run = cmkit.load_run(tiny_teacher)
    exact = run.sample(2000, steps=4, seed=0)
    low = run.sample(2000, steps=4, seed=0, bf16=True)
    diff = np.abs(exact - low)
    assert diff.max() > 0  # bfloat16 was used
    assert diff.mean() < 0.02 * exact.std()
