"""The method registry is the one list of methods; a method added in a test trains, resumes and
samples through the command line with no other change; configs are values (train.compile:
tests/test_compile.py)."""

import ast
import copy
import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import cmkit
from cmkit.batch_rng import batch_rng
from cmkit.checkpoint import load_weights, read_run_config
from cmkit.cli import build_parser
from cmkit.config import build_config
from cmkit.noise import broadcast_to_batch
from cmkit.objectives import MethodSpec, Objective, get_method, method_names, methods, register, unregister
from cmkit.objectives.registry import CONSISTENCY_FUNCTIONS, methods_table, objective_options
from cmkit.precond import ConsistencyFunction

from helpers import TINY, cli

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"data.name": "moons", "data.n": 400, "data.n_holdout": 200, "train.batch_size": 32, "train.log_every": 1}
SMALL_MODEL = {"model.width": 32, "model.depth": 1, "model.emb_dim": 16}


def _method_choices() -> tuple:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return tuple(next(a for a in sub.choices["train"]._actions if a.dest == "method").choices)


def test_the_command_line_offers_exactly_the_registry():
    assert _method_choices() == method_names()
    assert set(method_names()) == {"edm", "cd", "ct", "ict", "ect", "sct", "scd", "tcm", "meanflow", "lcm", "lcm-lora"}


def test_the_config_files_are_exactly_the_registry():
    files = {p.name[:-len(".json")] for p in resources.files("cmkit").joinpath("configs").iterdir()
             if p.name.endswith(".json")}
    assert files - {"base", "images"} == set(method_names())
    for name, spec in methods().items():  # each file holds only differences, with its source
        own = json.loads(spec.defaults_file())
        assert own.get("_source"), f"{name}.json does not say where its values come from"
        assert not {"data", "noise"} & set(own), f"{name}.json repeats a shared section"


def test_the_docs_table_is_the_registry():
    text = (ROOT / "docs" / "methods.md").read_text()
    assert methods_table() in text
    rows = [line.split("|")[1].strip(" `") for line in methods_table().splitlines()[2:]]
    assert rows == list(method_names())


# Strings equal to a method's name that are not methods: EDM's c_noise convention.
NOT_A_METHOD = {("noise.py", "edm"), ("precond.py", "edm"), ("run.py", "edm")}


def test_no_module_outside_the_objectives_names_a_method():
    """Export, serve, the CLI, the trainer and Run read the registry; only the objectives (where
    the specs live) and the demo (a fixed recipe, like a user's script) name methods."""
    names = set(method_names())
    src = ROOT / "src" / "cmkit"
    offenders = []
    for path in src.rglob("*.py"):
        rel = path.relative_to(src)
        if rel.parts[0] == "objectives" or rel.name == "demo.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and (rel.name, node.value) not in NOT_A_METHOD:
                offenders.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_the_editing_tasks_are_one_table():
    """`cmkit edit`'s subcommands and the server's edit endpoints are the rows of editing.TASKS."""
    from cmkit.editing import TASKS
    from cmkit.serve.app import EDIT_TASKS
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    edit = next(a for a in sub.choices["edit"]._actions if a.dest == "task")
    assert list(edit.choices) == list(TASKS)
    assert list(EDIT_TASKS) == [name for name, task in TASKS.items() if task.image]
    for name, task in TASKS.items():
        options = {o for a in edit.choices[name]._actions for o in a.option_strings}
        assert ("--mask" in options) == task.mask and ("--factor" in options) == task.factor
        assert ("--sigma" in options) == task.sigma and ("--n" in options) == task.variations
        assert ("--steps" in options) == (task.steps or task.strength) and ("--sigmas" in options) == task.levels
        assert ("--strength" in options) == task.strength


