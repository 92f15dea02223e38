"""Discrete-time VP diffusion (DDPM/DDIM and every diffusers scheduler that shares their betas) in
EDM's sigma.

A diffusers scheduler defines T noise levels by their cumulative alpha, abar_t = prod_{s<=t}(1 - beta_s),
and the state z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Dividing by sqrt(abar_t) gives EDM's
x_sigma = x0 + sigma eps with

    sigma_t = sqrt((1 - abar_t) / abar_t),     z = x_sigma / sqrt(1 + sigma^2).

So a VP model is an EDM denoiser with c_in = 1 / sqrt(1 + sigma^2), a time input t(sigma) read off
the table, and c_skip / c_out set by what the network predicts (`vp_scalings`). Everything here is
a function of sigma: the table converts at this edge and nowhere else.
"""

from __future__ import annotations

import numpy as np
import torch

# diffusers' discrete-time schedulers that share DDPMScheduler's betas and prediction types: a
# UNet trained with one samples with any other, so any of them describes the same denoiser.
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                 "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DEISMultistepScheduler",
                 "UniPCMultistepScheduler", "KDPM2DiscreteScheduler", "LCMScheduler")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")  # DDPMScheduler's
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIME_INPUTS = ("nearest", "interpolated")
# The highest level a student of a VP teacher trains and samples at. Its output is the teacher's
# parametrization, where x0 = x - sigma eps: an error in eps comes out sigma times larger, so the
# top of a linear-beta table (sigma 157) is ill-conditioned for one-step generation. 20 is about
# where Stable Diffusion (and LCM) start from pure noise (14.6); measured on digits, one-step FD
# 210 with the whole table, 134 with EDM's clamp at 80, 43 at 20 (docs/benchmarks.md).
STUDENT_SIGMA_MAX = 20.0
# The keys of a scheduler config that fix its table; a run's config keeps only these.
TABLE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def table_config(scheduler: dict) -> dict:
    """The part of a diffusers scheduler config that fixes the noise table, checked (ValueError
    with one line otherwise)."""
    name = scheduler.get("_class_name", "DDPMScheduler")
    if name not in VP_SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: cmkit imports discrete-time VP schedulers "
                         f"({', '.join(VP_SCHEDULERS[:4])}, ...)")
    out = {"num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
           "beta_start": float(scheduler.get("beta_start", 0.0001)),
           "beta_end": float(scheduler.get("beta_end", 0.02)),
           "beta_schedule": scheduler.get("beta_schedule", "linear"),
           "trained_betas": scheduler.get("trained_betas")}
    if out["trained_betas"] is None and out["beta_schedule"] not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {out['beta_schedule']!r}; cmkit knows {', '.join(BETA_SCHEDULES)} "
                         "and trained_betas")
    if scheduler.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr makes the last level pure noise (sigma = inf), which has no "
                         "EDM sigma; cmkit cannot import it")
    if out["num_train_timesteps"] < 2:
        raise ValueError(f"num_train_timesteps must be at least 2, got {out['num_train_timesteps']}")
    if out["trained_betas"] is not None:
        out["trained_betas"] = [float(b) for b in out["trained_betas"]]
        if len(out["trained_betas"]) != out["num_train_timesteps"]:
            raise ValueError("trained_betas must have num_train_timesteps entries")
    return out


def prediction_type(scheduler: dict) -> str:
    kind = scheduler.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {kind!r}; cmkit knows {', '.join(PREDICTION_TYPES)}")
    return kind


