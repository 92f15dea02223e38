"""A residual MLP for vector data (2-D toys, tabular rows)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .conditioning import check_condition, labels_or_null, zero_last_layer


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar time input (fixed, not trained)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        self.register_buffer("freqs", torch.randn(dim // 2) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * t[:, None] * self.freqs[None, :].to(t.dtype)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding, for inputs on a large range (e.g. 0..1000)."""

    def __init__(self, dim: int, max_positions: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        half = dim // 2
        self.register_buffer("freqs", (1 / max_positions) ** (torch.arange(half) / half))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.freqs[None, :].to(t.dtype)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        r = self.fc1(nn.functional.silu(self.norm(h))) + self.emb(emb)
        r = self.fc2(self.dropout(nn.functional.silu(r)))
        return h + r


# Guidance scales span about 0..10: slow Fourier features, so nearby scales embed nearby.
GUIDANCE_FOURIER_SCALE = 0.1


class ResidualMLP(nn.Module):
    """F(x, c_noise, condition) for x of shape (B, dim) (condition kinds: labels, guidance).

    Time enters every residual block through a learned projection of a sinusoidal embedding of
    c_noise. ``embedding="fourier"`` suits EDM's small-range c_noise (ln(sigma)/4);
    ``"positional"`` suits OpenAI's 0..1000 range. With ``num_classes`` K > 0 a learned embedding
    of the label (K + 1 rows, the last the null label) is added to the time embedding; with
    ``guidance`` so is an embedding of the guidance scale (see `cmkit.nets.conditioning`).
    """

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb_dim: int = 64,
                 embedding: str = "fourier", fourier_scale: float = 1.0, dropout: float = 0.0,
                 time_inputs: int = 1, num_classes: int = 0, guidance: bool = False):
        super().__init__()
        if time_inputs not in (1, 2):
            raise ValueError(f"time_inputs must be 1 or 2, got {time_inputs}")
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError("dim, width and depth must be positive")
        if embedding == "fourier":
            self.time_embed = FourierEmbedding(emb_dim, fourier_scale)
        elif embedding == "positional":
            self.time_embed = PositionalEmbedding(emb_dim)
        else:
            raise ValueError(f"unknown embedding {embedding!r}; use 'fourier' or 'positional'")
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # A second time input (MeanFlow's t - r) gets its own projection of the same embedding.
        self.time_mlp2 = (nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                          if time_inputs == 2 else None)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unconditional), got {num_classes}")
        self.num_classes, self.guidance_input = num_classes, guidance
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.guidance_embed = (nn.Sequential(FourierEmbedding(emb_dim, GUIDANCE_FOURIER_SCALE),
                                             zero_last_layer(nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(),
                                                                           nn.Linear(emb_dim, emb_dim))))
                               if guidance else None)
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(ResidualBlock(width, emb_dim, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, condition=None) -> torch.Tensor:
        if x.ndim != 2:
            raise ValueError(f"ResidualMLP takes (batch, dim) inputs, got shape {tuple(x.shape)}")
        c_noise = c_noise.to(x.dtype).expand(x.shape[0]) if c_noise.ndim == 0 else c_noise.to(x.dtype)
        if (c_noise.ndim == 2) != (self.time_mlp2 is not None):
            raise ValueError(f"this ResidualMLP takes {1 if self.time_mlp2 is None else 2} time input(s), "
                             f"got c_noise of shape {tuple(c_noise.shape)}")
        if c_noise.ndim == 2:
            emb = self.time_mlp(self.time_embed(c_noise[:, 0])) + self.time_mlp2(self.time_embed(c_noise[:, 1]))
        else:
            emb = self.time_mlp(self.time_embed(c_noise))
        condition = check_condition("ResidualMLP", self.num_classes, self.guidance_input, condition)
        if self.class_embed is not None:
            emb = emb + self.class_embed(labels_or_null(condition.labels, self.num_classes, x.shape[0], x.device))
        if self.guidance_embed is not None:
            guidance = condition.guidance.to(x.device, x.dtype).expand(x.shape[0])
            emb = emb + self.guidance_embed(guidance)
        emb = nn.functional.silu(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(nn.functional.silu(self.out_norm(h)))
