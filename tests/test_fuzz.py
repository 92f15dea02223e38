"""Property-based tests (hypothesis): random arguments to the command-line parser and the config
builder, random and mutated bytes to every file reader. Each either succeeds or raises
CmkitError (one line for the CLI); nothing else may escape."""

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cmkit.checkpoint import checkpoint_dir, load_training_state, load_weights, read_run_config
from cmkit.cli import build_parser
from cmkit.config import build_config, check_config, default_config
from cmkit.data.files import load_labelled_array
from cmkit.data.images import load_image_array, load_image_folder, read_idx
from cmkit.errors import CmkitError
from cmkit.distributed import World
from cmkit.objectives import method_names
from cmkit.training import _check_machine

# CI runs a fixed set of examples (derandomized), so a run cannot fail by luck; a deeper, random
# search: CMKIT_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py
DEEP = int(os.environ.get("CMKIT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 80, derandomize=not DEEP, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

COMMANDS = ["train", "sample", "eval", "edit", "demo", "train-classifier"]
OPTIONS = ["--method", "--data", "--steps", "--out", "--teacher", "--init", "--batch-size", "--lr", "--seed",
           "--set", "--resume", "--force", "--quiet", "--checkpoint", "--n", "--sigmas", "--sampler", "--class",
           "--guidance", "--label-dropout", "--config", "--noise", "--s-churn", "--device", "--box", "--mask"]
VALUES = ["edm", "cd", "moons", "0", "-1", "1e400", "nan", "inf", "3", "1,2", "a=b", "model.width=", "=", "",
          "train.lr=-1", "x" * 300, "\x00", "é", "--", "-"]


@FUZZ
@given(st.sampled_from(COMMANDS), st.lists(st.one_of(st.sampled_from(OPTIONS), st.sampled_from(VALUES),
                                                     st.text(max_size=10)), max_size=10))
def test_cli_parser_takes_any_arguments(command, argv):
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            build_parser().parse_args([command, *argv])
    except CmkitError as e:
        assert "\n" not in str(e)
    except SystemExit as e:  # -h among the random words: argparse printed help and exits 0
        assert e.code == 0


def _config_keys() -> list[str]:
    keys = set()
    for method in method_names():
        for section, values in default_config(method).items():
            if isinstance(values, dict):
                keys |= {f"{section}.{k}" for k in values}
            else:
                keys.add(section)
    return sorted(keys)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                      max_size=3), max_leaves=6)


@FUZZ
@given(st.sampled_from(method_names()), st.lists(st.tuples(st.sampled_from(_config_keys()) | st.text(max_size=12),
                                                    JSON_VALUES), max_size=4))
def test_config_builder_and_checks_take_any_settings(method, assignments):
    sets = [f"{key}={json.dumps(value)}" for key, value in assignments]
    try:
        config = build_config(method, sets=sets, **{"data.name": "moons"})
        check_config(config)
        _check_machine(config, World())
    except CmkitError as e:
        assert "\n" not in str(e)


def _mutations(valid: bytes):
    """Random bytes, and a valid file truncated, extended or with bytes overwritten."""
    cut = st.integers(0, len(valid)).map(lambda n: valid[:n])
    flipped = st.tuples(st.integers(0, len(valid) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda t: valid[:t[0]] + t[1] + valid[t[0] + len(t[1]):])
    return st.one_of(st.binary(max_size=400), cut, flipped, st.binary(max_size=50).map(lambda b: valid + b))


def _file_bytes(save) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return save(Path(d))


def _save_npy(d):
    np.save(d / "a.npy", np.arange(24, dtype=np.float64).reshape(12, 2))
    return (d / "a.npy").read_bytes()


def _save_npz(d):
    np.savez(d / "a.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.arange(3))
    return (d / "a.npz").read_bytes()


def _save_png(d):
    Image.new("L", (6, 6)).save(d / "a.png")
    return (d / "a.png").read_bytes()


IDX = b"\x00\x00\x08\x02" + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + bytes(12)

READERS = {  # name: (file name, valid bytes, reader)
    "npy vectors": ("a.npy", _file_bytes(_save_npy), load_labelled_array),
    "npz vectors": ("a.npz", _file_bytes(_save_npz), load_labelled_array),
    "csv vectors": ("a.csv", b"x,y\n1,2\n3,4\n5,6\n", load_labelled_array),
    "npy images": ("a.npy", _file_bytes(_save_npy), load_image_array),
    "npz images": ("a.npz", _file_bytes(_save_npz), load_image_array),
    "idx": ("a-idx", IDX, read_idx),
    "png folder": ("a.png", _file_bytes(_save_png), lambda p: load_image_folder(p.parent)),
    "config": ("c.json", b'{"train": {"lr": 0.001}}', lambda p: build_config("edm", config_file=p)),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_file_readers_take_any_bytes(reader):
    name, valid, read = READERS[reader]

    @FUZZ
    @given(_mutations(valid))
    def check(content):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / name
            path.write_bytes(content)
            try:
                read(path)
            except CmkitError as e:
                assert "\n" not in str(e)

    check()


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    from helpers import TINY, cli
    run = tmp_path_factory.mktemp("fuzz") / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", run, *TINY) == 0
    return run


@pytest.mark.parametrize("member", ["config.json", "state.json", "ema.safetensors", "optimizer.safetensors",
                                    "optimizer.json", "rng.safetensors"])
def test_run_readers_take_any_bytes(saved_run, member):
    import shutil

    folder = "" if member == "config.json" else str(checkpoint_dir(saved_run).relative_to(saved_run))
    valid = (saved_run / folder / member).read_bytes()

    @FUZZ
    @given(_mutations(valid))
    def check(content):
        with tempfile.TemporaryDirectory() as d:
            run = Path(d) / "run"
            shutil.copytree(saved_run, run)
            (run / folder / member).write_bytes(content)
            for read in (read_run_config, lambda r: load_weights(r, "ema"), load_training_state):
                try:
                    read(run)
                except CmkitError as e:
                    assert "\n" not in str(e)

    check()
