"""Crash safety: a process killed at any moment leaves a loadable newest checkpoint; SIGTERM and
SIGINT save one and stop, and the run resumes from it bit for bit; old checkpoints rotate."""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cmkit
import cmkit.checkpoint as ckpt
from cmkit.checkpoint import checkpoint_dir, load_weights, save_checkpoint
from helpers import TINY, cli, tree_digest

pytestmark = pytest.mark.slow  # the quick loop (pytest -m 'not slow') leaves these out

TRAIN = ["train", "--method", "edm", "--data", "moons", *TINY]


def start_training(run, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cmkit", *map(str, [*TRAIN, "--steps", 10**7, "--out", run, *extra])]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, run, timeout=120):
    deadline = time.monotonic() + timeout
    while not (run / "latest").is_file():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def newest_step(run) -> int:
    return json.loads((checkpoint_dir(run) / "state.json").read_text())["step"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_a_checkpoint_and_the_run_resumes_bit_for_bit(tmp_path, sig, code):
    run = tmp_path / "run"
    proc = start_training(run, "--set", "train.save_every=200", "--set", "train.log_every=1")
    wait_for_checkpoint(proc, run)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"stopped by {sig.name} at step" in lines[0] and "--resume" in lines[0]
    stopped = int(lines[0].split("at step ")[1].split(";")[0])
    assert newest_step(run) == stopped and stopped % 200 != 0  # saved where it stopped, not at a regular save

    end = stopped + 3
    assert cli("train", "--method", "edm", "--steps", end, "--resume", "--quiet", "--out", run) == 0
    assert cli(*TRAIN, "--set", "train.save_every=200", "--steps", end, "--out", tmp_path / "straight") == 0
    assert tree_digest(checkpoint_dir(run)) == tree_digest(checkpoint_dir(tmp_path / "straight"))
    assert tree_digest(run)["metrics.jsonl"] == tree_digest(tmp_path / "straight")["metrics.jsonl"]


def test_sigkill_at_random_moments_leaves_a_loadable_newest_checkpoint(tmp_path):
    # Saving every step makes checkpoint writes most of the run, so the kills land inside them.
    delays = random.Random(0).sample([i / 100 for i in range(60)], 3)
    for i, delay in enumerate(delays):
        run = tmp_path / f"run{i}"
        proc = start_training(run, "--set", "train.save_every=1", "--set", "train.keep_checkpoints=2")
        wait_for_checkpoint(proc, run)
        time.sleep(delay)
        assert proc.poll() is None
        proc.kill()
        proc.wait()
        step = newest_step(run)
        assert cmkit.load_run(run).sample(4, seed=0).shape == (4, 2)
        assert cli("train", "--method", "edm", "--steps", step + 2, "--resume", "--quiet", "--out", run) == 0
        assert newest_step(run) == step + 2
        assert len(list((run / "checkpoints").iterdir())) == 2  # rotation kept the newest two, stale folders gone


class Killed(BaseException):
    """A simulated SIGKILL: nothing after it runs, not even except/finally cleanup that catches Exception."""


def _modules(value: float):
    net = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(net.weight, value)
    opt = torch.optim.Adam(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": net}, opt


def test_a_kill_at_every_file_operation_of_a_save_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """Interrupt the k-th file operation of a save (for every k): the newest complete checkpoint is
    then the previous one or the new one, whole, and the next save cleans up."""
    ops = [(ckpt, "save_file"), (ckpt, "_fsync"), (ckpt.os, "replace"), (ckpt.shutil, "rmtree"),
           (ckpt, "atomic_write_text")]
    originals = {(owner, name): getattr(owner, name) for owner, name in ops}
    armed = {"left": None}

    def wrap(fn):
        def op(*args, **kwargs):
            if armed["left"] is not None:
                if armed["left"] == 0:
                    raise Killed
                armed["left"] -= 1
            return fn(*args, **kwargs)
        return op

    for (owner, name), fn in originals.items():
        monkeypatch.setattr(owner, name, wrap(fn))

    k = 0
    while True:
        run = tmp_path / f"k{k}"
        run.mkdir()
        saved = {}
        for step in (1, 2):  # two complete checkpoints (keep=2), then the interrupted third
            modules, opt = _modules(float(step))
            save_checkpoint(run, modules=modules, optimizer=opt, step=step, rng={}, keep=2)
            saved[step] = modules["model"].weight.detach().clone()
        modules, opt = _modules(3.0)
        saved[3] = modules["model"].weight.detach().clone()
        armed["left"] = k
        try:
            save_checkpoint(run, modules=modules, optimizer=opt, step=3, rng={}, keep=2)
            finished = True
        except Killed:
            finished = False
        armed["left"] = None
        step = newest_step(run)
        assert step in (2, 3)
        assert torch.equal(load_weights(run, "model")["weight"], saved[step])  # whole, not mixed
        modules, opt = _modules(4.0)  # the next save works and clears what the kill left
        save_checkpoint(run, modules=modules, optimizer=opt, step=4, rng={}, keep=2)
        assert newest_step(run) == 4
        assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step-0000004"
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        if finished:
            break
        k += 1
    assert k > 10  # the save has that many interruptible operations: the loop did test them


def test_checkpoints_rotate_and_latest_points_at_the_newest(tmp_path):
    run = tmp_path / "run"
    assert cli(*TRAIN, "--steps", 10, "--set", "train.save_every=2", "--set", "train.keep_checkpoints=3",
               "--out", run) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000006", "step-0000008", "step-0000010"]
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000010"
    # A newest checkpoint damaged on disk is passed over for the newest complete one.
    (run / "checkpoints" / "step-0000010" / "ema.safetensors").write_bytes(b"torn")
    assert newest_step(run) == 8
    # A run whose every checkpoint is damaged is refused with one line, not loaded.
    for folder in (run / "checkpoints").iterdir():
        (folder / "model.safetensors").unlink()
    with pytest.raises(cmkit.CmkitError, match="no complete checkpoint"):
        checkpoint_dir(run)
    shutil.rmtree(run)


LIBRARY_TEST = '''
import cmkit


def test_trains_for_a_long_time():
    config = cmkit.build_config("edm", **{{"data.name": "moons", "data.n": 400, "data.n_holdout": 200,
        "model.width": 32, "model.depth": 1, "model.emb_dim": 16, "train.batch_size": 32,
        "train.steps": 10**6, "train.save_every": 50}})
    cmkit.train(config, {out!r}, progress=False)

def test_after():
    pass
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_pytest_running_cmkit_train(tmp_path, sig):
    """Called as a library, training saves a checkpoint and hands the signal on: Ctrl-C interrupts
    pytest (status 2, the next test never runs) and SIGTERM ends it, within seconds."""
    run = tmp_path / "run"
    script = tmp_path / "test_long.py"
    script.write_text(LIBRARY_TEST.format(out=str(run)))
    # Ctrl-C as in a terminal: a shell running this suite in the background may have set SIGINT to
    # "ignore" for its children, and Python keeps that; restore Python's own handler first.
    launcher = ("import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); "
                f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(script)!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", launcher],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(proc, run)
    start = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - start < 10, out
    if sig == signal.SIGINT:
        assert proc.returncode == 2 and "KeyboardInterrupt" in out and "test_after" not in out, out
    else:
        assert proc.returncode == -signal.SIGTERM, (proc.returncode, out)
    assert newest_step(run) > 50  # saved where it stopped, after the regular save that we waited for
    assert cmkit.load_run(run).sample(2, seed=0).shape == (2, 2)
