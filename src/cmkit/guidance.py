"""Classifier-free guidance (Ho & Salimans 2022), in the convention diffusers uses:

    D_w(x, sigma, c) = D(x, sigma, null) + w (D(x, sigma, c) - D(x, sigma, null))

w = 1 is the plain conditional denoiser, w = 0 the unconditional one, w > 1 sharpens toward the
class or prompt. The null condition is the null label K of a K-class model (see
`cmkit.nets.conditioning`), or the empty prompt's embedding of a text-conditioned one (its
backbone's ``null_text``); a teacher must be trained with condition dropout (``--label-dropout``)
for it to mean anything.

Guided distillation (as in latent consistency models) trains a student on the ODE of D_w with w
drawn per sample from a range, and gives w to the student as an input: `GuidanceInput` binds a
sampling-time w to such a student.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .batch_rng import batch_rng
from .condition import Condition, as_condition
from .nets.conditioning import labels_or_null

NEEDS_CONDITION = "classifier-free guidance needs class labels or a prompt"


def is_conditional(denoiser) -> bool:
    """Whether ``denoiser`` takes a condition that guidance can drop (class labels or a prompt)."""
    return bool(getattr(denoiser, "num_classes", 0)) or null_text(denoiser) is not None


def null_text(denoiser) -> torch.Tensor | None:
    """The empty prompt's embedding (1, L, D) of a text-conditioned denoiser (None otherwise)."""
    while denoiser is not None and not hasattr(denoiser, "null_text"):
        denoiser = getattr(denoiser, "backbone", None) or getattr(denoiser, "model", None) \
            or getattr(denoiser, "denoiser", None)
    return None if denoiser is None else denoiser.null_text


def unconditional(denoiser, condition: Condition, batch: int, device) -> Condition:
    """``condition`` with what guidance drops replaced by its null: the null label for class
    labels, the empty prompt for text."""
    if condition.labels is None and condition.text is None:
        raise ValueError(NEEDS_CONDITION)
    if condition.labels is not None:
        condition = condition.replace(labels=labels_or_null(None, denoiser.num_classes, batch, device))
    if condition.text is not None:
        condition = condition.replace(text=null_text(denoiser).to(device).expand(batch, -1, -1))
    return condition


def guided_denoise(denoiser, x: torch.Tensor, sigma, condition, scale) -> torch.Tensor:
    """D_w(x, sigma, c) for a scalar or per-sample scale w, in one batched call of the denoiser
    (conditional and unconditional halves side by side; the unconditional half's ``condition``
    has the null label)."""
    B = x.shape[0]
    condition = as_condition(condition)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    if scale.ndim == 0 and float(scale) == 1.0:
        return denoiser(x, sigma, condition)
    if condition.labels is None and condition.text is None:
        raise ValueError(NEEDS_CONDITION)
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
    cond = condition.to(x.device)
    if cond.labels is not None:
        cond = cond.replace(labels=cond.labels.long())
    cond = cond.expand(B)
    null = unconditional(denoiser, cond, B, x.device)
    both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Condition.cat([cond, null], [B, B]))
    cond, uncond = both[:B], both[B:]
    w = scale.reshape(-1, *[1] * (x.ndim - 1)) if scale.ndim else scale
    return uncond + w * (cond - uncond)


class GuidedDenoiser(nn.Module):
    """A denoiser with classifier-free guidance at scale ``scale``, for the samplers (a
    ``guidance`` kind in the condition overrides the scale per sample)."""

    def __init__(self, denoiser: nn.Module, scale):
        super().__init__()
        if not is_conditional(denoiser):
            raise ValueError("classifier-free guidance needs a class- or text-conditional denoiser")
        self.denoiser, self.scale = denoiser, scale

    @property
    def num_classes(self) -> int:
        return self.denoiser.num_classes

    def forward(self, x, sigma, condition=None):
        condition = as_condition(condition)
        if condition.labels is None and condition.text is None:
            raise ValueError(NEEDS_CONDITION)
        scale = self.scale if condition.guidance is None else condition.guidance
        return guided_denoise(self.denoiser, x, sigma, condition.replace(guidance=None), scale)


class GuidanceInput(nn.Module):
    """A guided-distilled student with its guidance-scale input fixed to ``scale``."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, float(scale)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def forward(self, x, sigma, condition=None):
        scale = torch.full((x.shape[0],), self.scale, device=x.device)
        return self.model(x, sigma, as_condition(condition).replace(guidance=scale))


def draw_scales(scale_range, batch: int, generator) -> torch.Tensor:
    """Guidance scales for one training batch, uniform in [lo, hi]."""
    lo, hi = scale_range
    return lo + (hi - lo) * batch_rng(generator).rand(batch)


def bind_condition(denoiser, condition=None, guidance=None):
    """D(x, sigma) with the condition bound, guided at per-sample scales ``guidance`` when given:
    the teacher's denoiser as the distillation objectives step its ODE."""
    if guidance is None:
        return lambda x, sigma: denoiser(x, sigma, condition)
    return lambda x, sigma: guided_denoise(denoiser, x, sigma, condition, guidance)


def default_guidance(scale_range) -> float:
    """The scale a guided student samples at when none is given: 1 (the teacher's plain
    conditional ODE, as for the teacher itself) clamped into the trained range."""
    lo, hi = scale_range
    return min(max(1.0, lo), hi)


def check_guidance_scale(scale: float) -> float:
    """A user's guidance scale: a finite number >= 0 (the one check the command line, the Python
    API and the server share)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"the guidance scale must be a finite number >= 0, got {scale!r}")
    return float(scale)
