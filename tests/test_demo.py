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


def test_an_interrupted_demo_finishes_with_resume_and_reuses_its_teacher(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the CD stage (a checkpoint at step 5 of 10), then `cmkit demo --resume`: the
    teacher is reused as it was, CD continues from step 5. Quick: few steps, 200 points scored and
    no figure drawn (the slow tests above judge those)."""
    import signal
    import cmkit.demo
    from cmkit.cli import main
    from cmkit.training import Trainer
    from helpers import tree_digest
    evaluate = cmkit.demo.evaluate_run
    monkeypatch.setattr(cmkit.demo, "evaluate_run", lambda *args, **kwargs: evaluate(*args, **{**kwargs, "n": 200}))
    monkeypatch.setattr(cmkit.demo, "_scatter_figure", lambda *args: args[3].write_bytes(b"figure"))
    out = tmp_path / "m"
    command = ["demo", "--steps", "20,10", "--out", str(out), "--quiet"]
    step, restore = Trainer.step, Trainer.restore

    def ctrl_c_in_cd(self, i):
        if self.config["method"] == "cd" and i == 4:
            self.stop_signal = signal.SIGINT  # as Ctrl-C does: this step finishes and a checkpoint is saved
        return step(self, i)

    monkeypatch.setattr(Trainer, "step", ctrl_c_in_cd)
    assert main(command, own_signals=True) == 130
    assert "continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "step", step)
    assert main(command) == 2 and "pass --resume" in capsys.readouterr().err  # nothing is lost by accident
    teacher = tree_digest(out / "teacher")
    restored = []
    monkeypatch.setattr(Trainer, "restore", lambda self, run_dir: restored.append(restore(self, run_dir)) or
                        restored[-1])
    assert main(["demo", "--out", str(out), "--resume"]) == 0  # to the steps each run was started with
    assert restored == [5]  # only CD trained, from its checkpoint
    assert "reusing" in capsys.readouterr().out
    assert {k: v for k, v in tree_digest(out / "teacher").items() if k in teacher} == teacher
    assert json.loads((out / "cd" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
    assert json.loads((out / "metrics.json").read_text())["cd"]["results"][0]["steps"] == 1
    assert (out / "demo.png").is_file()


def test_demo_refuses_other_data_and_bad_steps(tmp_path, capsys):
    from cmkit.cli import main
    assert main(["demo", "--data", "fashion-mnist", "--out", str(tmp_path / "x")]) == 2
    assert "the demo runs on" in capsys.readouterr().err
    assert main(["demo", "--steps", "10", "--out", str(tmp_path / "y")]) == 2
    assert "TEACHER,CD" in capsys.readouterr().err
