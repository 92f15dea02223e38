"""Noise levels, preconditioning coefficients and time conversions.

The EDM noise level ``sigma`` (x_sigma = x0 + sigma * z) is cmkit's one canonical time variable.
Other conventions (TrigFlow time, flow-matching time) are converted here, at the edge, and
nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
SIGMA_DATA = 0.5
RHO = 7.0


@dataclass(frozen=True)
class NoiseConfig:
    """The noise range and data scale shared by a teacher, its students and their samplers."""

    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    sigma_data: float = SIGMA_DATA
    rho: float = RHO

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.sigma_data <= 0 or self.rho <= 0:
            raise ValueError("sigma_data and rho must be positive")

    def karras(self, n: int) -> torch.Tensor:
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)


# ---------------------------------------------------------------------------------------------
# Grids (schedules). Index 0 is the largest sigma; grids are strictly decreasing.


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """The Karras et al. (2022) grid of ``n`` levels, from sigma_max (index 0) down to sigma_min.

    sigma_i = (sigma_max^(1/rho) + i/(n-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    Computed in float64 so grid endpoints are exact, returned as float32.
    """
    if n < 2:
        raise ValueError(f"a Karras grid needs at least 2 levels, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas.float()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Append sigma = 0: diffusion samplers end on clean data."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def parse_sigmas(text: str) -> list[float]:
    """Parse "s1,s2,..." into a strictly decreasing list of positive floats."""
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--sigmas must be comma-separated numbers, got {text!r}") from None
    return check_sigmas(values, what="--sigmas")


def check_sigmas(values, noise: "NoiseConfig | None" = None, *, what: str = "sigmas") -> list[float]:
    """User-given noise levels as a list of floats, refused unless non-empty, finite, positive,
    strictly decreasing and (given ``noise``) within [sigma_min, sigma_max]. The one check of
    explicit levels: the command line, the Python API, the server and the editing tasks use it."""
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be numbers, got {values!r}") from None
    if not values:
        raise ValueError(f"{what} is empty")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"{what} must be positive and finite, got {values}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what} must be strictly decreasing, got {values}")
    if noise is not None and (values[0] > noise.sigma_max or values[-1] < noise.sigma_min):
        raise ValueError(f"{what} must lie in [{noise.sigma_min}, {noise.sigma_max}]")
    return values


# ---------------------------------------------------------------------------------------------
# Preconditioning coefficients. Each returns (c_skip, c_out, c_in) with sigma's shape.


def edm_scalings(sigma: torch.Tensor, sigma_data: float):
    """EDM: D = c_skip x + c_out F(c_in x). Unit-variance network input and training target."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    return c_skip, c_out, c_in


def consistency_scalings(sigma: torch.Tensor, sigma_data: float, sigma_min: float):
    """Song et al. (2023): EDM's coefficients shifted so that c_skip(sigma_min) = 1 and
    c_out(sigma_min) = 0, which makes f(x, sigma_min) = x hold exactly for any weights."""
    shifted = sigma - sigma_min
    c_skip = sigma_data**2 / (shifted**2 + sigma_data**2)
    c_out = shifted * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in


# c_noise conventions: what the backbone receives as its time input.


def c_noise_edm(sigma: torch.Tensor) -> torch.Tensor:
    """EDM's ln(sigma)/4: a small range, right for Fourier embeddings."""
    return sigma.log() / 4


def c_noise_openai(sigma: torch.Tensor) -> torch.Tensor:
    """OpenAI's released consistency checkpoints and diffusers' CMStochasticIterativeScheduler:
    1000 * 0.25 * ln(sigma + 1e-44), for positional embeddings built for a 0..1000 range."""
    return 1000 * 0.25 * (sigma + 1e-44).log()


C_NOISE = {"edm": c_noise_edm, "openai": c_noise_openai}

# A flow-matching time input t in [0, 1] (MeanFlow) is scaled by these: "flow1000" for positional
# embeddings built for 0..1000, like OpenAI's c_noise.
FLOW_TIME_SCALES = {"flow": 1.0, "flow1000": 1000.0}


# ---------------------------------------------------------------------------------------------
# Conversions between time conventions. Each family maps to sigma; states rescale accordingly.


def sigma_from_trigflow(t: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """TrigFlow x_t = cos t x0 + sin t z', z' ~ N(0, sigma_data^2): sigma = sigma_data tan t."""
    return sigma_data * torch.tan(t)


def trigflow_from_sigma(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    return torch.atan(sigma / sigma_data)


def trigflow_state(x_sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos t * x_sigma (t broadcast over the batch dimension)."""
    return broadcast_to_batch(torch.cos(t), x_sigma) * x_sigma


def sigma_state_from_trigflow(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x_t / broadcast_to_batch(torch.cos(t), x_t)


def sigma_from_flow(t: torch.Tensor) -> torch.Tensor:
    """Flow matching z_t = (1 - t) x0 + t eps (t = 1 is noise): sigma = t / (1 - t)."""
    return t / (1 - t)


def flow_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    return sigma / (1 + sigma)


def flow_state(x_sigma: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) * x_sigma."""
    return broadcast_to_batch(1 - t, x_sigma) * x_sigma


def sigma_state_from_flow(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return z_t / broadcast_to_batch(1 - t, z_t)


def broadcast_to_batch(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) or scalar tensor to broadcast against ``like`` (B, ...)."""
    v = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


