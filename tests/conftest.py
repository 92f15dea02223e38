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