def test_export_formats_follow_the_wrapper():
    for spec in methods().values():
        if spec.diffusion:
            assert spec.export_formats == ()
        else:
            assert ("onnx" in spec.export_formats) == (not spec.latent_only)  # ONNX writes pixel-space generators
            assert ("diffusers" in spec.export_formats) == issubclass(spec.wrapper, CONSISTENCY_FUNCTIONS)
    assert get_method("lcm-lora").export_formats == ("diffusers",)  # LoRA adapters on a latent model


# ---------------------------------------------------------------------------------------------
# A method added in a test file


class DenoisingConsistencyLoss(Objective):
    """f(x0 + sigma z, sigma) -> x0 at lognormal sigma: the simplest loss a consistency function
    can train with (the zero-gap limit of ECT's first stage)."""

    def __init__(self, p_mean: float = -1.0, p_std: float = 1.5):
        self.p_mean, self.p_std = p_mean, p_std

    def draw(self, x0, *, step=0, generator=None, condition=None):
        rng = batch_rng(generator)
        sigma = (self.p_mean + self.p_std * rng.randn((x0.shape[0],))).exp().clamp(0.002, 80).to(x0)
        return {"sigma": sigma, "z": rng.randn(x0.shape).to(x0)}

    def loss(self, net, x0, draws, *, target=None, condition=None):
        sigma, z = draws["sigma"], draws["z"]
        out = net(x0 + broadcast_to_batch(sigma, x0) * z, sigma, condition)
        return (out - x0).pow(2).flatten(1).mean(1), {}


@pytest.fixture
def throwaway(tmp_path):
    defaults = tmp_path / "throwaway.json"
    defaults.write_text(json.dumps({"_source": "a test's throwaway method", "objective": {"p_mean": -1.0, "p_std": 1.5},
                                    "train": {"lr": 0.002}}))
    spec = register(MethodSpec(name="throwaway", summary="a method defined in a test", source="tests/test_registry.py",
                               objective=DenoisingConsistencyLoss, wrapper=ConsistencyFunction, config=defaults,
                               build=lambda config, teacher: DenoisingConsistencyLoss(**objective_options(config))))
    yield spec
    unregister("throwaway")
    assert "throwaway" not in method_names()


def test_a_spec_that_contradicts_itself_is_refused():
    common = dict(summary="s", source="s", objective=DenoisingConsistencyLoss, wrapper=ConsistencyFunction,
                  build=lambda config, teacher: None)
    for bad in ({"name": "Bad Name"}, {"name": "x", "diffusion": True, "teacher": True},
                {"name": "x", "starts_from_teacher": True}, {"name": "x", "objective": dict}):
        with pytest.raises(ValueError):
            MethodSpec(**{**common, **bad})
    with pytest.raises(ValueError, match="already registered"):
        register(MethodSpec(**{**common, "name": "edm"}))


