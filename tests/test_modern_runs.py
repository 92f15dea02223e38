"""The objectives of issue 4 through the real command line, on vectors and images: each resumes
bit for bit (the sCM weighting head is checkpointed too) and refuses misuse with one line."""

import pytest

from cmkit.checkpoint import checkpoint_dir
from helpers import TINY, TINY_TRAIN, cli, tree_digest

IMAGE = ["--data", "digits", "--batch-size", "4", "--quiet", "--set", "train.sample_every=0",
         "--set", "train.save_every=2"]
SOURCES = {"ict": [], "meanflow": [], "ect": ["--init"], "sct": ["--init"], "scd": ["--teacher"], "tcm": ["--init"]}
# Curricula are fixed by the first start's --steps unless given; give them so that the 2-step start
# of the split run schedules like the 4-step straight run.
HORIZON = {"ict": ["--set", "objective.total_steps=4"], "ect": ["--set", "objective.total_steps=4"],
           "sct": ["--set", "objective.tangent_warmup=3"], "scd": ["--set", "objective.tangent_warmup=3"],
           "meanflow": [], "tcm": []}


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "edm"
    assert cli("train", "--method", "edm", "--steps", 2, "--out", out, "--set", "model.preset=tiny", *IMAGE) == 0
    return out


@pytest.fixture(scope="module")
def image_consistency(image_teacher, tmp_path_factory):
    """A 2-step ECT run of digits: TCM's stage 1."""
    out = tmp_path_factory.mktemp("img-cm") / "ect"
    assert cli("train", "--method", "ect", "--init", image_teacher, "--steps", 2, "--out", out, *IMAGE) == 0
    return out


@pytest.mark.parametrize("method", list(SOURCES))
def test_image_runs_resume_bit_exactly(method, image_teacher, tmp_path, request):
    start = request.getfixturevalue("image_consistency") if method == "tcm" else image_teacher
    source = [flag for f in SOURCES[method] for flag in (f, start)]
    model = [] if source else ["--set", "model.preset=tiny"]
    args = ["--method", method, *source, *model, *HORIZON[method], *IMAGE]
    assert cli("train", *args, "--steps", 4, "--out", tmp_path / "straight") == 0
    assert cli("train", *args, "--steps", 2, "--out", tmp_path / "split") == 0
    assert cli("train", "--method", method, "--resume", "--steps", 4, "--out", tmp_path / "split", "--quiet") == 0
    straight, split = tree_digest(checkpoint_dir(tmp_path / "straight")), tree_digest(checkpoint_dir(tmp_path / "split"))
    assert straight == split
    if method in ("sct", "scd"):
        assert "weighting.safetensors" in straight
    assert cli("sample", "--checkpoint", tmp_path / "straight", "--n", 2, "--steps", 2,
               "--out", tmp_path / "s.npz", "--quiet") == 0


def test_source_flags_are_checked(tiny_teacher, tmp_path, capsys):
    assert cli("train", "--method", "ict", "--init", tiny_teacher, "--data", "moons", "--steps", 2,
               "--out", tmp_path / "a", *TINY) == 2
    assert "--init is only for" in capsys.readouterr().err
    assert cli("train", "--method", "scd", "--data", "moons", "--steps", 2, "--out", tmp_path / "b", *TINY_TRAIN) == 2
    assert "needs a teacher" in capsys.readouterr().err
    assert cli("train", "--method", "sct", "--init", tiny_teacher, "--data", "moons", "--steps", 2,
               "--out", tmp_path / "c", *TINY) == 2  # TINY sets model.*: the init run decides those
    assert "takes its model from the --init run" in capsys.readouterr().err
    assert cli("train", "--method", "sct", "--init", tiny_teacher, "--data", "moons", "--steps", 2,
               "--out", tmp_path / "d", *TINY_TRAIN) == 0


def test_scm_warns_about_openai_time_input(image_teacher, tmp_path, capsys):
    """OpenAI's c_noise (the image default, for diffusers export) makes sCM's time derivative
    explode; the run says so and how to avoid it, and stays quiet for EDM's c_noise."""
    capsys.readouterr()
    assert cli("train", "--method", "sct", "--init", image_teacher, "--steps", 1, "--out", tmp_path / "a", *IMAGE) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "model.c_noise=edm" in err
    teacher = tmp_path / "edm-teacher"
    assert cli("train", "--method", "edm", "--steps", 1, "--out", teacher, "--set", "model.preset=tiny",
               "--set", "model.c_noise=edm", *IMAGE) == 0
    for method, flag in (("sct", "--init"), ("scd", "--teacher")):
        assert cli("train", "--method", method, flag, teacher, "--steps", 1, "--out", tmp_path / method, *IMAGE) == 0
    assert "warning" not in capsys.readouterr().err
