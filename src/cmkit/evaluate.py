"""Evaluate a run's samples against held-out data, beside the data-vs-data floor."""

from __future__ import annotations

import time

import numpy as np
import torch

from .data import TOY_TRUTH, load_vectors
from .errors import CmkitError
from .metrics import energy_distance, sliced_wasserstein
from .run import Run, load_run


def reference_data(run: Run, data: str | None):
    """The data to compare against: the run's own train/held-out split, or that of ``data``."""
    d = run.config["data"]
    own = data is None or data == d["name"]
    vectors = load_vectors(d["name"] if own else data, n=d["n"], n_holdout=d["n_holdout"],
                           holdout_fraction=d["holdout_fraction"], seed=d["seed"])
    if vectors.dim != run.dim:
        raise CmkitError(f"data has {vectors.dim} dimensions but the run generates {run.dim}")
    return vectors


def sample_metrics(samples: np.ndarray, reference: np.ndarray, truth=None, seed: int = 0) -> dict:
    out = {"sw1": sliced_wasserstein(samples, reference, seed=seed),
           "energy": energy_distance(samples, reference)}
    if truth is not None:  # exact: the true density of the samples
        out["true_nll"] = float(-truth.log_prob(torch.from_numpy(samples)).mean())
    return out


FLOOR_DRAWS = 5


def floor_metrics(vectors, reference: np.ndarray, truth, seed: int) -> dict:
    """Training data vs the held-out reference, at the reference's size: what a perfect model
    would score. The median over FLOOR_DRAWS training subsets (single draws vary by 2x at
    n = 5,000 on moons), with the SW1 range beside it."""
    rng = np.random.default_rng([seed, 3])
    draws = [sample_metrics(vectors.train[rng.permutation(len(vectors.train))[:len(reference)]],
                            reference, truth, seed) for _ in range(FLOOR_DRAWS)]
    floor = {key: float(np.median([d[key] for d in draws])) for key in draws[0]}
    floor["sw1_range"] = [min(d["sw1"] for d in draws), max(d["sw1"] for d in draws)]
    return floor


def evaluate_run(checkpoint: str, *, data: str | None = None, steps: list[int] | None = None,
                 n: int = 10000, seed: int = 0) -> dict:
    if n < 2:
        raise CmkitError(f"--n must be at least 2, got {n}")
    run = load_run(checkpoint)
    vectors = reference_data(run, data)
    if len(vectors.holdout) < 2:
        raise CmkitError(f"{vectors.name} holds out {len(vectors.holdout)} row(s); evaluation needs at least 2")
    truth = TOY_TRUTH.get(vectors.name)
    reference = vectors.holdout[np.random.default_rng([seed, 4]).permutation(len(vectors.holdout))[:n]]
    result = {"checkpoint": str(checkpoint), "method": run.method, "data": vectors.name,
              "n": len(reference), "floor": floor_metrics(vectors, reference, truth, seed), "results": []}
    for s in steps or ([18] if run.is_diffusion else [1, 2]):
        start = time.perf_counter()
        samples = run.sample(len(reference), steps=s, seed=seed)
        seconds = time.perf_counter() - start
        nfe = 2 * s - 1 if run.is_diffusion else s
        result["results"].append({"steps": s, "nfe": nfe, "seconds": round(seconds, 4),
                                  **sample_metrics(samples, reference, truth, seed)})
    return result
