"""bench/gpu.sh, the script a session with a GPU runs, works end to end: its --smoke mode runs every
phase at tiny sizes on the CPU, bench/compare_images.sh (its quality phase) included."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.fashion_mnist
def test_gpu_script_smoke_runs_every_phase_on_the_cpu(tmp_path):
    env = {"CMKIT": f"{sys.executable} -m cmkit", "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--smoke", str(tmp_path / "out")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (tmp_path / "out" / "gpu.log").read_text()
    for method in ("edm", "cd", "sct"):  # throughput rows beside the bare UNet
        assert f"cmkit {method} step (eager)" in log and f"cmkit {method} step (bf16)" in log
    assert "raw UNet fwd+bwd" in log and "cmkit 1 step" in log
    table = log.split("== quality")[1]
    for model in ("teacher", "cd", "sct", "ect-half"):
        assert any(line.split()[:1] == [model] for line in table.splitlines()), model
    quality = tmp_path / "out" / "quality"
    assert (quality / "eval-sct.json").is_file() and "FD/teacher" in log and "floor" in table
    cd = json.loads((quality / "eval-cd.json").read_text())
    assert [r["nfe"] for r in cd["results"]] == [1, 2] and cd["n"] == 200
    assert (quality / "cd-1step.png").is_file() and (quality / "quality_vs_nfe.png").is_file()
    half = json.loads((quality / "ect-half" / "config.json").read_text())
    assert half["method"] == "ect" and half["train"]["steps"] == 5  # half of CD's 10
