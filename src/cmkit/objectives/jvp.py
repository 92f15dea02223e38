"""Directional derivatives of a network for the JVP-based objectives (sCM, MeanFlow)."""

from __future__ import annotations

import contextlib

import torch

from .rng import SharedRNG

JVP_MODES = ("autograd", "finite_difference")


def jvp(fn, primals: tuple, tangents: tuple, mode: str = "autograd", eps: float = 1e-3, module=None):
    """(fn(*primals), d/ds fn(primals + s tangents) at s = 0).

    ``autograd``: ``torch.func.jvp``, with diffusers' fused attention in ``module`` swapped for
    forward-AD-capable kernels. ``finite_difference``: a central difference of step ``eps``, all
    three passes with the same dropout masks, in full float32: under bf16 autocast or TF32
    convolutions the rounding error (~1e-3 relative) is as large as the step itself, and the
    difference quotient would be noise."""
    if mode == "autograd":
        from ..nets.unet import forward_ad_safe
        with forward_ad_safe(module if module is not None else torch.nn.Identity()), _eager():
            return torch.func.jvp(fn, primals, tangents)
    if mode != "finite_difference":
        raise ValueError(f"unknown jvp mode {mode!r}; known: {', '.join(JVP_MODES)}")
    device = primals[0].device
    rng = SharedRNG(device)
    with torch.autocast(device.type, enabled=False), torch.backends.cudnn.flags(
            enabled=torch.backends.cudnn.enabled, allow_tf32=False), _no_tf32_matmul():
        primals, tangents = _at_least_float32(primals), _at_least_float32(tangents)
        out = fn(*primals)
        rng.replay()
        plus = fn(*(p + eps * d for p, d in zip(primals, tangents)))
        rng.replay()
        minus = fn(*(p - eps * d for p, d in zip(primals, tangents)))
    return out, (plus - minus) / (2 * eps)


def _eager():
    """Compiled modules run eager inside ``torch.func.jvp``: dynamo does not trace forward-mode AD
    there, and a frame it gives up on stays uncompiled for the gradient pass as well (measured:
    with train.compile, sCT and MeanFlow compiled nothing). The gradient pass, the costly part,
    stays compiled. (torch < 2.6 has no stance: there compile and the JVP may not mix.)"""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _at_least_float32(tensors: tuple) -> tuple:
    return tuple(x.float() if x.is_floating_point() and x.element_size() < 4 else x for x in tensors)


class _no_tf32_matmul:
    """Full-precision float32 matmuls for the duration (restores the caller's setting)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved
