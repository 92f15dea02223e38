import shutil
import subprocess

import pytest
import torch

from helpers import TINY, cli

TINY_TEACHER_STEPS = 10


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A tiny EDM run on moons (shared; tests must not modify it)."""
    out = tmp_path_factory.mktemp("tiny") / "teacher"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", TINY_TEACHER_STEPS, "--out", out, *TINY) == 0
    return out


@pytest.fixture(scope="session")
def tiny_consistency(tiny_teacher, tmp_path_factory):
    """A tiny CD model of moons from `tiny_teacher`: a stage-1 run for TCM (shared; not modified)."""
    out = tmp_path_factory.mktemp("tiny-cm") / "cd"
    assert cli("train", "--method", "cd", "--teacher", tiny_teacher, "--data", "moons", "--steps", 4, "--out", out,
               *TINY[6:]) == 0
    return out


@pytest.fixture(scope="session")
def image_run(tmp_path_factory):
    """A class-conditional CD model of 8x8 digits, trained with label dropout (a few steps; shared:
    tests must not modify it)."""
    tmp = tmp_path_factory.mktemp("serve")
    digits = ["--data", "digits", "--batch-size", "8", "--quiet", "--set", "train.sample_every=0"]
    assert cli("train", "--method", "edm", *digits, "--set", "model.preset=tiny", "--label-dropout", 0.1,
               "--steps", 3, "--out", tmp / "edm") == 0
    assert cli("train", "--method", "cd", *digits, "--label-dropout", 0.1, "--teacher", tmp / "edm", "--steps", 3,
               "--out", tmp / "cd") == 0
    return tmp / "cd"


def _fashion_mnist_installed() -> bool:
    from cmkit.data.images import FASHION_MNIST_DIR, FASHION_MNIST_ENV
    import os
    from pathlib import Path
    root = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    return (root / "t10k-images-idx3-ubyte.gz").is_file() or (root / "t10k-images-idx3-ubyte").is_file()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``fashion_mnist`` need the Debian package dataset-fashion-mnist. Without it
    they are skipped with that reason, except where CMKIT_REQUIRE_DATA=1 (CI), where they fail."""
    import os
    if _fashion_mnist_installed() or os.environ.get("CMKIT_REQUIRE_DATA") == "1":
        return
    skip = pytest.mark.skip(reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist")
    for item in items:
        if item.get_closest_marker("fashion_mnist"):
            item.add_marker(skip)


@pytest.fixture
def no_external_programs(monkeypatch):
    """A decoder that tries to run a program (Pillow's EPS reader runs Ghostscript) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"an image decoder tried to run a program: {args[:1]}")
    for name in ("Popen", "run", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, refuse)
    monkeypatch.setattr(shutil, "which", refuse)
