"""Search the noise levels of K-step consistency sampling by the evaluation metric.

    cmkit tune-sigmas --checkpoint runs/cd --steps 2       # then `cmkit sample --steps 2` uses them

The first level is sigma_max (where the noise starts); each later level is searched in turn, top
to bottom, by ternary search in log sigma between its neighbours, the others held fixed (the
greedy search of Song et al. 2023, appendix). Every evaluation samples with the same seed, so the
comparison between levels is not drowned by sampling noise; the default levels are candidates
too, so the result never scores worse than they do on the search's samples. The chosen levels
are written into the run's config (``sampling.sigmas``), where `Run.sigmas_for` finds them.
"""

from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np
import torch

from . import checkpoint
from .errors import CmkitError
from .run import Run, default_consistency_sigmas

VECTOR_METRICS = ("sw1", "energy")


def metric_for(run: Run, *, data: str | None, n: int, seed: int, metric: str | None) -> tuple[str, Callable]:
    """(metric name, score(sigmas) -> float, lower is better) against ``n`` held-out points."""
    from .evaluate import ImageScorer, reference_data, reference_labels
    if run.is_image:
        from .data import ImageData, load_dataset
        metric = metric or "fd"
        if metric not in ("fd", "fid"):
            raise CmkitError(f"image runs are tuned by fd or fid, not {metric!r}")
        images = load_dataset(run.config["data"], name=data)
        if not isinstance(images, ImageData) or images.shape != run.shape:
            raise CmkitError(f"reference data does not match the run's images {run.shape}")
        index = torch.from_numpy(np.random.default_rng([seed, 4]).permutation(len(images.holdout))[:n])
        labels = reference_labels(run, images.holdout_labels, index)
        scorer = ImageScorer(images.holdout[index], [metric], images.native_size, device=run.device)
        return metric, lambda sigmas: scorer.score(run.sample(len(index), sigmas=sigmas, seed=seed,
                                                              class_labels=labels))[metric]
    from .metrics import energy_distance, sliced_wasserstein
    metric = metric or "sw1"
    if metric not in VECTOR_METRICS:
        raise CmkitError(f"vector runs are tuned by {' or '.join(VECTOR_METRICS)}, not {metric!r}")
    vectors = reference_data(run, data)
    index = np.random.default_rng([seed, 4]).permutation(len(vectors.holdout))[:n]
    reference, labels = vectors.holdout[index], reference_labels(run, vectors.holdout_labels, index)
    distance = {"sw1": lambda x: sliced_wasserstein(x, reference, seed=seed),
                "energy": lambda x: energy_distance(x, reference)}[metric]
    return metric, lambda sigmas: distance(run.sample(len(reference), sigmas=sigmas, seed=seed, class_labels=labels))


def tune_levels(score: Callable[[list[float]], float], start: list[float], sigma_min: float,
                iterations: int = 6) -> tuple[list[float], float, int]:
    """Greedy coordinate search from ``start``: (levels, their score, evaluations)."""
    levels = list(start)
    best = score(levels)
    evaluations = 1
    for i in range(1, len(levels)):
        lo = levels[i + 1] if i + 1 < len(levels) else sigma_min
        a, b = math.log(lo), math.log(levels[i - 1])
        margin = 1e-3 * (b - a)  # levels stay strictly between their neighbours
        a, b = a + margin, b - margin

        def at(u: float) -> float:
            nonlocal evaluations
            evaluations += 1
            return score(levels[:i] + [math.exp(u)] + levels[i + 1:])

        for _ in range(iterations):
            m1, m2 = a + (b - a) / 3, b - (b - a) / 3
            if at(m1) < at(m2):
                b = m2
            else:
                a = m1
        candidate = math.exp((a + b) / 2)
        trial = at(math.log(candidate))
        if trial < best:
            best, levels[i] = trial, candidate
    return levels, best, evaluations


def tune_sigmas(run: Run, steps: int, *, data: str | None = None, n: int = 2000, seed: int = 0,
                metric: str | None = None, iterations: int = 6, write: bool = True) -> dict:
    """Tune ``steps``-step levels of a consistency run; with ``write`` store them in its config."""
    if run.is_diffusion:
        raise CmkitError("tune-sigmas tunes consistency models' multistep levels; this is an edm teacher")
    if write and run.config.get("source") == "diffusers":
        raise CmkitError("a diffusers folder has no cmkit config to store levels in: pass --dry-run and use "
                         "the printed levels with --sigmas")
    if steps < 2:
        raise CmkitError(f"--steps must be at least 2 (1 step has only sigma_max), got {steps}")
    if iterations < 1 or n < 2:
        raise CmkitError("--iterations must be >= 1 and --n >= 2")
    name, score = metric_for(run, data=data, n=n, seed=seed, metric=metric)
    start = default_consistency_sigmas(steps, run.noise_range, run.sampling_floor)
    default_score = score(start)
    # A network trained only above a floor (TCM's transition level) is not searched below it.
    lowest = max(run.noise_range.sigma_min, run.sampling_floor or 0.0)
    levels, best, evaluations = tune_levels(score, start, lowest, iterations)
    result = {"steps": steps, "metric": name, "n": n, "seed": seed, "default_sigmas": start,
              "default_score": default_score, "sigmas": levels, "score": best, "evaluations": evaluations}
    if write:
        config = checkpoint.read_run_config(run.path)
        sampling = config.setdefault("sampling", {})
        sampling.setdefault("sigmas", {})[str(steps)] = levels
        sampling.setdefault("tuned", {})[str(steps)] = {k: v for k, v in result.items() if k != "sigmas"}
        checkpoint.atomic_write_text(run.path / "config.json", json.dumps(config, indent=2) + "\n")
        run.config = config
    return result
