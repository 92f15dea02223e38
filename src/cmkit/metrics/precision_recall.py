"""Improved precision and recall (Kynkaenniemi et al. 2019) with k-nearest-neighbour balls.

Each set's manifold is the union of balls around its points, of radius the distance to the k-th
nearest other point of the same set. Precision: the fraction of generated points inside the real
manifold; recall: the fraction of real points inside the generated manifold.
"""

from __future__ import annotations

import numpy as np
import torch


def _kth_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    radii = []
    for block in x.split(chunk):
        d = torch.cdist(block, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    inside = [(torch.cdist(block, centres) <= radii[None]).any(1) for block in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 2048) -> dict:
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    if len(real_t) <= k or len(fake_t) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set")
    real_r, fake_r = _kth_radii(real_t, k, chunk), _kth_radii(fake_t, k, chunk)
    return {"precision": _coverage(fake_t, real_t, real_r, chunk),
            "recall": _coverage(real_t, fake_t, fake_r, chunk)}
