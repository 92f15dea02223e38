"""Exact resume: an interrupted run continued with --resume ends bit for bit where an unbroken
run does (weights, EMA, target, optimizer, RNG and the metrics log), on CPU."""

import json

import pytest
import torch

import cmkit.objectives.consistency as consistency
import cmkit.objectives.edm as edm
from cmkit.checkpoint import checkpoint_dir
from cmkit.cli import main
from helpers import TINY, TINY_TRAIN, cli, tree_digest

STEPS = 8


@pytest.fixture
def teacher(tiny_teacher):
    return tiny_teacher


def _interrupt_at(monkeypatch, cls, step_to_fail):
    original = cls.draw

    def flaky(self, *args, step=0, **kwargs):
        if step == step_to_fail:
            raise KeyboardInterrupt
        return original(self, *args, step=step, **kwargs)

    monkeypatch.setattr(cls, "draw", flaky)


def _comparable(run):
    """The newest checkpoint's files, the metrics log and the `latest` pointer."""
    digest = {f"newest/{k}": v for k, v in tree_digest(checkpoint_dir(run)).items()}
    for name in ("metrics.jsonl", "latest"):
        digest[name] = tree_digest(run)[name]
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
    # As the `cmkit` program (which owns its signals): Ctrl-C is exit status 130. From Python it
    # would reach the caller as KeyboardInterrupt (tests/test_crash_safety.py).
    assert main([str(a) for a in [*common, "--out", tmp_path / "split"]], own_signals=True) == 130
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


def _poison(monkeypatch, bad_steps, kind="loss"):
    """Make the EDM loss NaN (kind "loss") or its gradient NaN with a finite loss ("grad") at ``bad_steps``."""
    draw, loss_of = edm.EDMLoss.draw, edm.EDMLoss.loss

    def marked(self, x0, *, step=0, **kwargs):
        return {**draw(self, x0, step=step, **kwargs), "bad": step in bad_steps}

    def poisoned(self, net, x0, draws, **kwargs):
        loss, extra = loss_of(self, net, x0, draws, **kwargs)
        if draws["bad"]:
            if kind == "loss":
                loss = loss * float("nan")
            else:  # sqrt'(0) is inf: a finite loss whose gradient is not
                loss = loss + torch.sqrt(sum((p - p.detach()).sum() for p in net.parameters()))
        return loss, extra

    monkeypatch.setattr(edm.EDMLoss, "draw", marked)
    monkeypatch.setattr(edm.EDMLoss, "loss", poisoned)


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_bad_steps_are_skipped_and_counted(tmp_path, monkeypatch, kind):
    common = ["train", "--method", "edm", "--data", "moons", "--steps", 6, *TINY]
    assert cli(*common, "--out", tmp_path / "clean") == 0
    _poison(monkeypatch, {2, 3}, kind)
    assert cli(*common, "--out", tmp_path / "poisoned") == 0
    records = [json.loads(line) for line in (tmp_path / "poisoned" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in records] == [False, False, True, True, False, False]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 2, 2, 2]
    clean = [json.loads(line) for line in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["loss"] == clean[1]["loss"]  # the same run up to the bad steps
    from cmkit.checkpoint import load_weights
    weights = load_weights(tmp_path / "poisoned", "model")
    assert all(torch.isfinite(w).all() for w in weights.values())  # nothing bad reached the weights


def test_too_many_bad_steps_in_a_row_stop_training_and_keep_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {5, 6, 7})
    run = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 8, "--set", "train.save_every=4",
               "--set", "train.max_bad_steps=2", "--out", run, *TINY) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NaN or inf for 3 steps in a row (up to step 8)" in err[0] and "intact" in err[0]
    monkeypatch.undo()
    assert json.loads((checkpoint_dir(run) / "state.json").read_text())["step"] == 4
    assert cli("train", "--method", "edm", "--steps", 8, "--out", run, "--resume", "--quiet") == 0


def test_metrics_log_and_tensorboard(tmp_path, monkeypatch, capsys):
    """Each metrics.jsonl record has the loss, lr, gradient norm, skipped steps, throughput and peak
    memory; with train.tensorboard the same scalars go to a SummaryWriter (faked here, so the test
    needs no tensorboard install), and without the package the run stops with the install hint."""
    import sys
    import types

    written = []

    class FakeWriter:
        def __init__(self, log_dir):
            written.append(("dir", log_dir))

        def add_scalar(self, key, value, step):
            written.append((key, value, step))

        def close(self):
            written.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    args = ["train", "--method", "edm", "--data", "moons", "--steps", 3, *TINY, "--set", "train.tensorboard=true"]
    assert cli(*args, "--out", tmp_path / "run") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["images_per_s"] > 0 and r["max_memory_mb"] > 10 and r["grad_norm"] > 0 and r["lr"] > 0
        assert r["skipped_steps"] == 0 and r["loss"] > 0
    assert written[0] == ("dir", str(tmp_path / "run" / "tensorboard")) and written[-1] == ("closed",)
    assert ("loss", records[2]["loss"], 3) in written and ("images_per_s", records[0]["images_per_s"], 1) in written

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    assert cli(*args, "--out", tmp_path / "run2") == 2
    assert "pip install tensorboard" in capsys.readouterr().err and not (tmp_path / "run2").exists()
