"""Directional derivatives of a network for the JVP-based objectives (sCM, MeanFlow)."""

from __future__ import annotations

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
        return _autograd(fn, primals, tangents, module)
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


def _autograd_jvp(fn, primals: tuple, tangents: tuple, module) -> tuple:
    """``torch.func.jvp`` runs eager, also inside a compiled training step: dynamo cannot trace
    forward-mode AD through the UNet (torch 2.13: fake-tensor ``_fw_primal`` errors, and the
    forward-AD-safe layer swap mutates modules). The step's graph breaks around it; the gradient
    pass, the costly part, stays compiled. ``finite_difference`` is plain forward passes and compiles."""
    from ..nets.unet import forward_ad_safe
    with forward_ad_safe(module if module is not None else torch.nn.Identity()):
        return torch.func.jvp(fn, primals, tangents)


_autograd = _autograd_jvp  # what jvp() calls; run_eager_under_compile() swaps in the disabled one


def run_eager_under_compile() -> None:
    """Make the autograd JVP run eager inside ``torch.compile``d code (a graph break). Called by
    whoever compiles a step, not at import: ``torch.compiler.disable`` loads dynamo (a second)."""
    global _autograd
    _autograd = torch.compiler.disable(_autograd_jvp)


def _at_least_float32(tensors: tuple) -> tuple:
    return tuple(x.float() if x.is_floating_point() and x.element_size() < 4 else x for x in tensors)


class _no_tf32_matmul:
    """Full-precision float32 matmuls for the duration (restores the caller's setting)."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved
