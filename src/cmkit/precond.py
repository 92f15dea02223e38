"""Preconditioning: thin wrappers that turn any backbone into a denoiser or a consistency function.

Both wrappers compute  out = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))
and differ only in their coefficients (see `cmkit.noise`). Both take the canonical EDM sigma,
as a scalar or one value per sample, and accept inputs of any shape (B, ...).
"""

from __future__ import annotations

import abc

import torch
from torch import nn

from .condition import Condition
from .discrete_vp import SigmaTable, lcm_boundary, lcm_timesteps, sigma_table, vp_scalings
from .noise import (C_NOISE, FLOW_TIME_SCALES, NoiseConfig, broadcast_to_batch, consistency_scalings, edm_scalings,
                    flow_from_sigma, flow_state, sigma_from_trigflow)


class Preconditioned(nn.Module, abc.ABC):
    def __init__(self, backbone: nn.Module, noise: NoiseConfig = NoiseConfig(), c_noise: str = "edm"):
        super().__init__()
        if c_noise not in C_NOISE:
            raise ValueError(f"unknown c_noise {c_noise!r}; known: {', '.join(C_NOISE)}")
        self.backbone = backbone
        self.noise = noise
        self.c_noise_name = c_noise
        self.c_noise = C_NOISE[c_noise]

    @abc.abstractmethod
    def scalings(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in) at noise level sigma (shape (B,))."""

    @property
    def num_classes(self) -> int:
        """K for a class-conditional backbone (labels 0..K-1, K the null label), else 0."""
        return getattr(self.backbone, "num_classes", 0)

    def forward(self, x: torch.Tensor, sigma, condition: Condition | None = None) -> torch.Tensor:
        """``condition``: a `cmkit.condition.Condition` (or class labels alone), passed to the
        backbone unchanged."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (broadcast_to_batch(c, x) for c in self.scalings(sigma))
        F = self.backbone(c_in * x, self.c_noise(sigma), condition)
        return c_skip * x + c_out * F.to(x.dtype)


class EDMDenoiser(Preconditioned):
    """D(x, sigma): the EDM denoiser, an estimate of E[x0 | x_sigma].

    The same module is sCM's consistency function in TrigFlow time (`trigflow`): with
    sigma = sd tan t and x_t = cos t x_sigma, f = cos t x_t - sin t sd F_trig(x_t / sd, t) is EDM's
    preconditioning with F_trig = -F_edm."""

    def scalings(self, sigma):
        return edm_scalings(sigma, self.noise.sigma_data)

    def trigflow(self, u: torch.Tensor, t: torch.Tensor, condition: Condition | None = None) -> torch.Tensor:
        """sCM's network output F_trig(u, t) = -backbone(u, c_noise(sd tan t)) at u = x_t / sd: the
        entry point sCT/sCD differentiate along t."""
        c_noise = self.c_noise(sigma_from_trigflow(t, self.noise.sigma_data))
        return -self.backbone(u, c_noise, condition)


class ConsistencyFunction(Preconditioned):
    """f(x, sigma): maps a point at noise level sigma to the ODE trajectory's clean end.

    Its coefficients satisfy the boundary condition f(x, sigma_min) = x exactly."""

    def scalings(self, sigma):
        return consistency_scalings(sigma, self.noise.sigma_data, self.noise.sigma_min)