def sigma_table(table: dict) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1 (float64, increasing), from the
    alphas_cumprod of diffusers' own DDPMScheduler, so the betas are exactly diffusers' (in its
    float32 arithmetic) for every schedule it knows."""
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(**table).alphas_cumprod
    sigmas = ((1 - abar) / abar) ** 0.5  # float32, as diffusers' Euler/DDIM schedulers compute it
    if not bool(torch.isfinite(sigmas).all()) or not bool((sigmas[1:] > sigmas[:-1]).all()) or sigmas[0] <= 0:
        raise ValueError("the scheduler's betas do not give finite, increasing noise levels")
    return sigmas.double()


def vp_scalings(sigma: torch.Tensor, kind: str):
    """(c_skip, c_out, c_in) of a VP network F in EDM form, D = c_skip x + c_out F(c_in x, t):
    epsilon: D = x - sigma F; v_prediction: D = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) F;
    sample: D = F. The input is the VP state, c_in = 1 / sqrt(1 + sigma^2)."""
    c_in = 1 / (1 + sigma**2).sqrt()
    if kind == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    if kind == "v_prediction":
        return c_in**2, -sigma * c_in, c_in
    if kind == "sample":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
    raise ValueError(f"unknown prediction_type {kind!r}")


def lcm_boundary(t: torch.Tensor, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
    """LCM's boundary scalings at timestep t (diffusers' LCMScheduler
    ``get_scalings_for_boundary_condition_discrete``): c_skip = sd^2 / ((s t)^2 + sd^2),
    c_out = s t / sqrt((s t)^2 + sd^2), so c_skip(0) = 1 and c_out(0) = 0."""
    scaled = t * timestep_scaling
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2).sqrt()


def skipping_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> tuple[torch.Tensor, int]:
    """(LCM's timesteps, the skip k): ``arange(1, N + 1) * k - 1`` with k = T // N ([19, 39, ...,
    999] for 1000, 50), the grid its distillation starts from (the reference's ``DDIMSolver``) and
    ``LCMScheduler``'s ``lcm_origin_timesteps``."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps:
        raise ValueError(f"the number of DDIM timesteps must be in [1, {num_train_timesteps}], got {num_ddim_timesteps}")
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.int64) * k - 1, k


def lcm_timesteps(num_train_timesteps: int, steps: int, original_steps: int = 50,
                  strength: float = 1.0) -> torch.Tensor:
    """The timesteps ``LCMScheduler.set_timesteps(steps, strength=strength)`` samples at: ``steps``
    evenly spaced indices into the reversed skipping grid (4 steps of 1000, 50: [999, 759, 499,
    259]), cut to its first ``int(original_steps * strength)`` entries for image-to-image."""
    if not 1 <= steps <= original_steps:
        raise ValueError(f"an LCM samples in 1 to {original_steps} steps, got {steps}")
    kept = int(original_steps * strength)
    if kept < steps:
        raise ValueError(f"an LCM at strength {strength:g} has {kept} of its {original_steps} timesteps left, "
                         f"fewer than {steps} steps: raise the strength or lower the steps")
    grid = skipping_grid(num_train_timesteps, original_steps)[0][:kept].flip(0)
    return grid[np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)]


class SigmaTable:
    """A scheduler's T noise levels and the time input t(sigma) its UNet was trained on.

    ``nearest``: the index of the nearest level in log sigma (NVlabs/edm's ``iDDPMPrecond.round_sigma``),
    for learned time embeddings that only know integers; samplers then run on the table itself.
    ``interpolated``: a fractional t, linear in log sigma between neighbouring levels (diffusers'
    ``EulerDiscreteScheduler._sigma_to_t``), for sinusoidal or Fourier embeddings; it is the index
    exactly on the table and continuous (and differentiable) in between."""

    def __init__(self, sigmas: torch.Tensor, time_input: str = "interpolated"):
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r}; known: {', '.join(TIME_INPUTS)}")
        self.sigmas, self.time_input = sigmas.double(), time_input
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0].float())

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1].float())

    def nearest_index(self, sigma: torch.Tensor) -> torch.Tensor:
        log = sigma.detach().double().clamp(min=1e-30).log().to(self.log_sigmas.device)
        return (log[..., None] - self.log_sigmas).abs().argmin(-1).to(sigma.device)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """t(sigma) as a float tensor of sigma's shape (an integer value for ``nearest``)."""
        if self.time_input == "nearest":
            return self.nearest_index(sigma).to(sigma.dtype)
        # In float64: a level of the table (float32) lands on its integer index exactly.
        log_table = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.double().clamp(min=1e-30).log()
        # The level at or below sigma, by counting (searchsorted has no ONNX export).
        low = (log_sigma.detach()[..., None] >= log_table).sum(-1) - 1
        low = low.clamp(0, len(log_table) - 2)
        lo, hi = log_table[low], log_table[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (low.double() + w).to(sigma.dtype)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma moved onto the table where the model only knows its levels (``nearest``)."""
        if self.time_input != "nearest":
            return sigma
        return self.sigmas.to(sigma.device)[self.nearest_index(sigma)].to(sigma.dtype)


def time_input_for(unet_config: dict) -> str:
    """How a diffusers UNet takes its time: integers for a learned embedding table, fractional t
    for sinusoidal ("positional") and Fourier embeddings."""
    return "nearest" if unet_config.get("time_embedding_type", "positional") == "learned" else "interpolated"
