"""train.compile: one compiled loss per step for every method, equal to the eager step in loss and
gradients; every network pass compiled but the autograd JVP's; no recompiles as the schedule
moves; shared dropout masks survive compilation; the kernel cache follows the run.

Most tests compile with AOTAutograd's ``aot_eager`` backend: the graphs dynamo captures and the
backward AOTAutograd derives, run without inductor's C++ code generation (seconds, not minutes).
One test compiles for real with inductor."""

import json
import os

import pytest
import torch

from cmkit import compiled_step
from cmkit.checkpoint import read_run_config
from cmkit.config import build_config
from cmkit.objectives import get_method
from cmkit.objectives.rng import SharedRNG
from cmkit.training import Trainer

from helpers import TINY, cli

pytestmark = pytest.mark.slow  # the quick loop (pytest -m 'not slow') leaves these out

METHODS = ["edm", "cd", "ct", "ict", "ect", "sct", "scd", "tcm", "meanflow"]
SMALL = {"data.name": "moons", "data.n": 400, "data.n_holdout": 200, "train.batch_size": 32, "train.log_every": 1}
SMALL_MODEL = {"model.width": 32, "model.depth": 1, "model.emb_dim": 16}


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend (the trainer's inductor options dropped)."""
    import torch._dynamo
    torch._dynamo.reset()
    compile_for_real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_for_real(fn, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def _config(method: str, teacher, compiled: bool, **extra) -> dict:
    spec = get_method(method)
    sources = {"teacher": str(teacher)} if spec.teacher else {"init": str(teacher)} if spec.init else {}
    model = {} if sources else SMALL_MODEL
    return build_config(method, **SMALL, **model, **sources, **{"train.steps": 4, "train.compile": compiled}, **extra)


def _networks(trainer: Trainer) -> list:
    """The backbones a step runs: the online network's and the teacher's."""
    teacher = getattr(trainer.objective, "teacher", None) or getattr(trainer.objective, "stage1", None)
    return [trainer.net.backbone] + ([teacher.backbone] if teacher is not None else [])


def _gradients(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in trainer.optimizer.param_groups[0]["params"] if p.grad is not None])


def _steps_agree(eager: Trainer, compiled: Trainer, counters, steps: int = 4) -> list:
    """Train both for ``steps`` steps, checking that losses, gradients and logs agree; the number
    of graphs dynamo has compiled after each step."""
    graphs = []
    for step in range(steps):
        a, b = eager.step(step), compiled.step(step)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-9), f"step {step}"
        ga, gb = _gradients(eager), _gradients(compiled)
        assert (gb - ga).norm() <= 1e-4 * ga.norm() + 1e-9, f"step {step}: gradients differ"
        assert set(a) == set(b) and all(b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6)
                                         for k in a if k not in ("loss", "grad_norm"))
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


@pytest.mark.parametrize("method", METHODS)
def test_the_compiled_step_equals_the_eager_one_and_compiles_every_network_pass(method, tiny_teacher, aot_eager,
                                                                                 request):
    from torch._dynamo.utils import counters
    if get_method(method).frozen_init:  # TCM continues a consistency run
        tiny_teacher = request.getfixturevalue("tiny_consistency")
    eager, compiled = (Trainer(_config(method, tiny_teacher, c)) for c in (False, True))
    graphs = _steps_agree(eager, compiled, counters)
    assert graphs[-1] == graphs[0], f"{method} recompiled as the schedule moved: {graphs}"
    # Every network pass of a step, as (inside a compiled graph, with gradients), on a trainer of
    # its own, traced afresh (dynamo does not guard on hooks, and guards on the recording list).
    torch._dynamo.reset()
    hooked, passes = Trainer(_config(method, tiny_teacher, True)), []
    for network in _networks(hooked):
        network.register_forward_pre_hook(
            lambda module, args: passes.append((torch.compiler.is_compiling(), torch.is_grad_enabled())))
    hooked.step(0)
    assert passes and all(inside for inside, grad in passes if grad), "a pass with gradients ran eager"
    eager_passes = [inside for inside, grad in passes if not inside]
    # The autograd JVP's one forward pass runs eager; every other pass is compiled.
    assert len(eager_passes) == (1 if get_method(method).time_derivative else 0), passes


def test_images_compiled_step_with_the_unet_jvp_and_attention(tmp_path, aot_eager):
    """sCT on the UNet (GroupNorm, attention, the forward-AD-safe swap inside the eager JVP)."""
    assert cli("train", "--method", "edm", "--data", "digits", "--steps", 1, "--out", tmp_path / "edm", "--quiet",
               "--set", "model.c_noise=edm", "--set", "train.batch_size=8", "--set", "train.sample_every=0",
               "--set", "model.preset=tiny", "--set", "model.attention=[4]", "--set", "model.dropout=0.0") == 0
    eager, compiled = (Trainer(build_config("sct", **{"init": str(tmp_path / "edm"), "data.name": "digits",
                                                      "train.batch_size": 8, "train.sample_every": 0,
                                                      "train.compile": c}))
                       for c in (False, True))
    for step in range(2):
        a, b = eager.step(step), compiled.step(step)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        ga, gb = _gradients(eager), _gradients(compiled)
        assert (gb - ga).norm() <= 1e-3 * ga.norm()


