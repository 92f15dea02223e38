"""Bad input ends in one line on stderr, exit status 2, no traceback, and nothing overwritten."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cmkit.checkpoint import checkpoint_dir
from cmkit.cli import build_parser, main
from helpers import TINY, TINY_TRAIN, cli, tree_digest

TRAIN_EDM = ["train", "--method", "edm", "--data", "moons", *TINY]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cmkit: error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def teacher(tiny_teacher):
    return tiny_teacher


def _bad_file(tmp_path, name, arr):
    path = tmp_path / name
    np.save(path, arr)
    return path


@pytest.mark.parametrize("args, message", [
    (["--method", "edm", "--data", "missing.npy"], "not found"),
    (["--method", "edm", "--data", "data.txt"], "unknown data"),
    (["--method", "edm", "--data", "spirals"], "unknown data 'spirals'"),
    (["--method", "nope", "--data", "moons"], "invalid choice: 'nope'"),
    (["--method", "edm", "--data", "moons", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["--method", "edm", "--data", "moons", "--set", "model.widht=3"], "unknown config key 'model.widht'"),
    (["--method", "edm", "--data", "moons", "--set", "train.steps"], "key=value"),
    (["--method", "cd", "--data", "moons"], "needs a teacher"),
    (["--method", "edm", "--data", "moons", "--steps", "0"], "train.steps must be a positive integer"),
    (["--method", "edm", "--data", "moons", "--teacher", "x"], "--teacher is only for --method cd"),
    (["--method", "edm", "--data", "moons", "--config", "none.json"], "config file not found"),
    (["--method", "edm", "--data", "moons", "--set", "noise.sigma_min=-1"], "invalid config: need 0 < sigma_min"),
    (["--method", "ct", "--data", "moons", "--set", "objective.s0=1"], "invalid config: need total_steps"),
    (["--method", "edm", "--data", "moons", "--set", "model.embedding=foo"], "unknown embedding 'foo'"),
    (["--method", "edm", "--data", "moons", "--set", "train.log_every=0"], "train.log_every must be a positive"),
    (["--method", "edm", "--data", "moons", "--set", "data.n=0"], "data.n must be an integer of at least 2"),
    (["--method", "edm", "--data", "moons", "--set", "train.ema_rate=x"], "'train.ema_rate' takes a float, got 'x'"),
    (["--method", "edm", "--data", "moons", "--set", "train.ema_rate=1.5"], "train.ema_rate must be in [0, 1)"),
    (["--method", "edm", "--data", "moons", "--set", "train=5"], "section 'train' must be a JSON object"),
    (["--method", "edm", "--data", "moons", "--set", "train.betas=[0.9]"], "takes a list of length 2"),
    (["--method", "edm", "--data", "moons", "--set", "train.grad_clip=-1"], "train.grad_clip must be >= 0"),
    (["--method", "edm", "--data", "moons", "--set", "train.device=gpu"], "train.device must be cpu, cuda"),
    (["--method", "edm", "--data", "moons", "--set", "method=ct"], "chosen with --method"),
    (["--method", "edm", "--data", "moons", "--seed", "-1"], "seeds are integers in [0, 2^63)"),
    (["--method", "edm", "--resume", "--force", "--steps", "3"], "exclude each other"),
])
def test_bad_train_input(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("1,2\n")
    assert cli("train", *args, "--out", tmp_path / "run", "--quiet") == 2
    assert message in _error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arr, message", [
    (np.zeros((4, 2, 2)), "must have shape (N, D)"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), "NaN or inf"),
    (np.array([[0.0, -np.inf], [1.0, 2.0]]), "NaN or inf"),
])
def test_bad_data_files(tmp_path, capsys, arr, message):
    path = _bad_file(tmp_path, "bad.npy", arr)
    assert cli("train", "--method", "edm", "--data", path, "--out", tmp_path / "run") == 2
    assert message in _error_line(capsys)


def test_existing_run_is_never_overwritten(teacher, capsys):
    before = tree_digest(teacher)
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 3, "--out", teacher, *TINY) == 2
    assert "already exists" in _error_line(capsys)
    assert tree_digest(teacher) == before


def test_force_refuses_to_delete_a_non_run_directory(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", tmp_path, "--force", *TINY) == 2
    assert "not a cmkit run directory" in _error_line(capsys)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_force_replaces_a_run_that_was_evaluated_and_compiled(tmp_path):
    """What cmkit itself adds to a run directory (eval's floor cache, a compiled run's kernel cache)
    does not make it foreign to --force."""
    run = tmp_path / "run"
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", run, *TINY) == 0
    assert cli("eval", "--checkpoint", run, "--n", 50, "--quiet") == 0
    assert (run / "eval_floor.json").is_file()
    (run / "compile_cache").mkdir()
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", run, "--force", *TINY) == 0
    assert not (run / "eval_floor.json").exists() and not (run / "compile_cache").exists()
    (run / "notes.txt").write_text("mine")  # anything else still makes it foreign
    assert cli("train", "--method", "edm", "--data", "moons", "--steps", 2, "--out", run, "--force", *TINY) == 2
    assert (run / "notes.txt").read_text() == "mine"


def test_force_never_deletes_what_the_run_needs(tmp_path, teacher, capsys):
    import shutil
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    before = tree_digest(copy)
    assert cli("train", "--method", "cd", "--data", "moons", "--teacher", copy, "--steps", 2,
               "--out", copy, "--force", *TINY_TRAIN) == 2
    assert "which this run needs" in _error_line(capsys)
    assert tree_digest(copy) == before


def test_outputs_never_land_in_a_run_directory(teacher, capsys):
    before = tree_digest(teacher)
    assert cli("sample", "--checkpoint", teacher, "--n", 3, "--out", teacher / "config.json.npy") == 2
    assert "refusing to write" in _error_line(capsys)
    assert cli("eval", "--checkpoint", teacher, "--n", 20, "--out", teacher / "config.json") == 2
    assert "refusing to write" in _error_line(capsys)
    assert tree_digest(teacher) == before


def test_corrupt_weights_and_churn_settings(tmp_path, teacher, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    (checkpoint_dir(broken) / "ema.safetensors").write_bytes(b"garbage")
    assert cli("sample", "--checkpoint", broken, "--n", 3, "--out", tmp_path / "x.npy") == 2
    assert "unreadable or corrupt" in _error_line(capsys)
    assert cli("sample", "--checkpoint", teacher, "--n", 3, "--s-churn", -5, "--out", tmp_path / "x.npy") == 2
    assert "s_churn and s_noise must be >= 0" in _error_line(capsys)


def test_corrupted_run_config(tmp_path, teacher, capsys):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(teacher, broken)
    (broken / "config.json").write_text('{"method": "edm", "train": {}}')
    assert cli("sample", "--checkpoint", broken, "--n", 3, "--out", tmp_path / "x.npy") == 2
    assert "config.json is incomplete or invalid" in _error_line(capsys)
    (broken / "config.json").write_text('[1, 2]')
    assert cli("train", "--method", "edm", "--steps", 20, "--out", broken, "--resume") == 2
    assert "is not a cmkit run config" in _error_line(capsys)
    (broken / "config.json").write_text("{not json")
    assert cli("sample", "--checkpoint", broken, "--n", 3, "--out", tmp_path / "x.npy") == 2
    assert "is not valid JSON" in _error_line(capsys)


def test_cd_teacher_must_be_an_edm_run(tmp_path, teacher, capsys):
    assert cli("train", "--method", "ct", "--data", "moons", "--steps", 2, "--out", tmp_path / "ct", *TINY) == 0
    assert cli("train", "--method", "cd", "--data", "moons", "--teacher", tmp_path / "ct", "--steps", 2,
               "--out", tmp_path / "cd-of-ct", *TINY_TRAIN) == 2
    assert "is a cmkit ct run; cd needs an edm teacher" in _error_line(capsys)
    assert cli("train", "--method", "cd", "--data", "moons", "--teacher", tmp_path, "--steps", 2,
               "--out", tmp_path / "cd", *TINY_TRAIN) == 2
    assert "not a cmkit run directory" in _error_line(capsys)
    assert cli("train", "--method", "cd", "--data", "gaussian", "--teacher", teacher, "--steps", 2,
               "--out", tmp_path / "cd2", *TINY_TRAIN) == 0  # same dimension: allowed
    assert cli("train", "--method", "cd", "--data", "moons", "--teacher", teacher, "--steps", 2,
               "--set", "model.width=8", "--out", tmp_path / "cd3", *TINY_TRAIN) == 2
    assert "takes those settings from the teacher run" in _error_line(capsys)


def test_resume_refuses_config_changes_and_other_methods(teacher, capsys):
    before = tree_digest(teacher)
    assert cli("train", "--method", "edm", "--steps", 5, "--out", teacher, "--resume", "--lr", 1) == 2
    assert "only --steps may be given, not --lr" in _error_line(capsys)
    assert cli("train", "--method", "ct", "--steps", 5, "--out", teacher, "--resume") == 2
    assert "is a run of method edm, not ct" in _error_line(capsys)
    assert cli("train", "--method", "edm", "--steps", 5, "--out", teacher, "--resume") == 2
    assert "already at step 10" in _error_line(capsys)
    assert tree_digest(teacher) == before


def test_resume_without_checkpoint(tmp_path, capsys):
    assert cli("train", "--method", "edm", "--steps", 2, "--out", tmp_path / "x", "--resume") == 2
    assert "holds no checkpoint" in _error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--n", "5", "--out", "x.txt"], "must end in .npy, .npz or .png"),
    (["--n", "0", "--out", "x.npy"], "--n must be positive"),
    (["--n", "5", "--sigmas", "1,2", "--out", "x.npy"], "strictly decreasing"),
    (["--n", "5", "--sigmas", "200", "--out", "x.npy"], "must lie in"),
    (["--n", "5", "--steps", "2", "--sigmas", "1", "--out", "x.npy"], "not allowed with argument"),
])
def test_bad_sample_input(tmp_path, teacher, capsys, args, message):
    assert cli("sample", "--checkpoint", teacher, *args) == 2
    assert message in _error_line(capsys)


def test_sample_from_missing_run(tmp_path, capsys):
    assert cli("sample", "--checkpoint", tmp_path / "none", "--n", 3, "--out", tmp_path / "x.npy") == 2
    assert "none does not exist" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert cli("sample", "--checkpoint", tmp_path / "empty", "--n", 3, "--out", tmp_path / "x.npy") == 2
    assert "not a cmkit run directory" in _error_line(capsys)


def test_bad_noise_files(tmp_path, teacher, capsys):
    np.save(tmp_path / "z.npy", np.zeros((4, 3)))
    np.save(tmp_path / "b.npy", np.zeros((4, 2), dtype=bool))
    for name, message in (("z.npy", "noise must have shape (4, 2)"), ("b.npy", "must hold finite floats"),
                          ("none.npy", "must be an existing .npy file")):
        assert cli("sample", "--checkpoint", teacher, "--n", 4, "--noise", tmp_path / name,
                   "--out", tmp_path / "x.npy") == 2
        assert message in _error_line(capsys)


def test_noise_file_gives_the_sample_count(tmp_path, teacher, capsys):
    z = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    assert cli("sample", "--checkpoint", teacher, "--noise", tmp_path / "z.npy", "--out", tmp_path / "a.npy",
               "--quiet") == 0
    assert cli("sample", "--checkpoint", teacher, "--n", 5, "--noise", tmp_path / "z.npy", "--out",
               tmp_path / "b.npy", "--quiet") == 0
    assert np.load(tmp_path / "a.npy").shape == (5, 2)
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert cli("sample", "--checkpoint", teacher, "--n", 4, "--noise", tmp_path / "z.npy", "--out",
               tmp_path / "c.npy") == 2
    assert "holds 5 rows but --n is 4" in _error_line(capsys)
    assert cli("sample", "--checkpoint", teacher, "--out", tmp_path / "d.npy") == 2
    assert "--n is required" in _error_line(capsys)


def test_eval_tables_keep_a_space_before_every_column():
    from cmkit.evaluate import format_results
    row = {"steps": 1, "nfe": 1, "seconds": 0.5, "fd": 12.0, "precision": 0.5, "recall": 0.25,
           "class_accuracy": 0.75, "a_rather_long_metric_name": 1.0}
    table = format_results({"method": "cd", "data": "x", "n": 10, "floor": {"fd": 1.0}, "results": [row]})
    head = table.splitlines()[1].split()
    assert head == ["NFE", "seconds", "fd", "precision", "recall", "class_accuracy", "a_rather_long_metric_name"]
    assert len(table.splitlines()[3].split()) == 2 + 1 + 1 + 5  # "1 step", NFE, seconds, five values


def test_unwritable_output_is_one_line(tmp_path, teacher, capsys):
    (tmp_path / "dir.npy").mkdir()
    assert cli("sample", "--checkpoint", teacher, "--n", 4, "--out", tmp_path / "dir.npy") == 2
    _error_line(capsys)


def test_real_process_exit_code_and_single_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cmkit", "train", "--method", "ct", "--data",
                           str(tmp_path / "nothing.csv"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"cmkit: error: data file not found: {tmp_path / 'nothing.csv'}"]


def test_top_level_help_does_not_import_torch():
    code = ("import sys\nfrom cmkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "demo" in out and out.strip().endswith("NO TORCH"), out
    assert "encode it into a latent data set" in " ".join(out.split())  # data's summary: each sub-command


@pytest.mark.parametrize("argv, words", [
    (["train", "--method", "cdd", "--data", "moons", "--out", "x"], "did you mean cd?"),
    (["tarin"], "did you mean train?"),
    (["train", "--method", "edm", "--data", "mons", "--out", "x"], "did you mean moons?"),
    (["train", "--method", "edm", "--data", "mons", "--out", "x"], "digits"),
    (["train", "--data", "moons", "--out", "x"], "--method is required"),
    (["train", "--method", "edm", "--data", "moons"], "--out is required"),
    (["sample", "--checkpoint", "no/such/run", "--n", "1", "--out", "x.npy"], "no/such/run does not exist"),
    (["data", "check", "s/train-000000.tar", "s/train-000001.tar"], "quote a shard pattern"),  # bash's braces
])
def test_mistakes_get_helpful_one_line_errors(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1, err


def test_every_option_has_help():
    import argparse
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                assert action.help, f"{p.prog} {'/'.join(action.option_strings) or action.dest} has no help"


def test_every_checkpoint_option_says_it_takes_diffusers_folders():
    import argparse
    stack, seen = [build_parser()], []
    while stack:
        p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
            elif "--checkpoint" in action.option_strings:  # every command loads it with load_run
                assert "diffusers folder" in action.help, f"{p.prog}: {action.help}"
                seen.append(p.prog)
    assert {"cmkit sample", "cmkit export", "cmkit eval", "cmkit serve", "cmkit edit inpaint"} <= set(seen)


def test_print_config_of_every_method_needs_no_teacher_and_shows_every_section(tmp_path, capsys):
    from cmkit.config import default_config
    from cmkit.objectives import methods
    for method, spec in methods().items():
        assert main(["train", "--method", method, "--data", "moons", "--print-config"]) == 0, method
        out, err = capsys.readouterr()
        config = json.loads(out)
        assert {"method", "data", "noise", "model", "objective", "train"} <= set(config), method
        assert config["train"]["batch_size"] == 512 and "lr" in config["train"]
        if spec.teacher:  # shown as a default teacher's, and said so
            assert config["model"] == default_config("edm")["model"] and "takes them from its --teacher" in err
    teacher = tmp_path / "teacher"
    assert cli(*TRAIN_EDM, "--steps", 2, "--out", teacher) == 0
    for flag, method in (("--teacher", "cd"), ("--init", "ect")):  # then as the run will take them
        assert main(["train", "--method", method, "--data", "moons", flag, str(teacher), "--print-config"]) == 0
        config = json.loads(capsys.readouterr().out)
        assert config["model"] == json.loads((teacher / "config.json").read_text())["model"]
        assert config["model"]["width"] == 32 != default_config("edm")["model"]["width"]


def test_print_config_and_resume_with_only_out(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(*TRAIN_EDM, "--steps", 2, "--out", run) == 0
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["steps"] = 4  # as if it had been stopped at step 2 of 4
    (run / "config.json").write_text(json.dumps(saved))
    assert main(["train", "--resume", "--out", str(run), "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 4


def _leaf_commands(parser, prefix=()):
    import argparse
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(prefix, parser)]
    return [leaf for name, sub in subs[0].choices.items() for leaf in _leaf_commands(sub, (*prefix, name))]


def _minimal_argv(parser) -> list[str]:
    """Values for a command's required arguments, so that parsing reaches the unknown option."""
    argv = []
    needed = [a for a in parser._actions if a.required]
    needed += [g._group_actions[0] for g in parser._mutually_exclusive_groups if g.required]
    for action in needed:
        value = str(list(action.choices)[0]) if action.choices else "1"
        argv += ([action.option_strings[0]] if action.option_strings else []) + ([value] if action.nargs != 0 else [])
    return argv


def test_an_option_of_another_command_is_named_as_such_never_suggested_to_itself():
    from cmkit.errors import CmkitError
    parser = build_parser()
    leaves = _leaf_commands(parser)
    options = {names: set(p._option_string_actions) for names, p in leaves}
    checked = 0
    for names, leaf in leaves:
        foreign = sorted(o for other in options.values() for o in other if o.startswith("--") and o not in options[names])
        for option in foreign[:3] + foreign[-3:]:
            with pytest.raises(CmkitError) as e:
                parser.parse_args([*names, *_minimal_argv(leaf), option, "1"])
            message = str(e.value)
            assert message.startswith(f"unrecognized arguments: {option}"), message
            assert f"did you mean {option}?" not in message
            assert f"{option} is an option of" in message and f"not of {' '.join(names)})" in message, message
            checked += 1
    assert checked > 50
