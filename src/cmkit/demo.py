"""`cmkit demo`: the whole pipeline in a few minutes on a CPU.

    cmkit demo                   # a 2-D set (moons): teacher, CD, SW1 against held-out points
    cmkit demo --data digits     # 8x8 digits with a tiny UNet: teacher, CD, FD, one-step inpainting
    cmkit demo --resume          # after Ctrl-C: a finished run is reused, the stopped one continues

Trains an EDM teacher, distills a consistency model from it, evaluates both against held-out
data and writes DIR/demo.png (each panel titled with its score and sampling time) and
DIR/metrics.json.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import checkpoint
from .config import build_config
from .data import IMAGE_SETS, TOY_SETS
from .errors import CmkitError
from .evaluate import evaluate_run, format_results, reference_data
from .plotting import pyplot, scatter_panels
from .run import load_run
from .safe_io import read_json
from .training import train

DEMO_ENTRIES = {"teacher", "cd", "metrics.json", "demo.png"}


@dataclass(frozen=True)
class DemoPlan:
    """What one demo trains: config overrides shared by both runs, and each run's steps."""

    teacher_steps: int
    cd_steps: int
    shared: dict
    minutes: str  # the time on 2 CPU cores, for the stage headers


PLANS = {
    # 2-D: the MLP defaults; about 3 minutes.
    "vectors": DemoPlan(4000, 3000, {}, "about 1-2 minutes each"),
    # 8x8 digits: the tiny UNet, unconditional (editing needs no class), c_noise=edm (docs/benchmarks.md:
    # the time input that works for every method on images), a higher teacher lr for a short run.
    "digits": DemoPlan(1500, 1000, {"model.preset": "tiny", "model.num_classes": 0, "model.c_noise": "edm",
                                    "train.batch_size": 128, "train.sample_every": 0}, "about 1-2 minutes each"),
}
DEMO_DATA = (*sorted(TOY_SETS), "digits")


def run_demo(out: str | Path, *, data: str = "moons", seed: int = 0, force: bool = False, resume: bool = False,
             progress: bool = True, own_signals: bool = False, steps: tuple[int, int] | None = None) -> dict:
    """``steps``: (teacher, CD) training steps instead of the plan's (a quicker, rougher look).
    ``resume``: finish an interrupted demo in ``out``: a run that reached its steps is reused, one
    that was stopped continues from its last checkpoint (to the steps it was started with, unless
    ``steps`` says otherwise). ``own_signals``: as `train`'s (the `cmkit demo` command passes True)."""
    if data not in DEMO_DATA:
        raise CmkitError(f"the demo runs on {', '.join(DEMO_DATA)}, not {data!r} (train on other data with "
                         "cmkit train)")
    plan = PLANS["digits" if data in IMAGE_SETS else "vectors"]
    if steps is not None:
        if len(steps) != 2 or min(steps) < 1:
            raise CmkitError(f"--steps takes TEACHER,CD: two positive step counts, got {steps}")
        plan = DemoPlan(steps[0], steps[1], plan.shared, "")
    out = _interrupted_demo(Path(out), force, data) if resume else _prepare(Path(out), force)
    if resume and steps is None:  # each run continues to the steps it was started with
        plan = replace(plan, teacher_steps=_saved_steps(out / "teacher", plan.teacher_steps),
                       cd_steps=_saved_steps(out / "cd", plan.cd_steps))
    say = print if progress else (lambda *a, **k: None)
    options = {"progress": progress, "own_signals": own_signals}

    when = f", {plan.minutes} on 2 CPU cores" if plan.minutes else ""
    say(f"[1/4] training an EDM teacher on {data} ({plan.teacher_steps} steps{when})")
    teacher_cfg = build_config("edm", **{"data.name": data, "train.steps": plan.teacher_steps, "train.seed": seed,
                                         **plan.shared, **({"train.lr": 2e-3} if data in IMAGE_SETS else {})})
    teacher_trained = _train_stage(teacher_cfg, out / "teacher", keep=resume, say=say, **options)
    say(f"[2/4] distilling a consistency model from it (CD, {plan.cd_steps} steps)")
    shared = {k: v for k, v in plan.shared.items() if not k.startswith("model.")}  # CD takes the teacher's network
    cd_cfg = build_config("cd", **{"data.name": data, "train.steps": plan.cd_steps, "train.seed": seed,
                                   "teacher": str(out / "teacher"), **shared})
    # A teacher trained further in this session makes an earlier CD run stale: it starts over.
    _train_stage(cd_cfg, out / "cd", keep=resume and not teacher_trained, say=say, **options)

    say("[3/4] evaluating both against held-out data")
    image = data in IMAGE_SETS
    options = {"metrics": ["fd"], "n": 10000} if image else {"n": 5000}  # 2-D: the figure's 5,000 points
    metrics = {"teacher": evaluate_run(str(out / "teacher"), steps=[18], seed=seed, progress=progress, **options),
               "cd": evaluate_run(str(out / "cd"), steps=[1, 2], seed=seed, progress=progress, **options)}
    if image:
        metrics["untrained_fd"] = _untrained_fd(out / "cd", seed)

    say("[4/4] drawing the figure")
    teacher, student = load_run(out / "teacher"), load_run(out / "cd")
    if image:
        _image_figure(teacher, student, metrics, out / "demo.png", seed)
    else:
        _scatter_figure(teacher, student, metrics, out / "demo.png", seed)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    say("\n" + format_results(metrics["teacher"]) + "\n\n" + format_results(metrics["cd"]))
    if image:
        say(f"an untrained network of the same shape: FD {metrics['untrained_fd']:.4g}")
    say(f"\nwrote {out / 'demo.png'} and {out / 'metrics.json'}")
    return metrics


