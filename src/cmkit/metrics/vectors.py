"""Distances between two samples of vectors, (N, D) and (M, D)."""

from __future__ import annotations

import numpy as np
import torch


def _as_tensor(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def wasserstein_1d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact W1 between empirical 1-D distributions, column-wise for (N, P) and (M, P).

    W1 = integral over q of |F_u^-1(q) - F_v^-1(q)|, evaluated exactly on the merged quantile grid."""
    u, v = u.sort(0).values, v.sort(0).values
    n, m = len(u), len(v)
    if n == m:
        return (u - v).abs().mean(0)
    q = torch.cat([torch.arange(1, n + 1, dtype=u.dtype) / n, torch.arange(1, m + 1, dtype=u.dtype) / m])
    q = q.unique()  # sorted, ends at 1
    widths = torch.diff(q, prepend=q.new_zeros(1))
    iu = torch.clamp(torch.ceil(q * n - 1e-9).long() - 1, 0, n - 1)
    iv = torch.clamp(torch.ceil(q * m - 1e-9).long() - 1, 0, m - 1)
    return (widths[:, None] * (u[iu] - v[iv]).abs()).sum(0)


def sliced_wasserstein(a, b, n_projections: int = 512, seed: int = 0) -> float:
    """Sliced Wasserstein-1: the mean over random unit directions of the 1-D W1 of projections."""
    a, b = _as_tensor(a), _as_tensor(b)
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    return float(wasserstein_1d(a @ dirs, b @ dirs).mean())


def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor, same: bool, chunk: int = 2048) -> float:
    total = 0.0
    for i in range(0, len(a), chunk):
        total += float(torch.cdist(a[i:i + chunk], b).sum())
    if same:  # exclude the zero diagonal: an unbiased estimate of E|X - X'|
        return total / (len(a) * (len(a) - 1))
    return total / (len(a) * len(b))


def energy_distance(a, b) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| (unbiased U-statistics; 0 iff equal laws)."""
    a, b = _as_tensor(a), _as_tensor(b)
    return (2 * _mean_pairwise_distance(a, b, False) - _mean_pairwise_distance(a, a, True)
            - _mean_pairwise_distance(b, b, True))
