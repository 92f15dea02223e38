"""Samplers as plain functions over a model, in the style of k-diffusion.

Every sampler takes ``x``, the starting point already at noise level ``sigmas[0]``
(``x = sigmas[0] * z`` for generation), and a strictly decreasing ``sigmas`` tensor. Diffusion
samplers take a denoiser D(x, sigma) and usually end their grid with 0 (`noise.append_zero`);
the consistency sampler takes a consistency function f(x, sigma). Randomness comes only from the
``generator`` argument, so a seed fixes the result.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Model = Callable[..., torch.Tensor]


def _check_sigmas(sigmas: torch.Tensor, allow_zero_end: bool) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError("sigmas must be a non-empty 1-D tensor")
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    positive = sigmas[:-1] if allow_zero_end else sigmas
    if not bool((positive > 0).all()) or bool((sigmas < 0).any()):
        raise ValueError("sigmas must be positive" + (" (the last may be 0)" if allow_zero_end else ""))


def _ode_derivative(denoiser: Model, x, sigma, condition):
    """dx/dsigma of the probability-flow ODE: (x - D(x, sigma)) / sigma."""
    return (x - denoiser(x, sigma, condition)) / sigma


@torch.no_grad()
def sample_euler(denoiser: Model, x: torch.Tensor, sigmas: torch.Tensor,
                 condition=None) -> torch.Tensor:
    """First-order Euler steps on the PF-ODE over ``sigmas`` (NFE = len(sigmas) - 1)."""
    _check_sigmas(sigmas, allow_zero_end=True)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * _ode_derivative(denoiser, x, sigma, condition)
    return x


@torch.no_grad()
def sample_heun(denoiser: Model, x: torch.Tensor, sigmas: torch.Tensor,
                condition=None, *, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM Algorithm 2: Heun's second-order method with optional stochastic churn.

    A step into sigma = 0 is a plain Euler step, so a Karras grid of n levels plus a final 0
    costs 2n - 1 evaluations (18 levels: 35 NFE). With s_churn > 0, each level in
    [s_tmin, s_tmax] is first raised to sigma_hat = sigma (1 + gamma),
    gamma = min(s_churn / n_steps, sqrt(2) - 1), by adding fresh noise scaled by s_noise.
    """
    _check_sigmas(sigmas, allow_zero_end=True)
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got {s_churn}, {s_noise}")
    n_steps = len(sigmas) - 1
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = x + (sigma_hat**2 - sigma**2).sqrt() * s_noise * eps
        d = _ode_derivative(denoiser, x, sigma_hat, condition)
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:
            d_next = _ode_derivative(denoiser, x_next, sigma_next, condition)
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
    return x


@torch.no_grad()
def sample_consistency(model: Model, x: torch.Tensor, sigmas: torch.Tensor,
                       condition=None, *, sigma_min: float = 0.002,
                       generator: torch.Generator | None = None, noises=None) -> torch.Tensor:
    """One-step (``sigmas = [sigma_max]``) or multistep consistency sampling.

    x <- f(x, sigmas[0]); then for each later level s: x <- f(x + sqrt(s^2 - sigma_min^2) z, s),
    z drawn from ``generator`` or, when given, taken from ``noises`` (one tensor per later level).
    NFE = len(sigmas).
    """
    _check_sigmas(sigmas, allow_zero_end=False)
    if float(sigmas[-1]) < sigma_min:
        raise ValueError(f"consistency sampling levels must be >= sigma_min = {sigma_min}")
    if noises is not None and len(noises) != len(sigmas) - 1:
        raise ValueError(f"need {len(sigmas) - 1} re-noising tensors, got {len(noises)}")
    x = model(x, sigmas[0], condition)
    for i, sigma in enumerate(sigmas[1:]):
        if noises is not None:
            z = noises[i].to(x)
        else:
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = model(x + (sigma**2 - sigma_min**2).sqrt() * z, sigma, condition)
    return x


SAMPLERS = {"heun": sample_heun, "euler": sample_euler}  # ODE solvers of a diffusion model


def sample_levels(model: Model, x: torch.Tensor, sigmas: torch.Tensor, condition=None, *,
                  diffusion: bool, sampler: str = "heun", sigma_min: float = 0.002,
                  generator: torch.Generator | None = None, noises=None, **churn) -> torch.Tensor:
    """The sampler for a model of its kind: a diffusion model's denoiser through the ODE solver
    ``sampler`` (`SAMPLERS`; ``churn``: Heun's s_churn, s_tmin, s_tmax, s_noise), a consistency
    function through `sample_consistency` (re-noised from ``generator`` or ``noises``). Every front
    end (`cmkit.Run`, the server) samples through this one choice."""
    if not diffusion:
        return sample_consistency(model, x, sigmas, condition, sigma_min=sigma_min, generator=generator,
                                  noises=noises)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    extra = {**churn, "generator": generator} if churn else {}
    return SAMPLERS[sampler](model, x, sigmas, condition, **extra)