def _prepare(out: Path, force: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise CmkitError(f"--out {out} is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CmkitError(f"{out} already exists: pass --resume to finish an interrupted demo there, --force to "
                             "start it over, or another --out")
        if not (set(p.name for p in out.iterdir()) <= DEMO_ENTRIES and (out / "teacher" / "config.json").is_file()):
            raise CmkitError(f"--force refuses to delete {out}: it is not a cmkit demo directory")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _interrupted_demo(out: Path, force: bool, data: str) -> Path:
    """``out``, checked to hold a demo of ``data`` that can be resumed."""
    if force:
        raise CmkitError("--resume and --force exclude each other")
    if not (out.is_dir() and set(p.name for p in out.iterdir()) <= DEMO_ENTRIES
            and (out / "teacher" / "config.json").is_file()):
        raise CmkitError(f"cannot resume: {out} holds no cmkit demo (start one without --resume)")
    started_on = checkpoint.read_run_config(out / "teacher")["data"]["name"]
    if started_on != data:
        raise CmkitError(f"{out} holds a demo on {started_on}: pass --data {started_on} to resume it")
    return out


def _saved_steps(run_dir: Path, default: int) -> int:
    """The steps a run in an interrupted demo was started with (``default`` if it never started)."""
    if not (run_dir / "config.json").is_file():
        return default
    return int(checkpoint.read_run_config(run_dir)["train"]["steps"])


def _checkpoint_step(run_dir: Path) -> int | None:
    """The step of a run's newest checkpoint; None where it has none."""
    if not checkpoint.has_checkpoint(run_dir):
        return None
    return int(read_json(checkpoint.checkpoint_dir(run_dir) / "state.json", "checkpoint state")["step"])


def _train_stage(config: dict, run_dir: Path, *, keep: bool, say, **options) -> bool:
    """Train ``config`` into ``run_dir``; whether it trained. With ``keep`` (a resumed demo), a run
    there that reached the config's steps is reused and one stopped before continues from its
    newest checkpoint; otherwise anything there (from an interrupted demo) is replaced."""
    step = _checkpoint_step(run_dir) if keep else None
    if step is not None and step >= config["train"]["steps"]:
        say(f"      reusing {run_dir}, trained to step {step}")
        return False
    if step is not None:
        say(f"      continuing {run_dir} from its checkpoint at step {step}")
    train(config, run_dir, resume=step is not None, force=step is None and run_dir.exists(), **options)
    return True


def _timed_sample(run, n: int, **kwargs) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    x = run.sample(n, **kwargs)
    return x, time.perf_counter() - start


def _scatter_figure(teacher, student, metrics: dict, path: Path, seed: int) -> None:
    """Held-out data beside the teacher's and CD's samples, each titled with SW1 and time."""
    n = 5000
    reference = reference_data(student, None).holdout[:n]
    floor = metrics["cd"]["floor"]["sw1"]
    panels = [(f"held-out data\nSW1 floor {floor:.4f}", reference)]
    for title, run, steps, row in (("EDM teacher, Heun 35 NFE", teacher, 18, metrics["teacher"]["results"][0]),
                                   ("CD, 1 step", student, 1, metrics["cd"]["results"][0]),
                                   ("CD, 2 steps", student, 2, metrics["cd"]["results"][1])):
        x, seconds = _timed_sample(run, n, steps=steps, seed=seed)
        panels.append((f"{title}\nSW1 {row['sw1']:.4f}, {1000 * seconds:.0f} ms for {n}", x))
    scatter_panels(panels, path, caption=_scatter_caption(student, metrics, n))


def _scatter_caption(student, metrics: dict, n: int) -> str:
    """What SW1 is, and why a second step can score worse than the first."""
    text = (f"SW1: sliced Wasserstein-1 distance between {n} samples and {n} held-out points (lower is better); "
            "the floor is that of held-out data against training data, the best a model can score.")
    one, two = (row["sw1"] for row in metrics["cd"]["results"][:2])
    if two > one:
        level = float(student.sigmas_for(2, None)[1])
        text += (f"\nCD's second step re-noises to sigma {level:.2g} (the default level, chosen for images) and "
                 "denoises again; on these points it loses more than it repairs. `cmkit tune-sigmas --steps 2` "
                 "picks the level for your data.")
    return text


def _untrained_fd(cd_dir: Path, seed: int) -> float:
    """FD of one-step samples of a network with the run's shape and random weights: the scale
    against which a trained model's FD reads."""
    import torch

    from .evaluate import ImageScorer
    from .data import load_dataset
    from .run import build_model, default_levels, generate

    run = load_run(cd_dir)
    images = load_dataset(run.config["data"])
    torch.manual_seed(seed)
    model = build_model(run.config).eval()
    x = generate(model, run.shape, default_levels(False, run.noise_range, 1), is_diffusion=False,
                 n=len(images.holdout), seed=seed, sigma_min=run.noise_range.sigma_min)
    scorer = ImageScorer(images.holdout, ["fd"], images.native_size)
    return round(float(scorer.score(run.scaler.to_data(x))["fd"]), 4)


def _grid(images: np.ndarray, cols: int) -> np.ndarray:
    from .plotting import image_grid
    return image_grid(images[:cols * (len(images) // cols)], nrow=cols, padding=1)


def _image_figure(teacher, student, metrics: dict, path: Path, seed: int) -> None:
    """Row 1: held-out digits | teacher 35 NFE | CD 1 step | CD 2 steps, titled with FD and the
    sampling time. Row 2: one-step-per-level inpainting of held-out digits with the CD model."""
    from .data import load_dataset
    from .editing.tasks import inpaint
    from .plotting import tint_masked

    images = load_dataset(student.config["data"])
    held = images.holdout.numpy()
    n = 36
    panels = [(f"held-out digits\nFD floor {metrics['cd']['floor']['fd']:.1f} (real vs real)", held[:n])]
    for title, run, steps, row in (("EDM teacher, Heun 35 NFE", teacher, 18, metrics["teacher"]["results"][0]),
                                   ("CD, 1 step", student, 1, metrics["cd"]["results"][0]),
                                   ("CD, 2 steps", student, 2, metrics["cd"]["results"][1])):
        x, seconds = _timed_sample(run, n, steps=steps, seed=seed)
        panels.append((f"{title}\nFD {row['fd']:.1f}, {1000 * seconds:.0f} ms for {n}", x))

    originals = held[n:n + 6]
    h, w = student.shape[1:]
    mask = np.zeros((h, w), bool)
    mask[h // 2:, :] = True  # the bottom half is unknown
    start = time.perf_counter()
    filled = inpaint(student, originals, mask, steps=3, n=1, seed=seed)
    seconds = time.perf_counter() - start
    edits = [("originals", originals), ("inputs: bottom half removed", tint_masked(originals, mask)),
             (f"CD inpainting, 3 levels\n{1000 * seconds:.0f} ms for {len(originals)}", filled)]

    plt = pyplot()
    fig = plt.figure(figsize=(13, 6.4))
    grid = fig.add_gridspec(2, 4, height_ratios=[3, 1.3])
    for k, (title, x) in enumerate(panels):
        ax = fig.add_subplot(grid[0, k])
        _show(ax, _grid(x, 6), title)
    for k, (title, x) in enumerate(edits):
        ax = fig.add_subplot(grid[1, k])
        _show(ax, _grid(x, 6), title)
    ax = fig.add_subplot(grid[1, 3])
    ax.axis("off")
    ax.text(0, 0.5, f"FD: Frechet distance of classifier\nfeatures, {metrics['cd']['n']} samples against\n"
                    f"as many held-out digits (lower\nis better). An untrained network\nscores "
                    f"{metrics['untrained_fd']:.0f}.", fontsize=9, va="center")
    fig.suptitle("cmkit demo: a consistency model distilled (CD) from an EDM teacher on 8x8 digits")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _show(ax, grid: np.ndarray, title: str) -> None:
    ax.imshow(grid[..., 0] if grid.shape[2] == 1 else grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
