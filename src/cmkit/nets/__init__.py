"""Backbones: networks F(x, c_noise, class_labels=None) -> tensor shaped like x.

A backbone knows nothing about noise levels or parametrizations; `cmkit.precond` wraps it into a
denoiser or a consistency function. New backbones register in `BACKBONES` under a name that a
run's config can refer to.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .mlp import ResidualMLP
from .unet import PRESETS as UNET_PRESETS, UNet


class Backbone(Protocol):
    def __call__(self, x: torch.Tensor, c_noise: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor: ...


BACKBONES = {"mlp": ResidualMLP, "unet": UNet}


def build_backbone(config: dict) -> torch.nn.Module:
    """Build a backbone from a run config's ``model`` section (``{"backbone": name, ...}``)."""
    kwargs = dict(config)
    name = kwargs.pop("backbone")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    kwargs.pop("c_noise", None)  # consumed by the preconditioner, not the backbone
    return BACKBONES[name](**kwargs)


__all__ = ["Backbone", "BACKBONES", "ResidualMLP", "UNET_PRESETS", "UNet", "build_backbone"]
