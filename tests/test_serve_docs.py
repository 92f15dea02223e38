"""docs/serve.md's shell examples run as written (host and port substituted) against a real
`cmkit serve` of a class-conditional Fashion-MNIST model without an unconditional label: the
README's kind of model, on which an edit must name its class."""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from helpers import cli, free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.fashion_mnist]


def doc_commands() -> list[list[str]]:
    """Each bash block's commands (continuation lines joined), comments dropped."""
    text = (REPO / "docs" / "serve.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[line.split("  #")[0].strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
            for block in blocks]



@pytest.fixture(scope="module")
def fm_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fm")
    small = ["--data", "fashion-mnist", "--set", "data.resolution=32", "--batch-size", "8", "--quiet", "--set",
             "train.sample_every=0"]  # the README's fm-cd, at 2 steps
    assert cli("train", "--method", "edm", *small, "--set", "model.preset=tiny", "--steps", 2, "--out", tmp / "edm") == 0
    assert cli("train", "--method", "cd", *small, "--teacher", tmp / "edm", "--steps", 2, "--out", tmp / "fm-cd") == 0
    return tmp / "fm-cd"


def _serve(command: str, model: Path, port: int, cwd: Path, env: dict) -> subprocess.Popen:
    argv = shlex.split(command.replace("runs/fm-cd", str(model)).replace("~", env["HOME"]))
    assert argv[0] == "cmkit"
    server = subprocess.Popen([sys.executable, "-m", "cmkit", *argv[1:], "--port", str(port)], cwd=cwd,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)


def _stop(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    server.wait(60)


def _is_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG", path.read_bytes()[:300]
        return im.size


def test_serve_docs_curl_examples_run_against_a_class_conditional_model(fm_model, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    start, local, (token_setup, network), remote = doc_commands()[:4]
    assert start[1].startswith("cmkit serve --checkpoint runs/fm-cd") and local[0].startswith("curl")
    port = free_port()
    server = _serve(start[1], fm_model, port, tmp_path, env)
    try:
        for command in local:  # the edit's files are made by the block's own lines
            command = command.replace(":8000", f":{port}").replace("runs/fm-cd", str(fm_model))
            done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr
        _is_png(tmp_path / "grid.png")
        _is_png(tmp_path / "filled.png")
        # Without its class field the edit is refused in words an HTTP client can act on.
        inpaint = next(c for c in local if "/api/edit/inpaint" in c)
        no_class = re.sub(r"-F class=\S+ ", "", inpaint).replace(":8000", f":{port}").replace("filled.png", "refused.json")
        subprocess.run(no_class, shell=True, cwd=tmp_path, env=env, check=True, timeout=120)
        error = (tmp_path / "refused.json").read_text()
        assert "send the class field" in error and "--class" not in error, error
    finally:
        _stop(server)

    # On a network: the token made as the docs make it, the server started as they start it.
    subprocess.run(token_setup, shell=True, cwd=tmp_path, env=env, check=True, timeout=60)
    server = _serve(network.replace("--host 0.0.0.0", "--host 127.0.0.1"), fm_model, port, tmp_path, env)
    try:
        command = remote[0].replace("curl -s", f"curl -s --resolve gpu-box.lan:{port}:127.0.0.1").replace(
            "gpu-box.lan:8000", f"gpu-box.lan:{port}")
        (tmp_path / "grid.png").unlink()
        subprocess.run(command, shell=True, cwd=tmp_path, env=env, check=True, timeout=120)
        _is_png(tmp_path / "grid.png")
    finally:
        _stop(server)
