"""Data-parallel training: 2 gloo processes under torchrun train the same model as 1 process with
the same seed and global batch (to float rounding), resume bit for bit, and gradient accumulation
matches one pass over the whole batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from cmkit.checkpoint import checkpoint_dir, load_weights
from helpers import TINY, TINY_TRAIN, cli, tree_digest

pytestmark = pytest.mark.slow  # the quick loop (pytest -m 'not slow') leaves these out

STEPS = 20


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cmkit", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def assert_same_weights(a, b, names, atol=1e-6):
    for name in names:
        wa, wb = load_weights(a, name), load_weights(b, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-5, msg=f"{name}.{key}")


def losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


# sCT: a JVP objective (torch.func.jvp); TCM: a frozen stage-1 model and a boundary subset of the global batch
@pytest.mark.parametrize("method", ["cd", "sct", "tcm"])
def test_two_processes_train_what_one_does(method, tiny_teacher, tmp_path, request):
    source = {"cd": ["--teacher", tiny_teacher], "sct": TINY[:6],
              "tcm": ["--init", request.getfixturevalue("tiny_consistency")] if method == "tcm" else []}[method]
    args = ["train", "--method", method, "--data", "moons", *source, *TINY_TRAIN, "--steps", STEPS]
    assert cli(*args, "--out", tmp_path / "one") == 0
    torchrun(*args, "--out", tmp_path / "two")
    names = {"cd": ["model", "ema", "target"], "sct": ["model", "ema", "weighting"], "tcm": ["model", "ema"]}[method]
    assert_same_weights(tmp_path / "one", tmp_path / "two", names)
    # Rank 0 alone logged: one line per step, with the global batch's loss.
    assert [json.loads(line)["step"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()] \
        == list(range(1, STEPS + 1))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-4, atol=1e-7)
    if method == "cd":  # exact resume on several processes: 10 steps, then --resume to 20, bit for bit
        torchrun(*args[:-1], STEPS // 2, "--out", tmp_path / "split")
        torchrun("train", "--method", method, "--steps", STEPS, "--resume", "--quiet", "--out", tmp_path / "split")
        assert tree_digest(checkpoint_dir(tmp_path / "two")) == tree_digest(checkpoint_dir(tmp_path / "split"))


def test_gradient_accumulation_matches_one_pass(tmp_path):
    args = ["train", "--method", "edm", "--data", "moons", *TINY, "--steps", 10]
    assert cli(*args, "--out", tmp_path / "one") == 0
    assert cli(*args, "--set", "train.grad_accum=4", "--out", tmp_path / "four") == 0
    assert_same_weights(tmp_path / "one", tmp_path / "four", ["model", "ema"])
    # ... and a different batch is a different run (the comparison can fail).
    assert cli(*args, "--batch-size", 16, "--out", tmp_path / "other") == 0
    with pytest.raises(AssertionError):
        assert_same_weights(tmp_path / "one", tmp_path / "other", ["model"])


def test_batch_must_split_evenly(tmp_path, capsys):
    assert cli("train", "--method", "edm", "--data", "moons", *TINY, "--steps", 2, "--set", "train.grad_accum=3",
               "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must divide evenly over 1 process(es) x 3" in err[0]
    assert not (tmp_path / "run").exists()
