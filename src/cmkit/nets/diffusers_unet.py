"""Any diffusers ``UNet2DModel`` (one made by diffusers, not by cmkit's presets) as a backbone
F(x, time, condition) (kinds: labels, guidance): the network of an imported diffusers folder, and of the
students cmkit trains from it, rebuilt from the UNet's own config (``model.unet`` in a run's config).

The time input is whatever the preconditioning hands it (a diffusers timestep for VP models,
OpenAI's 250 ln sigma for consistency pipelines): integers for a learned time embedding, floats
otherwise (UNet2DModel casts a Python number to long, so it always gets a tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from .conditioning import check_condition, labels_or_null
from .unet import ConditionEmbedding

# Config keys of diffusers' own bookkeeping, not of the network.
_PRIVATE = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


def unet_config(unet) -> dict:
    """A loaded UNet2DModel's config as plain JSON values (what a run's config.json records)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if k not in _PRIVATE}


class DiffusersUNet(nn.Module):
    """``unet``: a UNet2DModel or its config (random weights). ``num_classes`` K: labels 0..K-1;
    ``null_label``: whether label K (no class, for classifier-free guidance) exists, which for an
    embedding table means K + 1 rows. ``guidance``: add a guidance-scale input (a guided student),
    whose embedding starts at zero. ``image_channels``/``resolution``: the data's, checked."""

    def __init__(self, unet, num_classes: int = 0, null_label: bool | None = None, guidance: bool = False,
                 image_channels: int | None = None, resolution: int | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        if isinstance(unet, dict):
            unet = UNet2DModel.from_config({k: v for k, v in unet.items() if k not in _PRIVATE})
        self.unet = unet
        config = unet.config
        size = config.sample_size
        self.image_channels = config.in_channels
        self.resolution = size if isinstance(size, int) else size[0]
        if config.out_channels != config.in_channels or not isinstance(self.resolution, int):
            raise ValueError("cmkit takes square UNet2DModels whose output has the input's channels")
        for name, want, have in (("channels", image_channels, self.image_channels),
                                 ("resolution", resolution, self.resolution)):
            if want is not None and want != have:
                raise ValueError(f"the data's images have {name} {want}, but the UNet takes {have}")
        self.learned_time = config.time_embedding_type == "learned"
        self.label_kind = _label_kind(config, num_classes)
        embeds = config.num_class_embeds or 0
        if null_label is None:
            null_label = self.label_kind == "embedding" and embeds == num_classes + 1
        if self.label_kind == "embedding" and embeds != num_classes + int(null_label):
            raise ValueError(f"the UNet embeds {embeds} labels, not {num_classes} classes"
                             + (" plus the null label" if null_label else ""))
        self.num_classes, self.null_label, self.guidance_input = num_classes, bool(null_label), guidance
        if guidance:
            if self.label_kind != "embedding":
                raise ValueError("guided distillation needs a UNet with a label embedding table (num_class_embeds)")
            emb_dim = unet.time_embedding.linear_2.out_features
            embedding = ConditionEmbedding(unet.time_proj, unet.time_embedding.linear_1.in_features, emb_dim,
                                           0, False, True)
            embedding.labels = unet.class_embedding  # the teacher's table, null row included
            unet.class_embedding = embedding

    def forward(self, x: torch.Tensor, time: torch.Tensor, condition=None) -> torch.Tensor:
        if x.shape[1:] != (self.image_channels, self.resolution, self.resolution):
            raise ValueError(f"expected images of shape ({self.image_channels}, {self.resolution}, "
                             f"{self.resolution}), got {tuple(x.shape[1:])}")
        condition = check_condition("UNet", self.num_classes, self.guidance_input, condition)
        B = x.shape[0]
        time = torch.as_tensor(time, device=x.device).expand(B)
        time = time.round().long() if self.learned_time else time.float()
        labels = None
        if self.num_classes:
            if condition.labels is None and not self.null_label:
                raise ValueError("this model has no null label: pass class labels")
            labels = labels_or_null(condition.labels, self.num_classes, B, x.device)
        if self.guidance_input:
            labels = (labels, None, condition.guidance.to(x.device, x.dtype).expand(B))
        return self.unet(x, time, class_labels=labels).sample


def _label_kind(config, num_classes: int) -> str | None:
    """How the UNet takes class labels: an embedding table (num_class_embeds), the timestep
    embedding (class_embed_type "timestep"), or not at all (None)."""
    kind = config.class_embed_type
    if kind is None and config.num_class_embeds:
        kind = "embedding"
    if kind not in (None, "embedding", "timestep"):
        raise ValueError(f"class_embed_type {kind!r} takes embeddings, not class labels; cmkit cannot condition it")
    if num_classes and kind is None:
        raise ValueError(f"the UNet takes no class labels, but {num_classes} classes were asked for")
    if kind and not num_classes:
        raise ValueError("the UNet is class-conditional: its number of classes must be known")
    return kind
