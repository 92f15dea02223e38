"""Backbones: networks F(x, c_noise, condition=None) -> tensor shaped like x.

A backbone knows nothing about noise levels or parametrizations; it is where the kinds of a
`cmkit.condition.Condition` are told apart; `cmkit.precond` wraps it into a
denoiser or a consistency function. New backbones register in `BACKBONES` under a name that a
run's config can refer to.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..condition import Condition
from .diffusers_text_unet import DiffusersTextUNet
from .diffusers_unet import DiffusersUNet
from .mlp import ResidualMLP
from .unet import PRESETS as UNET_PRESETS, UNet


class Backbone(Protocol):
    def __call__(self, x: torch.Tensor, c_noise: torch.Tensor, condition: Condition | None = None) -> torch.Tensor: ...


BACKBONES = {"mlp": ResidualMLP, "unet": UNet, "diffusers": DiffusersUNet, "diffusers-text": DiffusersTextUNet}


def build_backbone(config: dict) -> torch.nn.Module:
    """Build a backbone from a run config's ``model`` section (``{"backbone": name, ...}``)."""
    kwargs = dict(config)
    name = kwargs.pop("backbone")
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}")
    for key in ("c_noise", "vp"):  # consumed by the preconditioner, not the backbone
        kwargs.pop(key, None)
    kwargs["num_classes"] = kwargs.get("num_classes") or 0  # null (not yet resolved) or absent: unconditional
    return BACKBONES[name](**kwargs)


# Where a label embedding lives when a UNet also takes a guidance scale (`unet.ConditionEmbedding`).
_RENAMED = {"unet.class_embedding.weight": "unet.class_embedding.labels.weight"}


def load_backbone_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copy ``source``'s weights into ``target``, the same network except that ``target`` may add a
    guidance-scale input (a guided student started from its teacher) or LoRA adapters: those new
    weights keep their initialisation, whose zero last layer makes the student equal the teacher."""
    state = source.state_dict()
    wanted = target.state_dict()
    state = {(_RENAMED.get(k, k) if k not in wanted else k): v for k, v in state.items()}
    # A layer LoRA adapts keeps its weights under ``base_layer`` (peft).
    adapted = {k.replace(".base_layer.", "."): k for k in wanted if ".base_layer." in k}
    state = {adapted.get(k, k): v for k, v in state.items()}
    missing, unexpected = target.load_state_dict(state, strict=False)
    new = [k for k in missing if "guidance" not in k and "cond_proj" not in k  # cond_proj: LCM's w input
           and ".lora_" not in k]
    if new or unexpected:
        raise ValueError(f"the networks differ: missing {new[:3]}, unexpected {unexpected[:3]}")


__all__ = ["Backbone", "BACKBONES", "DiffusersTextUNet", "DiffusersUNet", "ResidualMLP", "UNET_PRESETS", "UNet", "build_backbone", "load_backbone_weights"]
