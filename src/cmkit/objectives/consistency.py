"""Consistency distillation (CD) and consistency training (CT), Song et al. (2023).

Both draw adjacent levels sigma_hi > sigma_lo of a Karras grid, noise x_hi = x0 + sigma_hi z, and
pull the online f(x_hi, sigma_hi) toward the target network's f-(x_lo, sigma_lo). They differ
only in how x_lo is found: CD takes one ODE step of a teacher denoiser; CT reuses the same z
(x_lo = x0 + sigma_lo z), a one-sample estimate of that step.
"""

from __future__ import annotations

import abc
import math

import torch

from ..batch_rng import batch_rng
from ..condition import as_condition
from ..guidance import bind_condition, draw_scales
from ..noise import NoiseConfig, broadcast_to_batch
from ..precond import ConsistencyFunction
from .base import Objective
from .distances import make_distance
from .registry import MethodSpec, fix_horizon, noise_config, objective_options, register
from .rng import SharedRNG

WEIGHTINGS = {
    "uniform": lambda hi, lo: torch.ones_like(hi),
    "inverse_gap": lambda hi, lo: 1 / (hi - lo),  # iCT's 1/(sigma_{i+1} - sigma_i)
}


class ConsistencyLoss(Objective):
    """lambda(sigma_hi) d(f(x_hi, sigma_hi), stopgrad f-(x_lo, sigma_lo)), per sample."""

    needs_target = True
    student_sees_guidance = True

    def __init__(self, noise: NoiseConfig = NoiseConfig(), distance: str = "l2",
                 huber_c: float | None = None, weighting: str = "uniform"):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
        self.noise = noise
        self.distance = make_distance(distance, huber_c)
        self.weighting = WEIGHTINGS[weighting]

    @abc.abstractmethod
    def num_levels(self, step: int) -> int:
        """Size N of the grid at training step ``step``."""

    @abc.abstractmethod
    def target_rate(self, step: int) -> float:
        """EMA rate mu of the target network after training step ``step``."""

    @abc.abstractmethod
    def lower(self, x_hi, x0, z, sigma_hi, sigma_lo, condition=None, guidance=None):
        """The point at sigma_lo on (an estimate of) x_hi's ODE trajectory (``guidance``: the
        per-sample scales of guided distillation)."""

    def sample_pairs(self, sigmas: torch.Tensor, batch: int, generator) -> torch.Tensor:
        """Index n of each sample's pair (sigmas[n], sigmas[n + 1]): uniform here."""
        return batch_rng(generator).randint(len(sigmas) - 1, batch)

    def guidance_scales(self, condition, batch: int, generator) -> torch.Tensor | None:
        """Per-sample guidance scales of guided distillation (None: not guided)."""
        return None

    def step_logs(self, step):
        return {"num_levels": self.num_levels(step)}

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        B = x0.shape[0]
        sigmas = self.noise.karras(self.num_levels(step)).to(x0)
        n = self.sample_pairs(sigmas, B, generator).to(x0.device)
        draws = {"sigma_hi": sigmas[n], "sigma_lo": sigmas[n + 1], "z": batch_rng(generator).randn(x0.shape).to(x0)}
        scales = self.guidance_scales(as_condition(condition), B, generator)
        if scales is not None:
            draws["guidance"] = scales
        return draws

    def loss(self, net, x0: torch.Tensor, draws, *, target=None, condition=None):
        if target is None:
            if self.needs_target:
                raise ValueError("this consistency loss needs a target network")
            target = net  # iCT: stopgrad of the online network
        sigma_hi, sigma_lo, z, scales = draws["sigma_hi"], draws["sigma_lo"], draws["z"], draws.get("guidance")
        condition = as_condition(condition)
        # A guided student also sees the scale (LCM-LoRA's does not: its UNet has no input for it).
        student = condition.replace(guidance=scales if self.student_sees_guidance else None)
        x_hi = x0 + broadcast_to_batch(sigma_hi, x0) * z
        with torch.no_grad():
            x_lo = self.lower(x_hi, x0, z, sigma_hi, sigma_lo, condition, scales)
            rng = SharedRNG(x0.device)  # the target and online passes share dropout masks
            target_out = target(x_lo, sigma_lo, student)
        rng.replay()
        online = net(x_hi, sigma_hi, student)
        loss = self.weighting(sigma_hi, sigma_lo) * self.distance(online, target_out)
        return loss, {}