class VPDenoiser(EDMDenoiser):
    """D(x, sigma) of a discrete-time VP network (a diffusers DDPM/DDIM UNet) in EDM's sigma:
    c_in = 1 / sqrt(1 + sigma^2) turns x_sigma into the VP state, the time input is the diffusers
    timestep t(sigma) of the scheduler's table (`cmkit.discrete_vp.SigmaTable`), and c_skip, c_out
    follow the prediction type (`cmkit.discrete_vp.vp_scalings`).

    ``vp``: {"prediction_type", "time_input" ("nearest" or "interpolated"), "table" (the
    scheduler's betas, `cmkit.discrete_vp.table_config`), "timestep_scaling" (students only)}."""

    def __init__(self, backbone: nn.Module, noise: NoiseConfig = NoiseConfig(), c_noise: str = "timestep", *,
                 vp: dict):
        nn.Module.__init__(self)
        if c_noise != "timestep":
            raise ValueError(f"a VP network's time input is its diffusers timestep, not c_noise={c_noise!r}")
        self.backbone, self.noise, self.c_noise_name = backbone, noise, c_noise
        self.prediction_type = vp["prediction_type"]
        self.table = SigmaTable(sigma_table(vp["table"]), vp["time_input"])
        self.c_noise = self.table.timestep
        self.timestep_scaling = float(vp.get("timestep_scaling", 10.0))

    def scalings(self, sigma):
        return vp_scalings(sigma, self.prediction_type)

    def round_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Noise levels moved onto the table where the network only knows its levels."""
        return self.table.round_sigma(sigma)

    def trigflow(self, u: torch.Tensor, t: torch.Tensor, condition: Condition | None = None) -> torch.Tensor:
        """sCM's F_trig(u, t) = (cos t x_t - D(x_t / cos t, sd tan t)) / (sd sin t), x_t = sd u, so
        that f = cos t x_t - sd sin t F_trig is this denoiser (for EDM's own network the same
        identity reduces to -backbone)."""
        if self.table.time_input == "nearest":
            raise ValueError("a network with integer (learned) time embeddings has no derivative along t")
        sd = self.noise.sigma_data
        cos, sin = broadcast_to_batch(t.cos(), u), broadcast_to_batch(t.sin(), u)
        denoised = self(u * sd / cos, sigma_from_trigflow(t, sd), condition)
        return (cos * u * sd - denoised) / (sin * sd)


class VPConsistencyFunction(VPDenoiser):
    """f(x, sigma) of a student of a VP teacher: LCM's boundary scalings (Luo et al. 2023; diffusers'
    ``LCMScheduler``) over the teacher's parametrization,

        f = c_skip(t) x + c_out(t) D_vp(x, sigma),   c_skip = sd^2 / ((s t)^2 + sd^2),
        c_out = s t / sqrt((s t)^2 + sd^2),          t = t(sigma), s = timestep_scaling (10),

    so f(x, sigma_0) = x exactly at the table's first level (t = 0), and a student initialised from
    its teacher starts as the teacher's denoiser wherever t >= 1. (LCMScheduler applies c_skip to
    the VP state x / sqrt(1 + sigma^2); the two differ by under 3e-7 x at t >= 1.)"""

    skip_on_vp_state = False  # LCMFunction: True

    def scalings(self, sigma):
        c_skip, c_out, c_in = vp_scalings(sigma, self.prediction_type)
        b_skip, b_out = lcm_boundary(self.table.timestep(sigma), self.timestep_scaling)
        skipped = c_in if self.skip_on_vp_state else 1  # what the boundary's c_skip multiplies: z or x
        return b_skip * skipped + b_out * c_skip, b_out * c_out, c_in


class LCMFunction(VPConsistencyFunction):
    """f(x, sigma) exactly as LCM (Luo et al. 2023) and diffusers' ``LCMScheduler`` compute it: the
    boundary's c_skip applies to the VP state x / sqrt(1 + sigma^2), not to x,

        f = c_skip(t) x / sqrt(1 + sigma^2) + c_out(t) D_vp(x, sigma),

    so f(x, sigma_0) = x sqrt(abar_0) (1 - 5e-5 for linear betas): `--method lcm` trains and
    exports this form, to agree with the reference algorithm and the pipeline to rounding."""

    skip_on_vp_state = True

    def default_levels(self, steps: int, strength: float = 1.0) -> torch.Tensor:
        """The noise levels of ``LCMScheduler``'s ``steps``-step schedule (`lcm_timesteps`; at
        ``strength`` < 1, its image-to-image schedule)."""
        timesteps = lcm_timesteps(len(self.table.sigmas), steps, strength=strength)
        return self.table.sigmas[timesteps].float()


# The wrapper a method names (for EDM-parametrized networks), and its counterpart for a VP network.
VP_WRAPPERS = {EDMDenoiser: VPDenoiser, ConsistencyFunction: VPConsistencyFunction, LCMFunction: LCMFunction}


def build_wrapper(wrapper: type[nn.Module], backbone: nn.Module, noise: NoiseConfig, model: dict) -> nn.Module:
    """``backbone`` in the method's ``wrapper``, or in its VP counterpart when the run's model
    section describes a VP network (``model["vp"]``, a diffusers teacher and its students)."""
    if "vp" not in model:
        return wrapper(backbone, noise, c_noise=model.get("c_noise", "edm"))
    if wrapper not in VP_WRAPPERS:
        raise ValueError(f"a {wrapper.__name__} cannot start from a discrete-time VP (DDPM) network")
    return VP_WRAPPERS[wrapper](backbone, noise, c_noise=model.get("c_noise", "timestep"), vp=model["vp"])


class MeanFlowModel(nn.Module):
    """MeanFlow's average velocity u(z, r, t) in flow-matching time (z_t = (1 - t) x0 + t eps, t = 1
    is noise), on a backbone with two time inputs (t, t - r).

    ``forward(x, sigma)`` is the model seen as a consistency function in cmkit's sigma: the state
    converts at the edge (t = sigma / (1 + sigma), z_t = (1 - t) x_sigma) and one jump to r = 0 gives
    x0 = z_t - t u(z_t, 0, t); at sigma = 0 this is x itself."""

    def __init__(self, backbone: nn.Module, noise: NoiseConfig = NoiseConfig(), c_noise: str = "flow"):
        super().__init__()
        if c_noise not in FLOW_TIME_SCALES:
            raise ValueError(f"unknown MeanFlow c_noise {c_noise!r}; known: {', '.join(FLOW_TIME_SCALES)}")
        self.backbone, self.noise, self.c_noise_name = backbone, noise, c_noise
        self.time_scale = FLOW_TIME_SCALES[c_noise]

    num_classes = Preconditioned.num_classes

    def velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                 condition: Condition | None = None) -> torch.Tensor:
        times = torch.stack([t, t - r], dim=1).to(z.dtype) * self.time_scale
        return self.backbone(z, times, condition)

    def forward(self, x: torch.Tensor, sigma, condition: Condition | None = None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        t = flow_from_sigma(sigma)
        z = flow_state(x, t)
        return z - broadcast_to_batch(t, x) * self.velocity(z, torch.zeros_like(t), t, condition).to(x.dtype)
