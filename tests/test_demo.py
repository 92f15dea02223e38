"""`cmkit demo` end to end, as a newcomer runs it (shorter training: the checks have wide margins)."""

import json
import subprocess
import sys

import pytest
from PIL import Image


def demo(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cmkit", "demo", *map(str, args)], capture_output=True, text=True,
                          timeout=1200, cwd=cwd)


@pytest.mark.slow
def test_digits_demo_writes_an_annotated_figure_and_beats_an_untrained_network(tmp_path):
    done = demo("--data", "digits", "--steps", "300,200", "--out", tmp_path / "d")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    one_step = metrics["cd"]["results"][0]
    assert one_step["steps"] == 1 and one_step["fd"] < metrics["untrained_fd"] / 5, metrics
    assert metrics["teacher"]["results"][0]["nfe"] == 35
    with Image.open(tmp_path / "d" / "demo.png") as figure:
        assert figure.format == "PNG" and figure.width >= 1000
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in done.stdout
    assert "an untrained network of the same shape: FD" in done.stdout
    assert "fd" in done.stdout and "1 step" in done.stdout  # the table


@pytest.mark.slow
def test_moons_demo_reports_sw1_beside_the_floor(tmp_path):
    done = demo("--steps", "300,200", "--out", tmp_path / "m", "--quiet")
    assert done.returncode == 0 and done.stdout == "", done.stderr[-2000:]
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert metrics["cd"]["results"][0]["sw1"] > metrics["cd"]["floor"]["sw1"] > 0
    assert (tmp_path / "m" / "demo.png").is_file()
    again = demo("--steps", "300,200", "--out", tmp_path / "m")  # an existing demo is not overwritten
    assert again.returncode == 2 and "--force" in again.stderr


def test_demo_refuses_other_data_and_bad_steps(tmp_path, capsys):
    from cmkit.cli import main
    assert main(["demo", "--data", "fashion-mnist", "--out", str(tmp_path / "x")]) == 2
    assert "the demo runs on" in capsys.readouterr().err
    assert main(["demo", "--steps", "10", "--out", str(tmp_path / "y")]) == 2
    assert "TEACHER,CD" in capsys.readouterr().err
