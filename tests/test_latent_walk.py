"""docs/latent.md's "Try it locally" walk runs as written (2 training steps, fewer images), in a
temporary directory, writing under runs/ only: the tiny random pipeline, encode, LCM and LCM-LoRA,
sample, export, and the diffusers lines that load what was exported."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cmkit.cli import main

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Try it locally"


def walk_blocks(language: str) -> list[str]:
    text = (REPO / "docs" / "latent.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def walk_commands() -> list[str]:
    lines = [raw.split("  #")[0].strip() for block in walk_blocks("bash") for raw in block.splitlines()]
    small = []
    for line in filter(None, lines):
        if line.startswith("cmkit train"):
            line = re.sub(r"--steps \d+", "--steps 2", line) + " --quiet"
        if line.startswith("python examples/tiny_pipeline.py"):
            line += " --n 40"
        small.append(line)
    return small


@pytest.mark.slow
def test_the_try_it_locally_walk_runs_as_written(tmp_path, monkeypatch, capfd):
    commands = walk_commands()
    assert commands[0].startswith("python examples/tiny_pipeline.py") and commands[-1].startswith("cmkit serve")
    assert {c.split()[1] for c in commands if c.startswith("cmkit")} == {"data", "train", "sample", "export", "serve"}
    monkeypatch.chdir(tmp_path)
    for command in commands[:-1]:  # a server runs until stopped: tests/test_serve_text.py starts a real one
        if command.startswith("python "):
            words = shlex.split(command)
            done = subprocess.run([sys.executable, str(REPO / words[1]), *words[2:]], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
            continue
        assert main(shlex.split(command)[1:]) == 0, f"{command}\n{capfd.readouterr().err[-3000:]}"
    assert "load_lora_weights" in capfd.readouterr().out  # export says how to use the LoRA file
    (code,) = walk_blocks("python")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} == {"runs"}
    assert {"tiny-lcm.png", "tiny-lcm-lora.png", "tiny-lcm-pipeline", "tiny-lcm-lora-weights"} <= {
        p.name for p in (tmp_path / "runs").iterdir()}
