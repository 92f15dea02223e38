"""Exact resume: an interrupted run continued with --resume ends bit for bit where an unbroken
run does (weights, EMA, target, optimizer, RNG and the metrics log), on CPU."""

import json

import pytest

import cmkit.objectives.consistency as consistency
import cmkit.objectives.edm as edm
from helpers import TINY, TINY_TRAIN, cli, tree_digest

STEPS = 8


@pytest.fixture
def teacher(tiny_teacher):
    return tiny_teacher


def _interrupt_at(monkeypatch, cls, step_to_fail):
    original = cls.__call__

    def flaky(self, *args, step=0, **kwargs):
        if step == step_to_fail:
            raise KeyboardInterrupt
        return original(self, *args, step=step, **kwargs)

    monkeypatch.setattr(cls, "__call__", flaky)


def _comparable(run):
    digest = tree_digest(run)
    digest.pop("config.json")  # records the teacher path / run-specific details
    return digest


@pytest.mark.parametrize("method, cls", [("edm", edm.EDMLoss), ("ct", consistency.ConsistencyTrainingLoss),
                                         ("cd", consistency.ConsistencyLoss)])
def test_interrupted_then_resumed_equals_unbroken(tmp_path, monkeypatch, teacher, method, cls, capsys):
    model_args = [*TINY, "--set", "model.dropout=0.2"] if method != "cd" else TINY_TRAIN  # dropout: global RNG
    extra = ["--teacher", teacher] if method == "cd" else []
    common = ["train", "--method", method, "--data", "moons", "--steps", STEPS, "--set", "train.save_every=4",
              *extra, *model_args]
    assert cli(*common, "--out", tmp_path / "straight") == 0

    _interrupt_at(monkeypatch, cls, step_to_fail=6)  # after the checkpoint at step 4
    assert cli(*common, "--out", tmp_path / "split") == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert cli("train", "--method", method, "--steps", STEPS, "--out", tmp_path / "split", "--resume", "--quiet") == 0

    straight, split = _comparable(tmp_path / "straight"), _comparable(tmp_path / "split")
    assert set(straight) == set(split)
    assert straight == split


def test_resume_extends_a_finished_run(tmp_path):
    # log_every = 3 does not divide the split point: the log must still match an unbroken run's.
    args = ["train", "--method", "edm", "--data", "moons", *TINY, "--set", "train.log_every=3"]
    assert cli(*args, "--steps", 8, "--out", tmp_path / "straight") == 0
    assert cli(*args, "--steps", 4, "--out", tmp_path / "split") == 0
    assert cli("train", "--method", "edm", "--steps", 8, "--out", tmp_path / "split", "--resume", "--quiet") == 0
    assert _comparable(tmp_path / "straight") == _comparable(tmp_path / "split")


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    original = edm.EDMLoss.__call__

    def poisoned(self, *args, step=0, **kwargs):
        loss, extra = original(self, *args, step=step, **kwargs)
        return (loss * float("nan") if step == 5 else loss), extra

    monkeypatch.setattr(edm.EDMLoss, "__call__", poisoned)
    run = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 8, "--set", "train.save_every=4",
               "--out", run, *TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cmkit: error: loss became nan at step 5; the last checkpoint is intact: lower --lr or check the data"]
    monkeypatch.undo()
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 4
    assert cli("train", "--method", "edm", "--steps", 8, "--out", run, "--resume", "--quiet") == 0
