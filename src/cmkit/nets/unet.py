"""Image backbone: diffusers' ``UNet2DModel`` behind cmkit's backbone interface.

We use diffusers' network rather than our own so that a cmkit image model is, weight for weight,
the network that diffusers' ``ConsistencyModelPipeline`` and OpenAI's converted checkpoints use:
BigGAN-style residual up/down-sampling, scale-shift time conditioning, sinusoidal time
embeddings over a 0..1000 range. That range is why image runs use the ``openai`` c_noise
(1000 * 0.25 * ln sigma). A hand-written UNet would have to beat this one on speed or quality to
earn its place; see docs/design.md.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .conditioning import check_condition, labels_or_null, zero_last_layer

# Presets: (channels per level, residual blocks per level, attention levels counted from the
# top, attention head width, GroupNorm groups, default dropout).
PRESETS = {
    # For tests and CPU experiments: two levels, no attention, ~0.1M parameters.
    "tiny": dict(channels=(16, 32), layers_per_block=1, attention_levels=(), head_dim=8, groups=8, dropout=0.0),
    # 28-32 px (Fashion-MNIST, CIFAR-sized data): three levels, attention at the lowest.
    "small": dict(channels=(64, 128, 256), layers_per_block=2, attention_levels=(2,), head_dim=32, groups=32,
                  dropout=0.1),
    # DDPM++ / NCSN++-sized (Song et al. 2021; EDM's CIFAR-10 net): 32-64 px, attention at 16 px.
    "ddpmpp": dict(channels=(128, 256, 256, 256), layers_per_block=4, attention_levels=(1,), head_dim=64,
                   groups=32, dropout=0.1),
}


# A guidance scale w enters diffusers' sinusoidal projection as GUIDANCE_SCALE * w: w in 0..10
# then spans the 0..1000 range the projection's frequencies are made for.
GUIDANCE_SCALE = 100.0


class ConditionEmbedding(nn.Module):
    """What a UNet adds to its time embedding when it takes more than a class label: the sum of a
    label embedding (K + 1 rows, the last the null label), a second time input's embedding
    (MeanFlow's t - r) and a guidance scale's embedding (last layer zero at initialisation). It
    sits in diffusers' ``class_embedding`` slot and receives the tuple (labels, time2, guidance)."""

    def __init__(self, time_proj: nn.Module, proj_dim: int, emb_dim: int, num_classes: int,
                 second_time: bool, guidance: bool):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.time_proj = time_proj  # shared with the UNet: it holds no weights
        self.labels = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.second_time = TimestepEmbedding(proj_dim, emb_dim) if second_time else None
        self.guidance = zero_last_layer(TimestepEmbedding(proj_dim, emb_dim)) if guidance else None

    def forward(self, inputs: tuple) -> torch.Tensor:
        labels, time2, guidance = inputs
        out = 0
        if self.labels is not None:
            out = out + self.labels(labels)
        if self.second_time is not None:
            out = out + self.second_time(self.time_proj(time2))
        if self.guidance is not None:
            out = out + self.guidance(self.time_proj(GUIDANCE_SCALE * guidance))
        return out


class UNet(nn.Module):
    """F(x, c_noise, condition) with x of shape (B, C, H, W), H = W = ``resolution`` (condition
    kinds: labels, guidance).

    ``channels``, ``layers_per_block``, ``attention`` (a list of resolutions at which to attend,
    as in OpenAI's and EDM's ``attention_resolutions``) and ``dropout`` override the preset's.
    ``num_classes`` K > 0 makes it class-conditional (labels 0..K-1, K the null label),
    ``guidance`` gives it a guidance-scale input (see `cmkit.nets.conditioning`)."""

    def __init__(self, image_channels: int, resolution: int, preset: str = "small",
                 channels: list[int] | None = None, layers_per_block: int | None = None,
                 attention: list[int] | None = None, dropout: float | None = None,
                 num_classes: int = 0, time_inputs: int = 1, guidance: bool = False):
        super().__init__()
        if time_inputs not in (1, 2):
            raise ValueError(f"time_inputs must be 1 or 2, got {time_inputs}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        from diffusers import UNet2DModel  # heavy import; only image runs pay for it

        if preset not in PRESETS:
            raise ValueError(f"unknown UNet preset {preset!r}; known: {', '.join(PRESETS)}")
        spec = PRESETS[preset]
        channels = tuple(channels or spec["channels"])
        layers = layers_per_block if layers_per_block is not None else spec["layers_per_block"]
        levels = len(channels)
        if resolution % 2 ** (levels - 1):
            raise ValueError(f"resolution {resolution} is not divisible by {2 ** (levels - 1)}, which a "
                             f"{levels}-level UNet needs: pad or resize with --set data.resolution=N")
        level_res = [resolution // 2 ** i for i in range(levels)]
        if attention is None:
            attention = [level_res[i] for i in spec["attention_levels"] if i < levels]
        unknown = sorted(set(attention) - set(level_res))
        if unknown:
            raise ValueError(f"attention resolutions {unknown} are not levels of this UNet ({level_res})")
        groups = spec["groups"]
        if any(c % groups for c in channels):
            groups = 8 if all(c % 8 == 0 for c in channels) else 1
        attend = [r in attention for r in level_res]
        # Class labels alone use diffusers' own label embedding (num_class_embeds), so such a UNet is
        # exactly the one diffusers' pipelines load; a second time input alone uses its timestep-type
        # embedding; any other combination goes through a ConditionEmbedding in the same slot.
        combined = guidance or (num_classes and time_inputs == 2)
        self.image_channels, self.resolution = image_channels, resolution
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=image_channels, out_channels=image_channels,
            block_out_channels=channels, layers_per_block=layers,
            down_block_types=tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attend),
            up_block_types=tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attend)),
            downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
            attention_head_dim=spec["head_dim"], norm_num_groups=groups, attn_norm_num_groups=groups,
            dropout=spec["dropout"] if dropout is None else dropout,
            num_class_embeds=num_classes + 1 if num_classes and not combined else None,
            class_embed_type="timestep" if time_inputs == 2 and not combined else None,
        )
        if combined:
            emb_dim = self.unet.time_embedding.linear_2.out_features
            self.unet.class_embedding = ConditionEmbedding(self.unet.time_proj, channels[0], emb_dim, num_classes,
                                                           time_inputs == 2, guidance)
        self.time_inputs, self.num_classes, self.guidance_input, self.combined = (time_inputs, num_classes,
                                                                                  guidance, bool(combined))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, condition=None) -> torch.Tensor:
        if x.shape[1:] != (self.image_channels, self.resolution, self.resolution):
            raise ValueError(f"expected images of shape ({self.image_channels}, {self.resolution}, "
                             f"{self.resolution}), got {tuple(x.shape[1:])}")
        condition = check_condition("UNet", self.num_classes, self.guidance_input, condition)
        c_noise = c_noise.to(x.dtype)
        if (c_noise.ndim == 2) != (self.time_inputs == 2):
            raise ValueError(f"this UNet takes {self.time_inputs} time input(s), got c_noise of shape "
                             f"{tuple(c_noise.shape)}")
        B = x.shape[0]
        time = c_noise[:, 0] if self.time_inputs == 2 else c_noise.expand(B)
        time2 = c_noise[:, 1] if self.time_inputs == 2 else None
        labels = labels_or_null(condition.labels, self.num_classes, B, x.device) if self.num_classes else None
        if self.combined:
            guidance = condition.guidance
            if guidance is not None:
                guidance = guidance.to(x.device, x.dtype).expand(B)
            extra = (labels, time2, guidance)
        else:
            extra = time2 if self.time_inputs == 2 else labels
        return self.unet(x, time, class_labels=extra).sample


