"""A diffusers ``UNet2DConditionModel`` (Stable Diffusion's latent UNet) as a backbone F(x, time,
condition) (kinds: text, guidance): prompts enter as per-token embeddings through cross-attention
(``encoder_hidden_states``), a guided student's scale through LCM's w embedding (``timestep_cond``,
the UNet's ``time_cond_proj_dim``).

A condition without ``text`` means the empty prompt: the backbone keeps that embedding as a buffer
(``null_text``, saved with the weights), as a class-conditional backbone keeps its null label.

The guidance convention is the pipelines': cmkit's (and ``guidance_scale``'s) w_cfg is LCM's w + 1,
and ``LatentConsistencyModelPipeline`` embeds w = guidance_scale - 1 as sinusoids of 1000 w
(`guidance_embedding`), so an exported student reads the same scale users pass to cmkit.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..condition import GUIDANCE, TEXT, as_condition
from .diffusers_unet import _PRIVATE

LCM_TIME_COND_DIM = 256  # the w embedding's width in LCM's reference scripts (--unet_time_cond_proj_dim)
# The w projection a student adds starts at zero (the student starts as its teacher). False: torch's
# default random init, as the reference scripts leave it (bench/latent_fmnist.py measures both).
ZERO_W_INIT = True


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of 1000 w (VDM's timestep embedding), as
    ``LatentConsistencyModelPipeline.get_guidance_scale_embedding`` computes it."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def add_lora(unet, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> None:
    """Freeze ``unet`` and add LoRA adapters (peft, through diffusers' adapter API) to the modules
    named ``target_modules``; their B matrices start at zero, so the network is unchanged."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    names = [name for name, _ in unet.named_modules()]
    targets = [t for t in target_modules if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise ValueError(f"no module of the UNet is named like the LoRA targets {target_modules}")
    unet.add_adapter(LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=dropout, target_modules=targets))


class _TorchvisionFallbackNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_torchvision_notice() -> None:
    """Call before importing diffusers' Stable Diffusion pipelines. They import transformers' CLIP
    image processor (for the safety checker's feature extractor, which cmkit never uses), and
    without torchvision transformers warns that it falls back to its PIL version: noise in cmkit's
    output, as nothing of cmkit's needs torchvision. Only that warning is dropped."""
    logger = logging.getLogger("transformers.utils.import_utils")  # the one transformers warns through
    if not any(isinstance(f, _TorchvisionFallbackNotice) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackNotice())


def save_lora(unet, folder, weight_name: str) -> None:
    """The adapters as a diffusers LoRA file (``folder``/``weight_name``), written by
    ``StableDiffusionPipeline.save_lora_weights`` itself with the adapter's config as metadata (its
    alpha included), so ``pipe.load_lora_weights(folder)`` rebuilds exactly these adapters."""
    quiet_torchvision_notice()
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
    metadata = unet.peft_config["default"].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state, weight_name=weight_name,
                                              unet_lora_adapter_metadata=metadata, safe_serialization=True)


def text_unet_config(unet) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unet.config).items() if k not in _PRIVATE}


class DiffusersTextUNet(nn.Module):
    """``unet``: a UNet2DConditionModel or its config (random weights). ``text_shape``: (L, D) of
    the prompt embeddings. ``guidance``: take a guidance scale through ``time_cond_proj_dim``
    (added at `LCM_TIME_COND_DIM` when the UNet lacks it, its projection starting at zero so a
    student equals its teacher at every scale when training starts). ``lora``: LoRA adapters
    (`add_lora`'s keywords) on a frozen UNet: only they train."""

    num_classes = 0

    def __init__(self, unet, text_shape, guidance: bool = False, image_channels: int | None = None,
                 resolution: int | None = None, num_classes: int = 0, lora: dict | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        if num_classes:
            raise ValueError("a text-conditioned UNet takes prompts, not class labels")
        config = unet if isinstance(unet, dict) else text_unet_config(unet)
        config = {k: v for k, v in config.items() if k not in _PRIVATE}
        if guidance and config.get("time_cond_proj_dim") is None:
            config["time_cond_proj_dim"] = LCM_TIME_COND_DIM
            state = None if isinstance(unet, dict) else unet.state_dict()
            unet = UNet2DConditionModel.from_config(config)
            if ZERO_W_INIT:
                nn.init.zeros_(unet.time_embedding.cond_proj.weight)
            if state is not None:
                unet.load_state_dict(state, strict=False)
        elif isinstance(unet, dict):
            unet = UNet2DConditionModel.from_config(config)
        self.unet = unet
        config = unet.config
        size = config.sample_size
        self.image_channels, self.resolution = config.in_channels, size if isinstance(size, int) else size[0]
        if config.out_channels != config.in_channels:
            raise ValueError("cmkit takes UNets whose output has the input's channels")
        for name, want, have in (("channels", image_channels, self.image_channels),
                                 ("resolution", resolution, self.resolution)):
            if want is not None and want != have:
                raise ValueError(f"the latents have {name} {want}, but the UNet takes {have}")
        self.text_shape = tuple(text_shape)
        if config.cross_attention_dim != self.text_shape[1]:
            raise ValueError(f"the UNet attends to {config.cross_attention_dim}-wide embeddings, but the text encoder "
                             f"makes {self.text_shape[1]}-wide ones")
        self.guidance_input = bool(guidance)
        self.register_buffer("null_text", torch.zeros(1, *self.text_shape))
        self.lora = dict(lora) if lora else None
        if self.lora:
            add_lora(unet, **self.lora)

    def forward(self, x: torch.Tensor, time: torch.Tensor, condition=None) -> torch.Tensor:
        condition = as_condition(condition)
        unknown = sorted(set(condition) - {TEXT, GUIDANCE})
        if unknown:
            raise ValueError(f"this text-conditioned UNet takes no {unknown[0]!r} condition (it takes a prompt)")
        if (condition.guidance is not None) != self.guidance_input:
            raise ValueError(f"this UNet {'needs' if self.guidance_input else 'takes no'} guidance scale input")
        B = x.shape[0]
        text = condition.text
        text = self.null_text.expand(B, -1, -1) if text is None else text.to(x.device, x.dtype)
        if tuple(text.shape[1:]) != self.text_shape:
            raise ValueError(f"prompt embeddings must have shape (n, {self.text_shape[0]}, {self.text_shape[1]}), got "
                             f"{tuple(text.shape)}")
        time = torch.as_tensor(time, device=x.device).float().expand(B)
        cond = None
        if self.guidance_input:
            w = condition.guidance.to(x.device).float().expand(B) - 1  # LCM's w is the pipelines' scale - 1
            cond = guidance_embedding(w, self.unet.config.time_cond_proj_dim).to(x.dtype)
        return self.unet(x, time, encoder_hidden_states=text, timestep_cond=cond).sample
