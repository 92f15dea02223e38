"""One editing routine for every task: Algorithm 4 of Song et al. (2023), in cmkit's sigma.

Given a reference y, an operator A and an A-space mask (1 = the model's value, 0 = the
reference's), for each level sigma_i of a decreasing list:

    x0 = f(x, sigma_i)                     (clipped to the data range)
    x0 = A^-1[(A y)(1 - mask) + (A x0) mask]
    x  = x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) z       (not after the last level)

starting from x = y + sigma_1 z. f is a consistency function; for a diffusion (EDM) run it is the
flow map of its probability-flow ODE, solved with Heun steps (`flow_map`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..noise import append_zero, check_sigmas, karras_sigmas
from ..sampling import sample_heun
from .operators import Identity, LinearOperator

Model = Callable[..., torch.Tensor]


def flow_map(denoiser: Model, steps: int = 10, sigma_min: float = 0.002, rho: float = 7.0) -> Model:
    """A teacher's consistency function: x(sigma) -> x(0) by ``steps`` Heun steps on a Karras grid
    from sigma down to sigma_min, then one Euler step to 0 (2 steps - 1 + 1 evaluations)."""

    def f(x, sigma, condition=None):
        sigma = float(sigma)
        if sigma <= sigma_min:
            return denoiser(x, sigma, condition)
        grid = append_zero(karras_sigmas(steps, sigma_min, sigma, rho)).to(x.device)
        return sample_heun(denoiser, x, grid, condition)
    return f


def project(x0: torch.Tensor, a_y: torch.Tensor, operator: LinearOperator, mask: torch.Tensor) -> torch.Tensor:
    """A^-1[(A y)(1 - mask) + (A x0) mask]: the reference's values where the mask is 0."""
    return operator.inverse(a_y * (1 - mask) + operator.forward(x0) * mask)


def fit_range(x: torch.Tensor, a_y: torch.Tensor, operator: LinearOperator, mask: torch.Tensor,
              lo: float, hi: float, iters: int = 200, tol: float = 1e-4) -> torch.Tensor:
    """A point both consistent with the reference and (to within ``tol``) inside [lo, hi]:
    alternating projections onto the two convex sets, ending on the consistent one. Without it
    the final clip to the data range (uint8 output) would undo part of the consistency, e.g. the
    patch means of super-resolution where a patch is near white."""
    for _ in range(iters):
        clipped = x.clamp(lo, hi)
        if float((x - clipped).abs().max()) <= tol:
            break
        x = project(clipped, a_y, operator, mask)
    return x


@torch.no_grad()
def edit(model: Model, y: torch.Tensor, sigmas, *, operator: LinearOperator | None = None,
         mask: torch.Tensor | None = None, sigma_min: float = 0.002, generator: torch.Generator | None = None,
         clip: tuple[float, float] | None = None, condition=None) -> torch.Tensor:
    """Algorithm 4 on a batch ``y`` (model units, any shape (N, ...)). ``operator`` defaults to the
    identity and ``mask`` (broadcastable to A y; 1 = the model's) to all ones, which is SDEdit:
    start from y + sigma_1 z and let the model decide everything. The result is exactly
    consistent with y (to float rounding) and, with ``clip``, inside the data range. ``condition``
    (`cmkit.condition.Condition`, N rows) goes to the model unchanged."""
    sigmas = check_sigmas(sigmas, what="editing sigmas")
    if sigmas[-1] < sigma_min:
        raise ValueError(f"editing sigmas must be >= sigma_min = {sigma_min}, got {sigmas[-1]}")
    operator = operator or Identity()
    mask = torch.ones((), dtype=y.dtype, device=y.device) if mask is None else mask.to(y)
    a_y = operator.forward(y)

    def noise():
        return torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)

    x = y + sigmas[0] * noise()
    for i, sigma in enumerate(sigmas):
        x0 = model(x, sigma, condition)
        if clip is not None:
            x0 = x0.clamp(*clip)
        x0 = project(x0, a_y, operator, mask)
        if i + 1 < len(sigmas):
            x = x0 + math.sqrt(sigmas[i + 1] ** 2 - sigma_min ** 2) * noise()
    if clip is not None:
        x0 = fit_range(x0, a_y, operator, mask, *clip)
    return x0


def slerp(a: torch.Tensor, b: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (each (1, ...)) at each alpha in [0, 1]."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = (a64 @ b64) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    alphas = alphas.double()
    if float(theta) < 1e-6:  # parallel: the linear blend is the limit
        wa, wb = 1 - alphas, alphas
    else:
        wa, wb = torch.sin((1 - alphas) * theta) / torch.sin(theta), torch.sin(alphas * theta) / torch.sin(theta)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)
