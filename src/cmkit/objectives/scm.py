"""Continuous-time consistency models, sCT and sCD (Lu & Song 2024), in cmkit's sigma.

TrigFlow writes x_t = cos t x0 + sin t z' (z' ~ N(0, sd^2)) and f(x_t, t) = cos t x_t - sin t sd F(x_t/sd, t).
With sigma = sd tan t and x_t = cos t x_sigma this is exactly EDM's preconditioning with the sign of F
flipped: f = c_skip x_sigma + c_out F_edm(c_in x_sigma, c_noise(sigma)), F_trig = -F_edm. So an sCM run's
network *is* an `EDMDenoiser`-shaped module (the teacher's weights are the natural start), and the
objective below works in TrigFlow's variables on top of it:

    g = -cos^2 t (sd F- - dx_t/dt) - r cos t sin t (x_t + sd dF-/dt)      (= cos t df-/dt when r = 1)
    g <- g / (||g|| + 0.1)
    loss = exp(w(t)) / dim * ||F_theta - F- - g||^2 - w(t)

dF-/dt is the total derivative along the PF-ODE: a forward-mode JVP (``torch.func.jvp``) of
(u, t) -> F(u, t) with tangent (dx_t/dt / sd, 1), or a central finite difference as fallback.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..batch_rng import batch_rng
from ..condition import as_condition
from ..guidance import bind_condition, draw_scales
from ..noise import NoiseConfig, broadcast_to_batch, sigma_from_trigflow, trigflow_from_sigma
from ..precond import EDMDenoiser
from .base import Objective
from .consistency import check_guidance_range
from .jvp import JVP_MODES, jvp
from .registry import MethodSpec, noise_config, objective_options, register, with_objective
from .rng import SharedRNG



class AdaptiveWeight(nn.Module):
    """w(t): a learned log-weight per noise level (sCM's adaptive loss weighting)."""

    def __init__(self, features: int = 16, width: int = 64):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64), features)))
        self.net = nn.Sequential(nn.Linear(2 * features, width), nn.SiLU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.float()[:, None] * self.freqs[None]
        return self.net(torch.cat([angles.cos(), angles.sin()], 1))[:, 0]


def trigflow_F(model, condition=None) -> callable:
    """(u, t) -> F_trig(u, t) of an `EDMDenoiser` (`EDMDenoiser.trigflow`), u = x_t / sd."""
    def F(u, t):
        return model.trigflow(u, t, condition)
    return F


def jvp_F(F, u, t, du, mode: str = "autograd", eps: float = 1e-3, module=None):
    """(F(u, t), d/ds F(u + s du, t + s) at s = 0); ``module`` is the network F runs."""
    return jvp(F, (u, t), (du, torch.ones_like(t)), mode, eps, module)


def teacher_velocity(teacher, x_t: torch.Tensor, t: torch.Tensor, sd: float) -> torch.Tensor:
    """dx_t/dt of the PF-ODE in TrigFlow, from an EDM denoiser D(x_sigma, sigma) (labels bound)."""
    cos, sin = broadcast_to_batch(t.cos(), x_t), broadcast_to_batch(t.sin(), x_t)
    x0_hat = teacher(x_t / cos, sigma_from_trigflow(t, sd))
    z_hat = (x_t - cos * x0_hat) / sin
    return cos * z_hat - sin * x0_hat


class ContinuousConsistencyLoss(Objective):
    """sCT (``teacher=None``: dx_t/dt = cos t z' - sin t x0) or sCD (the teacher's velocity; with
    ``guidance = (lo, hi)``, that of its classifier-free-guided denoiser at w ~ U[lo, hi] per
    sample, w given to the student as an input)."""

    def __init__(self, noise: NoiseConfig = NoiseConfig(), teacher=None, p_mean: float = -1.0,
                 p_std: float = 1.4, tangent_warmup: int = 10000, tangent_norm_c: float | None = 0.1,
                 jvp: str = "autograd", adaptive_weighting: bool = True, guidance: list[float] | None = None):
        if jvp not in JVP_MODES:
            raise ValueError(f"unknown jvp {jvp!r}; known: {', '.join(JVP_MODES)}")
        if p_std <= 0 or tangent_warmup < 0 or (tangent_norm_c is not None and tangent_norm_c < 0):
            raise ValueError("need p_std > 0, tangent_warmup >= 0 and tangent_norm_c >= 0 (null: no normalisation)")
        self.noise, self.teacher, self.p_mean, self.p_std = noise, teacher, p_mean, p_std
        self.tangent_warmup, self.c, self.jvp = tangent_warmup, tangent_norm_c, jvp
        self.weight = AdaptiveWeight() if adaptive_weighting else None
        self.guidance = check_guidance_range(guidance)
        if self.guidance is not None and teacher is None:
            raise ValueError("guided distillation (objective.guidance) needs a teacher: use sCD")

    @property
    def modules(self) -> dict:
        """Trained alongside the network and saved in checkpoints."""
        return {"weighting": self.weight} if self.weight is not None else {}

    def warmup(self, step: int) -> float:
        return 1.0 if self.tangent_warmup == 0 else min(1.0, step / self.tangent_warmup)

    def tangent(self, F_minus, dF_dt, x_t, v, t, warmup):
        """g before normalisation (``warmup``: the tangent warm-up factor r of the paper, 0 -> 1)."""
        sd = self.noise.sigma_data
        cos, sin = broadcast_to_batch(t.cos(), x_t), broadcast_to_batch(t.sin(), x_t)
        return -cos**2 * (sd * F_minus - v) - warmup * cos * sin * (x_t + sd * dF_dt)

    def step_logs(self, step):
        return {"tangent_warmup": self.warmup(step)}

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        sd, B = self.noise.sigma_data, x0.shape[0]
        rng = batch_rng(generator)
        sigma = (self.p_mean + self.p_std * rng.randn((B,))).exp()
        draws = {"t": trigflow_from_sigma(sigma.clamp(self.noise.sigma_min, self.noise.sigma_max), sd).to(x0),
                 "z": sd * rng.randn(x0.shape).to(x0),
                 "warmup": torch.tensor(self.warmup(step), dtype=x0.dtype, device=x0.device)}
        if self.guidance is not None:
            if as_condition(condition).labels is None:
                raise ValueError("guided distillation needs class labels")
            draws["guidance"] = draw_scales(self.guidance, B, rng).to(x0.device)
        return draws

    def loss(self, net, x0: torch.Tensor, draws, *, target=None, condition=None):
        sd = self.noise.sigma_data
        t, z, scales = draws["t"], draws["z"], draws.get("guidance")
        cos, sin = broadcast_to_batch(t.cos(), x0), broadcast_to_batch(t.sin(), x0)
        x_t = cos * x0 + sin * z
        condition = as_condition(condition)
        F = trigflow_F(net, condition.replace(guidance=scales))  # a guided student also sees the scale
        with torch.no_grad():
            v = (cos * z - sin * x0 if self.teacher is None
                 else teacher_velocity(bind_condition(self.teacher, condition, scales), x_t, t, sd))
            rng = SharedRNG(x0.device)
            F_minus, dF_dt = jvp_F(F, x_t / sd, t, v / sd, self.jvp, module=net)
            g = self.tangent(F_minus, dF_dt, x_t, v, t, draws["warmup"])
            norm = g.flatten(1).norm(dim=1)
            if self.c is not None:  # null: the raw tangent (the normalisation's ablation)
                g = g / broadcast_to_batch(norm + self.c, g)
        rng.replay()
        F_theta = F(x_t / sd, t)
        dim = x0[0].numel()
        # sg(F_theta) rather than F_minus: the same pass, so the difference is exactly zero in any
        # precision (the finite-difference JVP runs in float32, the gradient pass may be bf16).
        sq = (F_theta - F_theta.detach() - g).float().pow(2).flatten(1).sum(1)
        if self.weight is None:
            loss = sq / dim
        else:
            log_weight = self.weight(t)
            loss = log_weight.exp() / dim * sq - log_weight
        return loss, {"g_norm": norm.mean()}


def resolve_tangent_warmup(config: dict) -> dict:
    """The tangent warm-up (null: the paper's 10k steps, at most a quarter of the run), fixed in
    the saved config."""
    warmup = config["objective"]["tangent_warmup"]
    return with_objective(config, tangent_warmup=min(10000, config["train"]["steps"] // 4) if warmup is None
                          else warmup)


SCM_SOURCE = "Lu & Song 2024, 'Simplifying, stabilizing and scaling continuous-time consistency models'"

register(MethodSpec(
    name="sct", summary="continuous-time consistency training (sCT; TrigFlow, a JVP along the ODE; --init from EDM)",
    source=SCM_SOURCE, objective=ContinuousConsistencyLoss, wrapper=EDMDenoiser, init=True, time_derivative=True,
    resolve=resolve_tangent_warmup,
    nullable={"objective.tangent_warmup": int, "objective.tangent_norm_c": float},
    build=lambda config, teacher: ContinuousConsistencyLoss(noise_config(config), **objective_options(config))))

register(MethodSpec(
    name="scd", summary="continuous-time consistency distillation (sCD) from an EDM --teacher",
    source=SCM_SOURCE, objective=ContinuousConsistencyLoss, wrapper=EDMDenoiser, teacher=True, init=True,
    starts_from_teacher=True, guided=True, time_derivative=True, resolve=resolve_tangent_warmup,
    nullable={"objective.tangent_warmup": int, "objective.tangent_norm_c": float, "objective.guidance": list},
    build=lambda config, teacher: ContinuousConsistencyLoss(noise_config(config), teacher=teacher,
                                                            **objective_options(config))))
