"""Run directories, sampling and evaluation through the command line and the API."""

import json
import pickle

import numpy as np
import pytest
import torch

import cmkit
from cmkit import checkpoint
from cmkit.data import TOY_TRUTH
from cmkit.evaluate import evaluate_run
from cmkit.checkpoint import checkpoint_dir
from helpers import TINY, TINY_TRAIN, cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    assert cli("train", "--method", "edm", "--data", "gaussian", "--steps", 30, "--out", tmp / "edm", *TINY) == 0
    assert cli("train", "--method", "cd", "--data", "gaussian", "--teacher", tmp / "edm", "--steps", 5,
               "--lr", 1e-12, "--out", tmp / "cd", *TINY_TRAIN) == 0
    return tmp


def test_run_directory_layout_and_config(runs):
    cfg = json.loads((runs / "cd" / "config.json").read_text())
    teacher_cfg = json.loads((runs / "edm" / "config.json").read_text())
    assert cfg["model"] == teacher_cfg["model"] and cfg["noise"] == teacher_cfg["noise"]
    assert cfg["standardizer"] == teacher_cfg["standardizer"]
    files = {p.name for p in checkpoint_dir(runs / "cd").iterdir()}
    assert {"model.safetensors", "ema.safetensors", "target.safetensors", "optimizer.safetensors",
            "rng.safetensors", "state.json", "optimizer.json"} <= files
    lines = (runs / "cd" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5]


def test_cd_student_starts_from_the_teacher(runs):
    # With lr ~ 0 the student's backbone is still the teacher's EMA backbone.
    teacher, student = cmkit.load_run(runs / "edm"), cmkit.load_run(runs / "cd", weights="model")
    for (name, a), b in zip(teacher.model.backbone.state_dict().items(), student.model.backbone.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=0, msg=name)


