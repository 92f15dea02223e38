"""Image backbone: diffusers' ``UNet2DModel`` behind cmkit's backbone interface.

We use diffusers' network rather than our own so that a cmkit image model is, weight for weight,
the network that diffusers' ``ConsistencyModelPipeline`` and OpenAI's converted checkpoints use:
BigGAN-style residual up/down-sampling, scale-shift time conditioning, sinusoidal time
embeddings over a 0..1000 range. That range is why image runs use the ``openai`` c_noise
(1000 * 0.25 * ln sigma). A hand-written UNet would have to beat this one on speed or quality to
earn its place; see docs/design.md.
"""

from __future__ import annotations

import torch
from torch import nn

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


class UNet(nn.Module):
    """F(x, c_noise, class_labels) with x of shape (B, C, H, W), H = W = ``resolution``.

    ``channels``, ``layers_per_block``, ``attention`` (a list of resolutions at which to attend,
    as in OpenAI's and EDM's ``attention_resolutions``) and ``dropout`` override the preset's."""

    def __init__(self, image_channels: int, resolution: int, preset: str = "small",
                 channels: list[int] | None = None, layers_per_block: int | None = None,
                 attention: list[int] | None = None, dropout: float | None = None,
                 num_classes: int | None = None, time_inputs: int = 1):
        super().__init__()
        if time_inputs not in (1, 2):
            raise ValueError(f"time_inputs must be 1 or 2, got {time_inputs}")
        if time_inputs == 2 and num_classes is not None:
            raise ValueError("a UNet with two time inputs cannot also take class labels yet")
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
        self.image_channels, self.resolution = image_channels, resolution
        self.unet = UNet2DModel(
            sample_size=resolution, in_channels=image_channels, out_channels=image_channels,
            block_out_channels=channels, layers_per_block=layers,
            down_block_types=tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attend),
            up_block_types=tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attend)),
            downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
            attention_head_dim=spec["head_dim"], norm_num_groups=groups, attn_norm_num_groups=groups,
            dropout=spec["dropout"] if dropout is None else dropout, num_class_embeds=num_classes,
            # The second time input (MeanFlow's t - r) enters through diffusers' timestep-type
            # class embedding: sinusoidal features and an MLP, added to the time embedding.
            class_embed_type="timestep" if time_inputs == 2 else None,
        )
        self.time_inputs = time_inputs

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1:] != (self.image_channels, self.resolution, self.resolution):
            raise ValueError(f"expected images of shape ({self.image_channels}, {self.resolution}, "
                             f"{self.resolution}), got {tuple(x.shape[1:])}")
        if class_labels is not None and self.unet.config.num_class_embeds is None:
            raise ValueError("this UNet is unconditional; it takes no class labels")
        c_noise = c_noise.to(x.dtype)
        if (c_noise.ndim == 2) != (self.time_inputs == 2):
            raise ValueError(f"this UNet takes {self.time_inputs} time input(s), got c_noise of shape "
                             f"{tuple(c_noise.shape)}")
        if self.time_inputs == 2:
            return self.unet(x, c_noise[:, 0], class_labels=c_noise[:, 1]).sample
        return self.unet(x, c_noise.expand(x.shape[0]), class_labels=class_labels).sample


class forward_ad_safe:
    """Within this context, diffusers attention layers in ``module`` use plain matmul + softmax
    (``AttnProcessor``) instead of fused scaled-dot-product kernels, which have no forward-mode AD
    (``torch.func.jvp``) on some builds. Modules without diffusers attention pass through."""

    def __init__(self, module):
        self.module, self.saved = module, []

    def __enter__(self):
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
        self.saved = []
