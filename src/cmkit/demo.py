"""`cmkit demo`: the whole pipeline on a 2-D set in a few minutes on a CPU.

Trains an EDM teacher, distills a consistency model from it, evaluates both against held-out
data and writes DIR/demo.png (data, teacher, CD 1-step, CD 2-step) and DIR/metrics.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import build_config
from .errors import CmkitError
from .evaluate import evaluate_run, reference_data
from .plotting import scatter_panels
from .run import load_run
from .train import train

DEMO_ENTRIES = {"teacher", "cd", "metrics.json", "demo.png"}
TEACHER_STEPS = 4000
CD_STEPS = 3000


def run_demo(out: str | Path, *, data: str = "moons", seed: int = 0, force: bool = False,
             progress: bool = True) -> dict:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CmkitError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CmkitError(f"{out} already exists: pass --force to overwrite it, or another --out")
        if not (set(p.name for p in out.iterdir()) <= DEMO_ENTRIES and (out / "teacher" / "config.json").is_file()):
            raise CmkitError(f"--force refuses to delete {out}: it is not a cmkit demo directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if progress else (lambda *a, **k: None)

    say(f"[1/3] training an EDM teacher on {data} ({TEACHER_STEPS} steps)")
    teacher_cfg = build_config("edm", **{"data.name": data, "train.steps": TEACHER_STEPS, "train.seed": seed})
    train(teacher_cfg, out / "teacher", progress=progress)
    say(f"[2/3] distilling a consistency model (CD, {CD_STEPS} steps)")
    cd_cfg = build_config("cd", **{"data.name": data, "train.steps": CD_STEPS, "train.seed": seed,
                                   "teacher": str(out / "teacher")})
    train(cd_cfg, out / "cd", progress=progress)

    say("[3/3] evaluating against held-out data")
    metrics = {"teacher": evaluate_run(str(out / "teacher"), steps=[18], seed=seed),
               "cd": evaluate_run(str(out / "cd"), steps=[1, 2], seed=seed)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    teacher, student = load_run(out / "teacher"), load_run(out / "cd")
    n = 5000
    reference = reference_data(student, None).holdout[:n]
    scatter_panels([("held-out data", reference),
                    ("EDM teacher, Heun 35 NFE", teacher.sample(n, steps=18, seed=seed)),
                    ("CD, 1 step", student.sample(n, steps=1, seed=seed)),
                    ("CD, 2 steps", student.sample(n, steps=2, seed=seed))], out / "demo.png")

    floor = metrics["cd"]["floor"]
    rows = [("data vs data (floor)", "-", floor)]
    rows += [("teacher Heun", r["nfe"], r) for r in metrics["teacher"]["results"]]
    rows += [(f"CD {r['steps']}-step", r["nfe"], r) for r in metrics["cd"]["results"]]
    say(f"\n{'model':<22}{'NFE':>5}{'SW1':>10}{'energy':>10}")
    for name, nfe, r in rows:
        say(f"{name:<22}{nfe:>5}{r['sw1']:>10.4f}{r['energy']:>10.4f}")
    say(f"\nwrote {out / 'demo.png'} and {out / 'metrics.json'}")
    return metrics