class ConsistencyDistillationLoss(ConsistencyLoss):
    """CD: x_lo is one Heun (or Euler) step of the teacher's PF-ODE from sigma_hi to sigma_lo.

    With ``guidance = (lo, hi)`` the teacher's ODE is that of its classifier-free-guided denoiser at
    a scale w ~ U[lo, hi] drawn per sample, and the student and target take w as an input."""

    def __init__(self, teacher, noise: NoiseConfig = NoiseConfig(), num_levels: int = 18,
                 target_ema: float = 0.0, solver: str = "heun", guidance: list[float] | None = None, **kwargs):
        super().__init__(noise, **kwargs)
        self.guidance = check_guidance_range(guidance)
        if solver not in ("heun", "euler"):
            raise ValueError(f"unknown solver {solver!r}; use 'heun' or 'euler'")
        if num_levels < 2:
            raise ValueError("num_levels must be at least 2")
        if not 0 <= target_ema < 1:
            raise ValueError("target_ema must be in [0, 1)")
        self.teacher, self.levels, self.mu, self.solver = teacher, num_levels, target_ema, solver

    def num_levels(self, step):
        return self.levels

    def target_rate(self, step):
        return self.mu

    def guidance_scales(self, condition, batch, generator):
        if self.guidance is None:
            return None
        if condition.labels is None and condition.text is None:
            raise ValueError("guided distillation needs class labels or prompts")
        device = (condition.labels if condition.labels is not None else condition.text).device
        return draw_scales(self.guidance, batch, generator).to(device)

    def lower(self, x_hi, x0, z, sigma_hi, sigma_lo, condition=None, guidance=None):
        teacher = bind_condition(self.teacher, condition, guidance)
        return teacher_step(teacher, x_hi, sigma_hi, sigma_lo, self.solver)


def check_guidance_range(guidance) -> tuple[float, float] | None:
    """A guided-distillation range [lo, hi] with 0 <= lo <= hi, or None."""
    if guidance is None:
        return None
    if len(guidance) != 2 or not 0 <= guidance[0] <= guidance[1]:
        raise ValueError(f"objective.guidance must be [lo, hi] with 0 <= lo <= hi, got {guidance}")
    return float(guidance[0]), float(guidance[1])


def teacher_step(teacher, x_hi, sigma_hi, sigma_lo, solver: str = "heun"):
    """One PF-ODE step of a denoiser from sigma_hi to sigma_lo > 0 (per-sample levels)."""
    s_hi, s_lo = broadcast_to_batch(sigma_hi, x_hi), broadcast_to_batch(sigma_lo, x_hi)
    d = (x_hi - teacher(x_hi, sigma_hi)) / s_hi
    x_euler = x_hi + (s_lo - s_hi) * d
    if solver == "euler":
        return x_euler
    d_next = (x_euler - teacher(x_euler, sigma_lo)) / s_lo
    return x_hi + (s_lo - s_hi) * (d + d_next) / 2


class ConsistencyTrainingLoss(ConsistencyLoss):
    """CT: x_lo = x0 + sigma_lo z with the same z, and the N(k), mu(k) curricula over K steps."""

    def __init__(self, noise: NoiseConfig = NoiseConfig(), total_steps: int = 1, s0: int = 2,
                 s1: int = 150, mu0: float = 0.9, **kwargs):
        super().__init__(noise, **kwargs)
        if total_steps < 1 or s0 < 2 or s1 < s0 or not 0 <= mu0 < 1:
            raise ValueError("need total_steps >= 1, 2 <= s0 <= s1 and 0 <= mu0 < 1")
        self.total_steps, self.s0, self.s1, self.mu0 = total_steps, s0, s1, mu0

    def num_levels(self, step):
        return ct_num_levels(step, self.total_steps, self.s0, self.s1)

    def target_rate(self, step):
        return ct_target_rate(self.num_levels(step), self.s0, self.mu0)

    def lower(self, x_hi, x0, z, sigma_hi, sigma_lo, condition=None, guidance=None):
        return x0 + broadcast_to_batch(sigma_lo, x0) * z


def ct_num_levels(k: int, K: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1, from s0 at k=0 to s1+1 at k=K."""
    k = min(max(k, 0), K)
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_rate(num_levels: int, s0: int, mu0: float) -> float:
    """mu(k) = exp(s0 ln(mu0) / N(k)) (the paper's form; OpenAI's code divides by N(k) - 1)."""
    return math.exp(s0 * math.log(mu0) / num_levels) if mu0 > 0 else 0.0


register(MethodSpec(
    name="cd", summary="consistency distillation from an EDM --teacher (one ODE step per pair of levels)",
    source="Song et al. 2023, 'Consistency models'",
    objective=ConsistencyDistillationLoss, wrapper=ConsistencyFunction, teacher=True, starts_from_teacher=True,
    guided=True,
    nullable={"objective.huber_c": float, "objective.guidance": list},
    build=lambda config, teacher: ConsistencyDistillationLoss(
        teacher, noise_config(config), **objective_options(config, "init_from_teacher"))))

register(MethodSpec(
    name="ct", summary="consistency training from scratch (no teacher; the N(k), mu(k) curricula)",
    source="Song et al. 2023, 'Consistency models'",
    objective=ConsistencyTrainingLoss, wrapper=ConsistencyFunction, resolve=fix_horizon,
    nullable={"objective.huber_c": float, "objective.total_steps": int},
    build=lambda config, teacher: ConsistencyTrainingLoss(noise_config(config), **objective_options(config))))
