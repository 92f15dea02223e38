"""Device selection: `auto` takes a GPU when there is one, torchrun ranks take cuda:LOCAL_RANK with
NCCL (gloo on CPUs), a named device the machine lacks is a one-line error, and each run records
where it trained."""

import json

import pytest
import torch

from cmkit import distributed
from cmkit.checkpoint import read_run_config
from cmkit.devices import resolve_device
from cmkit.errors import CmkitError

from helpers import TINY, cli


def _pretend_gpus(monkeypatch, count: int):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_takes_cuda_when_there_is_one_else_mps_else_the_cpu(monkeypatch):
    _pretend_gpus(monkeypatch, 2)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    _pretend_gpus(monkeypatch, 0)
    monkeypatch.setattr("cmkit.devices.mps_available", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr("cmkit.devices.mps_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("name, words", [("cuda", "no CUDA device"), ("cuda:0", "no CUDA device"),
                                         ("mps", "no MPS device"), ("gpu", "must be cpu, cuda, cuda:N, mps or auto")])
def test_a_device_this_machine_lacks_is_an_error(monkeypatch, name, words):
    _pretend_gpus(monkeypatch, 0)
    monkeypatch.setattr("cmkit.devices.mps_available", lambda: False)
    with pytest.raises(CmkitError, match=words):
        resolve_device(name)


def test_a_gpu_index_past_the_last_gpu_is_an_error(monkeypatch):
    _pretend_gpus(monkeypatch, 2)
    with pytest.raises(CmkitError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("gpus, device, backend, rank_device", [(4, "auto", "nccl", "cuda:3"), (0, "auto", "gloo", "cpu"),
                                                                (4, "cpu", "gloo", "cpu")])
def test_under_torchrun_each_rank_takes_its_gpu_with_nccl(monkeypatch, gpus, device, backend, rank_device):
    _pretend_gpus(monkeypatch, gpus)
    joined = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda name: joined.append(name))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3"}.items():
        monkeypatch.setenv(key, value)
    world = distributed.world_from_env(device)
    assert joined == [backend] and world.rank == 3 and world.size == 4
    assert world.device(device) == rank_device


def test_train_defaults_to_auto_and_records_where_it_ran(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", out, *TINY[:-1]) == 0
    config = read_run_config(out)
    assert config["train"]["device"] == "auto"
    assert config["runtime"] == {"device": "cpu", "processes": 1, "precision": "fp32", "compile": False,
                                 "torch": torch.__version__}
    assert "cmkit: edm on cpu (1 process), fp32, compile off" in capsys.readouterr().err


def test_device_and_precision_options_and_a_run_moving_on_resume(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", out, "--device", "cpu",
               "--precision", "bf16", *TINY) == 0
    config = read_run_config(out)
    assert config["train"]["device"] == "cpu" and config["train"]["bf16"] is True
    assert config["runtime"]["precision"] == "bf16"
    _pretend_gpus(monkeypatch, 0)
    capsys.readouterr()
    assert cli("train", "--method", "edm", "--resume", "--steps", 3, "--out", out, "--device", "cuda", "--quiet") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device is available" in err[0]
    assert cli("train", "--method", "edm", "--resume", "--steps", 3, "--out", out, "--device", "auto", "--quiet") == 0
    assert read_run_config(out)["train"]["device"] == "auto"
    assert cli("train", "--method", "edm", "--resume", "--steps", 4, "--out", out, "--precision", "fp32") == 2
    assert "only --steps may be given, not --precision (and --device" in capsys.readouterr().err


def test_old_runs_that_say_cpu_keep_meaning_cpu(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", out, *TINY) == 0
    saved = read_run_config(out)
    saved["train"]["device"] = "cpu"
    saved.pop("runtime")  # as main wrote them before runs recorded it
    (out / "config.json").write_text(json.dumps(saved))
    _pretend_gpus(monkeypatch, 1)  # a GPU appears: the run still resumes on the CPU
    assert cli("train", "--method", "edm", "--resume", "--steps", 3, "--out", out, "--quiet") == 0
    assert read_run_config(out)["runtime"]["device"] == "cpu"