def _weights_digest(run: Path, name: str = "ema") -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(load_weights(run, name).items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def test_a_method_registered_in_a_test_trains_resumes_and_samples_through_the_cli(tmp_path, throwaway):
    assert "throwaway" in _method_choices()
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    assert cli("train", "--method", "throwaway", "--data", "moons", "--steps", 6, "--out", whole, *TINY) == 0
    assert cli("train", "--method", "throwaway", "--data", "moons", "--steps", 3, "--out", halves, *TINY) == 0
    assert cli("train", "--method", "throwaway", "--resume", "--steps", 6, "--out", halves, "--quiet") == 0
    config = read_run_config(whole)
    assert config["method"] == "throwaway" and config["train"]["lr"] == 0.002
    assert config["objective"] == {"p_mean": -1.0, "p_std": 1.5}
    assert _weights_digest(whole) == _weights_digest(halves)  # the resume is exact
    assert _weights_digest(whole) != _weights_digest(whole, "model")  # it trained (EMA lags the weights)
    out = tmp_path / "samples.npy"
    assert cli("sample", "--checkpoint", whole, "--n", 50, "--steps", 2, "--seed", 4, "--out", out, "--quiet") == 0
    run = cmkit.load_run(whole)
    assert not run.is_diffusion
    np.testing.assert_array_equal(np.load(out), run.sample(50, steps=2, seed=4))


# ---------------------------------------------------------------------------------------------
# Configs are values


@pytest.mark.parametrize("method", ["ct", "sct", "cd", "edm"])
def test_train_leaves_the_callers_config_unchanged(tmp_path, tiny_teacher, method):
    sources = {"teacher": str(tiny_teacher)} if method == "cd" else {}
    model = {} if method == "cd" else SMALL_MODEL
    config = build_config(method, **SMALL, **model, **sources, **{"train.steps": 2})
    before = copy.deepcopy(config)
    cmkit.train(config, tmp_path / "run", progress=False)
    assert config == before
    saved = read_run_config(tmp_path / "run")
    assert "standardizer" in saved and "standardizer" not in config  # the derived values went to the run


def test_one_dict_reused_for_a_sweep_trains_what_fresh_dicts_train(tmp_path):
    """A sweep that edits its own dict between runs: the CT curriculum's horizon (derived from
    train.steps) must follow the new length, not stick from the first run."""
    sweep = build_config("ct", **SMALL, **SMALL_MODEL, **{"train.steps": 3})
    cmkit.train(sweep, tmp_path / "a3", progress=False)
    sweep["train"]["steps"] = 6
    cmkit.train(sweep, tmp_path / "a6", progress=False)
    for steps in (3, 6):
        fresh = build_config("ct", **SMALL, **SMALL_MODEL, **{"train.steps": steps})
        cmkit.train(fresh, tmp_path / f"b{steps}", progress=False)
        assert read_run_config(tmp_path / f"a{steps}")["objective"]["total_steps"] == steps
        assert _weights_digest(tmp_path / f"a{steps}") == _weights_digest(tmp_path / f"b{steps}")


# ---------------------------------------------------------------------------------------------
# Run directories written before the registry


OLD_RUN = ROOT / "tests" / "data" / "old-main-ct"  # a 6-step ct run of fingerprints.py, written by the former main


def test_a_run_directory_from_before_the_registry_loads_samples_and_resumes(tmp_path):
    from fingerprints import N_SAMPLES, SAMPLE_SEED, STORE, machine
    import shutil
    old = tmp_path / "old"
    shutil.copytree(OLD_RUN, old)
    recorded_here = json.loads(STORE.read_text())["machine"] == machine()  # the CPU that wrote OLD_RUN
    stored = json.loads(STORE.read_text())["runs"]["ct"]["samples"]
    samples = cmkit.load_run(old).sample(N_SAMPLES, steps=2, seed=SAMPLE_SEED)
    np.testing.assert_allclose(samples.ravel(), stored, rtol=1e-4, atol=1e-6)
    # Resumed, it continues as a run this cmkit starts and resumes: the same weights at step 8.
    new = tmp_path / "new"
    assert cli("train", "--method", "ct", "--steps", 6, "--out", new, "--seed", 1, "--data", "moons", *TINY) == 0
    for run in (old, new):
        assert cli("train", "--method", "ct", "--resume", "--steps", 8, "--out", run, "--quiet") == 0
    config = read_run_config(old)
    assert config["objective"]["total_steps"] == 6 and config["train"]["steps"] == 8
    # Equal but for the device: runs of the former main say "cpu", where new ones say "auto".
    assert config["train"].pop("device") == "cpu" and read_run_config(new)["train"]["device"] == "auto"
    assert config == {**read_run_config(new), "train": {k: v for k, v in read_run_config(new)["train"].items()
                                                       if k != "device"}}
    if recorded_here:
        assert _weights_digest(old) == _weights_digest(new)
    else:  # its step-6 weights were rounded by another CPU's kernels: equal to rounding
        for name in ("ema", "model"):
            got, want = load_weights(old, name), load_weights(new, name)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), rtol=1e-4, atol=1e-6, err_msg=key)
