"""The README's commands run as written (with small sizes substituted), in a temporary directory,
and leave the repository clean."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cmkit.cli import main

REPO = Path(__file__).resolve().parents[1]
NOT_RUN = ("cmkit serve",)  # a server runs until stopped: tests/test_serve*.py start and stop real ones


def readme_blocks(language: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def small(line: str) -> str:
    """A README command at test size: 2 training steps on small batches, few samples."""
    if " train " in f" {line} ":
        line = re.sub(r"--steps \d+", "--steps 2", line) + " --batch-size 16"
        if "--method edm" in line and "fashion-mnist" in line:
            line += " --set model.preset=tiny"  # the runs distilled from it inherit the preset
    line = re.sub(r"--n \d+", "--n 64", line)
    line = line.replace("--nproc_per_node=4", "--nproc_per_node=2")
    if line.startswith("cmkit eval"):
        line += " --n 64"
    if line.startswith("cmkit tune-sigmas"):
        line += " --n 200 --iterations 1"
    return line


def commands() -> list[str]:
    lines = []
    for block in readme_blocks("bash")[1:]:  # the first block is the set-up, which CI itself runs
        for raw in block.splitlines():
            line = raw.split("  #")[0].strip()
            if line.startswith(("cmkit ", "torchrun ")) and not line.startswith(NOT_RUN):
                lines.append(small(line))
    return lines


def demo_commands() -> list[str]:
    """The demo lines, in the README's order: the set-up line's and the one in the prose after it,
    at test size (2 training steps each)."""
    opening = (REPO / "README.md").read_text().split("## ", 1)[0]
    lines = [m.strip() for m in re.findall(r"\.venv/bin/(cmkit demo[^`&\n]*)", opening)]
    return [f"{line} --steps 2,2 --quiet" for line in lines]


def _status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=REPO, capture_output=True,
                          text=True).stdout


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_readme_commands_run_as_written(tmp_path, monkeypatch, capfd):
    before = _status()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    demos = demo_commands()
    assert demos == ["cmkit demo --steps 2,2 --quiet", "cmkit demo --data digits --steps 2,2 --quiet"]
    run = demos + commands()  # both demos first: the second must not trip on the first's output
    assert len(run) >= 20 and any(c.startswith("torchrun") for c in run)
    monkeypatch.chdir(tmp_path)
    for i, command in enumerate(run):
        if command.startswith("cmkit ") and i > 0:
            # The first command runs the installed `cmkit` program through the shell; the others run
            # in this process, through the function that program calls: 20 more interpreters
            # importing torch would cost a minute.
            status = main(shlex.split(command)[1:])
            assert status == 0, f"{command}\n{capfd.readouterr().err[-3000:]}"
            continue
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    for code in readme_blocks("python"):
        code = re.sub(r'"train\.steps": \d+', '"train.steps": 2', code)
        done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.iterdir()}
    assert written == {"runs"}, written  # everything under runs/, as the README says
    assert _status() == before  # the repository is as it was