def _group_norm(norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm from reshape, mean and var: ``torch.group_norm``'s forward-mode AD fails on the
    non-contiguous tangents that convolutions produce ("view size is not compatible")."""
    groups = x.reshape(x.shape[0], norm.num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, unbiased=False, keepdim=True)
    y = ((groups - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = y * norm.weight.reshape(shape) + norm.bias.reshape(shape)
    return y


class forward_ad_safe:
    """Within this context, layers of ``module`` whose kernels have no forward-mode AD
    (``torch.func.jvp``) on some builds use plain equivalents: diffusers attention runs as matmul +
    softmax (``AttnProcessor``) instead of fused scaled-dot-product kernels, and GroupNorm runs from
    reshape/mean/var. Other modules pass through."""

    def __init__(self, module):
        self.module, self.saved, self.norms = module, [], []

    def __enter__(self):
        for m in self.module.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.forward = functools.partial(_group_norm, m)
                self.norms.append(m)
        try:
            from diffusers.models.attention_processor import Attention, AttnProcessor
        except ImportError:
            return self
        for m in self.module.modules():
            if isinstance(m, Attention):
                self.saved.append((m, m.processor))
                m.set_processor(AttnProcessor())
        return self

    def __exit__(self, *exc):
        for m, processor in self.saved:
            m.set_processor(processor)
        for m in self.norms:
            del m.forward  # back to the class's forward
        self.saved, self.norms = [], []
