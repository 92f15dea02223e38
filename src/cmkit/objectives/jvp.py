"""Directional derivatives of a network for the JVP-based objectives (sCM, MeanFlow)."""

from __future__ import annotations

import torch

from .rng import SharedRNG

JVP_MODES = ("autograd", "finite_difference")


def jvp(fn, primals: tuple, tangents: tuple, mode: str = "autograd", eps: float = 1e-3, module=None):
    """(fn(*primals), d/ds fn(primals + s tangents) at s = 0).

    ``autograd``: ``torch.func.jvp``, with diffusers' fused attention in ``module`` swapped for
    forward-AD-capable kernels. ``finite_difference``: a central difference of step ``eps``, all
    three passes with the same dropout masks."""
    if mode == "autograd":
        from ..nets.unet import forward_ad_safe
        with forward_ad_safe(module if module is not None else torch.nn.Identity()):
            return torch.func.jvp(fn, primals, tangents)
    if mode != "finite_difference":
        raise ValueError(f"unknown jvp mode {mode!r}; known: {', '.join(JVP_MODES)}")
    rng = SharedRNG(primals[0].device)
    out = fn(*primals)
    rng.replay()
    plus = fn(*(p + eps * d for p, d in zip(primals, tangents)))
    rng.replay()
    minus = fn(*(p - eps * d for p, d in zip(primals, tangents)))
    return out, (plus - minus) / (2 * eps)
