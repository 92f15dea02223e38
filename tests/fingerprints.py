"""Fingerprints of tiny runs of every method: the trained weights and a few samples, so that a
change meant to keep behaviour (a refactor) can be checked against the numbers main produced.

    python tests/fingerprints.py           # print the fingerprints of this checkout
    python tests/fingerprints.py --write   # store them in tests/data/fingerprints.json
    python tests/fingerprints.py --add-machine   # add this CPU's record beside the stored one

A record for another CPU is added only when the former main and this checkout print the same
fingerprints there (the Intel record was checked so against 28e606c): the first record stays the
one the behaviour was recorded with.

Each run goes through the command line, so the fingerprints depend only on what a user can do.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from helpers import TINY, cli

STORE = Path(__file__).parent / "data" / "fingerprints.json"
STEPS = 6
N_SAMPLES = 8
SAMPLE_SEED = 3

VECTORS = ["--data", "moons", *TINY]
IMAGES = ["--data", "digits", "--set", "train.batch_size=8", "--set",
          "train.sample_every=0", "--set", "train.log_every=1", "--quiet"]
TINY_UNET = ["--set", "model.preset=tiny"]

# (name, method, extra arguments, the run it starts from, sampling steps)
RUNS = [
    ("edm", "edm", VECTORS, None, 4),
    ("cd", "cd", [*VECTORS[:2], *TINY[6:]], ("--teacher", "edm"), 2),
    ("ct", "ct", VECTORS, None, 2),
    ("ict", "ict", VECTORS, None, 2),
    ("ect", "ect", [*VECTORS[:2], *TINY[6:]], ("--init", "edm"), 2),
    ("sct", "sct", [*VECTORS[:2], *TINY[6:]], ("--init", "edm"), 2),
    ("scd", "scd", [*VECTORS[:2], *TINY[6:]], ("--teacher", "edm"), 2),
    ("meanflow", "meanflow", VECTORS, None, 2),
    ("edm-images", "edm", [*IMAGES, *TINY_UNET, "--set", "model.c_noise=edm"], None, 3),
    ("cd-images", "cd", IMAGES, ("--teacher", "edm-images"), 2),
    ("sct-images", "sct", IMAGES, ("--init", "edm-images"), 2),
    ("meanflow-images", "meanflow", [*IMAGES, *TINY_UNET], None, 1),
]


def state_digest(path: Path, name: str) -> str:
    """sha256 over a checkpoint file's tensors, by name."""
    from cmkit.checkpoint import load_weights
    digest = hashlib.sha256()
    for key, tensor in sorted(load_weights(path, name).items()):
        digest.update(key.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def fingerprint_runs(root: Path) -> dict:
    """Train every run of RUNS under ``root``; return {name: fingerprint}."""
    from cmkit import load_run
    prints = {}
    for name, method, extra, source, steps in RUNS:
        out = root / name
        origin = [source[0], root / source[1]] if source else []
        assert cli("train", "--method", method, "--steps", STEPS, "--out", out, "--seed", 1, *origin, *extra) == 0
        samples = load_run(out).sample(N_SAMPLES, steps=steps, seed=SAMPLE_SEED)
        prints[name] = {"ema": state_digest(out, "ema"), "model": state_digest(out, "model"),
                        "samples_sha256": hashlib.sha256(np.ascontiguousarray(samples).tobytes()).hexdigest(),
                        "samples": samples.astype(np.float64).ravel().tolist()}
    return prints


def record_for_this_machine(stored: dict) -> dict | None:
    """The stored record made on this machine (torch, CPU and the kernels' instruction set), if
    any; a record from before the instruction set was noted matches on the rest."""
    here, records = machine(), [stored, *stored.get("other_machines", [])]
    exact = next((r for r in records if r["machine"] == here), None)
    return exact or next((r for r in records if "isa" not in r["machine"]
                          and r["machine"] == {k: v for k, v in here.items() if k != "isa"}), None)


def machine() -> dict:
    """What decides whether float results can be bit-identical: torch, the CPU and the instruction
    set torch's kernels use on it (virtual machines name CPUs only "AMD EPYC", AVX2 and AVX-512
    hosts alike, and the two round training's sums differently)."""
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"torch": torch.__version__, "machine": platform.machine(), "cpu": cpu,
            "isa": torch.backends.cpu.get_cpu_capability()}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        result = {"machine": machine(), "runs": fingerprint_runs(Path(tmp))}
    if "--write" in sys.argv:
        STORE.parent.mkdir(exist_ok=True)
        STORE.write_text(json.dumps(result, indent=1) + "\n")
    elif "--add-machine" in sys.argv:
        stored = json.loads(STORE.read_text())
        others = [r for r in stored.get("other_machines", []) if r["machine"] != result["machine"]]
        STORE.write_text(json.dumps({**stored, "other_machines": [*others, result]}, indent=1) + "\n")
    for name, fp in result["runs"].items():
        print(f"{name:16s} ema {fp['ema'][:16]} samples {fp['samples_sha256'][:16]}")
