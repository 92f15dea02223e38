"""Per-sample distances between network outputs, reduced over all non-batch dimensions."""

from __future__ import annotations

import math

import torch


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of squared differences."""
    return (a - b).pow(2).flatten(1).mean(1)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of absolute differences."""
    return (a - b).abs().flatten(1).mean(1)


class PseudoHuber:
    """d(a, b) = sqrt(||a - b||^2 + c^2) - c (iCT); c defaults to 0.00054 * sqrt(dim).

    Quadratic (||a-b||^2 / 2c) for small errors, linear (||a-b||) for large ones."""

    def __init__(self, c: float | None = None):
        self.c = c

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = (a - b).flatten(1)
        c = self.c if self.c is not None else 0.00054 * math.sqrt(diff.shape[1])
        return (diff.pow(2).sum(1) + c**2).sqrt() - c


class ElementwisePseudoHuber:
    """d(a, b) = mean over elements of sqrt((a - b)^2 + c^2) - c: LCM's huber loss (diffusers'
    consistency_distillation scripts, c = 0.001), per element rather than over the whole vector."""

    def __init__(self, c: float | None = None):
        self.c = 0.001 if c is None else c

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b).pow(2) + self.c**2).sqrt().sub(self.c).flatten(1).mean(1)


def make_distance(name: str, huber_c: float | None = None):
    if name == "l2":
        return l2
    if name == "l1":
        return l1
    if name == "pseudo_huber":
        return PseudoHuber(huber_c)
    if name == "elementwise_huber":
        return ElementwisePseudoHuber(huber_c)
    raise ValueError(f"unknown distance {name!r}; known: l2, l1, pseudo_huber, elementwise_huber")