def test_loading_never_unpickles(runs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    cmkit.load_run(runs / "cd").sample(3)
    checkpoint.load_training_state(runs / "cd")


def test_same_seed_same_samples_and_noise_file_parity(runs, tmp_path):
    for name in ("edm", "cd"):
        a, b, c = (tmp_path / f"{name}{i}.npy" for i in range(3))
        assert cli("sample", "--checkpoint", runs / name, "--n", 50, "--seed", 7, "--out", a, "--quiet") == 0
        assert cli("sample", "--checkpoint", runs / name, "--n", 50, "--seed", 7, "--out", b, "--quiet") == 0
        np.testing.assert_array_equal(np.load(a), np.load(b))
        noise = torch.randn(50, 2, generator=torch.Generator().manual_seed(7)).numpy()
        np.save(tmp_path / "z.npy", noise)
        assert cli("sample", "--checkpoint", runs / name, "--n", 50, "--noise", tmp_path / "z.npy",
                   "--out", c, "--quiet") == 0
        np.testing.assert_array_equal(np.load(a), np.load(c))  # the seed's noise is that same draw
        if name == "cd":  # multistep: re-noising draws must not depend on where the start came from
            run = cmkit.load_run(runs / name)
            np.testing.assert_array_equal(run.sample(50, steps=3, seed=7),
                                          run.sample(50, steps=3, seed=7, noise=noise))
        other = cmkit.load_run(runs / name).sample(50, seed=8)
        assert not np.allclose(np.load(a), other)


def test_multistep_uses_the_given_levels(runs, monkeypatch):
    run = cmkit.load_run(runs / "cd")
    seen = []
    forward = run.model.forward
    monkeypatch.setattr(run.model, "forward", lambda x, s, c=None: (seen.append(float(s)), forward(x, s, c))[1])
    run.sample(4, sigmas=[40.0, 2.0, 0.5])
    assert seen == pytest.approx([40.0, 2.0, 0.5])
    seen.clear()
    run.sample(4, steps=2)
    assert seen == pytest.approx([80.0, 0.8])


def test_churn_from_the_command_line_is_seeded_and_teacher_only(runs, tmp_path, capsys):
    outs = [tmp_path / f"c{i}.npy" for i in range(3)]
    for out, seed in zip(outs, (1, 1, 2)):
        assert cli("sample", "--checkpoint", runs / "edm", "--n", 20, "--steps", 10, "--s-churn", 20,
                   "--seed", seed, "--out", out, "--quiet") == 0
    np.testing.assert_array_equal(np.load(outs[0]), np.load(outs[1]))
    assert not np.allclose(np.load(outs[0]), np.load(outs[2]))
    plain = cmkit.load_run(runs / "edm").sample(20, steps=10, seed=1)
    assert not np.allclose(np.load(outs[0]), plain)  # churn did change the trajectory
    assert cli("sample", "--checkpoint", runs / "cd", "--n", 5, "--s-churn", 5, "--out", outs[0]) == 2
    assert "only to the Heun sampler of a teacher run" in capsys.readouterr().err


def test_png_scatter_plot(runs, tmp_path):
    assert cli("sample", "--checkpoint", runs / "cd", "--n", 200, "--out", tmp_path / "s.png", "--quiet") == 0
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_eval_compares_with_held_out_data_in_data_units(runs, tmp_path, monkeypatch):
    # A "model" that samples the true law must score at the floor; a shifted one must not.
    truth = TOY_TRUTH["gaussian"]
    scores = {}
    for name, shift in (("true", 0.0), ("shifted", np.array([0.5, -0.5]))):
        monkeypatch.setattr(cmkit.run.Run, "sample", lambda self, n, steps=None, seed=0, **k:
                            truth.sample(n, torch.Generator().manual_seed(seed + 100)).numpy() + shift)
        result = evaluate_run(str(runs / "cd"), steps=[1], n=3000)
        scores[name], floor = result["results"][0], result["floor"]
    assert result["n"] == 200  # capped by the run's 200 held-out points
    assert abs(scores["true"]["sw1"] - floor["sw1"]) < 0.05
    assert scores["shifted"]["sw1"] > floor["sw1"] + 0.15
    assert abs(scores["true"]["true_nll"] - floor["true_nll"]) < 0.3
    assert scores["shifted"]["true_nll"] > floor["true_nll"] + 1.5
    monkeypatch.undo()
    assert cli("eval", "--checkpoint", runs / "cd", "--steps", "1,2", "--n", 300, "--out", tmp_path / "e.json", "--quiet") == 0
    saved = json.loads((tmp_path / "e.json").read_text())
    assert [r["steps"] for r in saved["results"]] == [1, 2] and saved["n"] == 200


def test_legacy_checkpoint_swap_recovers_the_old_copy(runs, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(runs / "edm", run)
    # A run in the layout before rotating checkpoints (one RUN/checkpoint/), cut between the two
    # renames of its old swap: the old copy is found.
    checkpoint_dir(run).rename(run / ".checkpoint.old")
    shutil.rmtree(run / "checkpoints")
    (run / "latest").unlink()
    assert cmkit.load_run(run).sample(2).shape == (2, 2)


def test_tabular_csv_pipeline_returns_samples_in_data_units(tmp_path):
    # 5-D data on very different scales: samples must come back in those units.
    rng = np.random.default_rng(0)
    scale, shift = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([10.0, 0.0, -10.0, 100.0, 0.0])
    np.savetxt(tmp_path / "tab.csv", rng.standard_normal((3000, 5)) * scale + shift, delimiter=",",
               header="a,b,c,d,e", comments="")
    assert cli("train", "--method", "edm", "--data", tmp_path / "tab.csv", "--steps", 400,
               "--out", tmp_path / "t", "--quiet") == 0
    x = cmkit.load_run(tmp_path / "t").sample(4000, steps=18, seed=0)
    assert x.shape == (4000, 5)
    np.testing.assert_allclose(x.mean(0), shift, atol=0.15 * scale.max())
    np.testing.assert_allclose(x.std(0), scale, rtol=0.2)
    result = evaluate_run(str(tmp_path / "t"), steps=[18], n=300)
    assert result["n"] == 300 and result["data"] == str(tmp_path / "tab.csv")