def test_inductor_keeps_the_target_and_online_passes_dropout_masks_shared():
    """Inductor itself (C++ kernels): the RNG replay between two passes through dropout gives both
    the same mask inside the compiled loss, as it does eager."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Dropout(0.5), torch.nn.Linear(64, 16))

    def loss(x):
        with torch.no_grad():
            rng = SharedRNG(x.device)
            target = net(x)
        rng.replay()
        return (net(x) - target).square().mean()

    def unshared(x):
        with torch.no_grad():
            target = net(x)
        return (net(x) - target).square().mean()

    x = torch.randn(32, 16)
    assert compiled_step.compile_loss(loss)(x).item() == 0.0
    assert compiled_step.compile_loss(unshared)(x).item() > 0.0  # the masks would differ without the replay


def test_the_kernel_cache_lives_in_the_run_unless_the_user_chose_a_place(tmp_path, monkeypatch):
    monkeypatch.delenv(compiled_step.CACHE_ENV, raising=False)
    monkeypatch.setattr(compiled_step, "_cache_set_by_cmkit", None)
    assert compiled_step.use_run_cache(tmp_path / "a") == str(tmp_path / "a" / "compile_cache")
    # The next run of the same process moves it along; a user's own setting is kept.
    assert compiled_step.use_run_cache(tmp_path / "b") == str(tmp_path / "b" / "compile_cache")
    monkeypatch.setenv(compiled_step.CACHE_ENV, str(tmp_path / "mine"))
    assert compiled_step.use_run_cache(tmp_path / "c") == str(tmp_path / "mine")


def test_a_compiled_image_run_keeps_its_kernels_in_its_directory(tmp_path, monkeypatch, aot_eager):
    """Importing diffusers loads dynamo, which creates the cache folder: the run must set it only
    once its directory is in place (else a new run finds its directory 'already exists')."""
    monkeypatch.delenv(compiled_step.CACHE_ENV, raising=False)
    monkeypatch.setattr(compiled_step, "_cache_set_by_cmkit", None)
    out = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "digits", "--steps", 1, "--out", out, "--compile", "--quiet",
               "--set", "model.preset=tiny", "--set", "train.batch_size=8", "--set", "train.sample_every=0") == 0
    assert os.environ[compiled_step.CACHE_ENV] == str(out.resolve() / "compile_cache")
    assert read_run_config(out)["runtime"]["compile"] == "default"


def test_compile_options_on_the_command_line_and_on_resume(tmp_path, capsys, aot_eager):
    out = tmp_path / "run"
    args = ("train", "--method", "edm", "--data", "moons", "--out", out, *TINY)
    assert cli(*args, "--steps", 2, "--set", "train.compile_mode=fastest") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.compile_mode must be one of default, reduce-overhead" in err[0]
    assert cli(*args, "--steps", 2) == 0
    # A run may move to a machine where it compiles (and back): the step after is the same step.
    assert cli("train", "--method", "edm", "--resume", "--steps", 4, "--out", out, "--compile", "--quiet") == 0
    config = read_run_config(out)
    assert config["train"]["compile"] is True and config["runtime"]["compile"] == "default"
    reference = tmp_path / "reference"
    assert cli("train", "--method", "edm", "--data", "moons", "--out", reference, *TINY, "--steps", 4) == 0
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in expected], rel=1e-5)


def test_a_guided_step_compiles_with_its_condition_as_inputs(tmp_path, aot_eager):
    """The condition (labels and per-sample guidance scales) enters the compiled loss as a pytree
    of tensors: the same loss and gradients as eager, and no recompile as the labels change."""
    import numpy as np
    from torch._dynamo.utils import counters
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    np.savez(tmp_path / "blobs.npz", x=np.stack([y, -y], 1) + 0.3 * rng.standard_normal((600, 2)), labels=y)
    assert cli("train", "--method", "edm", "--data", tmp_path / "blobs.npz", "--label-dropout", 0.2, *TINY,
               "--steps", 3, "--out", tmp_path / "edm") == 0
    data = {**SMALL, "data.name": str(tmp_path / "blobs.npz")}
    eager, compiled = (Trainer(build_config("cd", **data, teacher=str(tmp_path / "edm"), **{
        "objective.guidance": [1.0, 3.0], "train.steps": 4, "train.compile": c})) for c in (False, True))
    graphs = _steps_agree(eager, compiled, counters)
    assert graphs[-1] == graphs[0], f"recompiled as the labels changed: {graphs}"
