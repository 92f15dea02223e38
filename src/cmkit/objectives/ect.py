"""Easy consistency tuning, ECT (Geng et al. 2024).

Start from a trained diffusion model and shrink the gap between the two noise levels in stages:
t ~ lognormal, r = t (1 - n(t) / q^(stage + 1)) with n(t) = 1 + k sigmoid(-b t), clamped at 0. Early
stages have r = 0 for most t, which is diffusion training (the target is x0 itself); later stages
approach the consistency condition. Both levels share z and dropout masks; the target uses the
current weights under no_grad.
"""

from __future__ import annotations

import torch

from ..batch_rng import batch_rng
from ..noise import NoiseConfig, broadcast_to_batch
from ..precond import ConsistencyFunction
from .base import Objective
from .distances import make_distance
from .registry import MethodSpec, fix_horizon, noise_config, objective_options, register
from .rng import SharedRNG


def ect_r(t: torch.Tensor, stage: int, k: float = 8.0, b: float = 1.0, q: float = 2.0) -> torch.Tensor:
    """The lower level r(t) at ``stage`` (0-based), clamped at 0."""
    return gap_r(t, 1 / q ** (stage + 1), k, b)


def gap_r(t: torch.Tensor, shrink: float, k: float = 8.0, b: float = 1.0) -> torch.Tensor:
    """ECT's r(t) = t (1 - shrink n(t)), n(t) = 1 + k sigmoid(-b t), clamped at 0 (``shrink``:
    1/q^(stage+1) in ECT's stages, 1 - ratio in FastGen's terms)."""
    n = 1 + k * torch.sigmoid(-b * t)
    return (t * (1 - shrink * n)).clamp(min=0)


class EasyConsistencyTuningLoss(Objective):
    def __init__(self, noise: NoiseConfig = NoiseConfig(), total_steps: int = 1, stages: int = 8,
                 p_mean: float = -1.1, p_std: float = 2.0, k: float = 8.0, b: float = 1.0, q: float = 2.0,
                 distance: str = "pseudo_huber", huber_c: float | None = 0.0):
        if total_steps < 1 or stages < 1 or p_std <= 0 or q <= 1:
            raise ValueError("need total_steps >= 1, stages >= 1, p_std > 0 and q > 1")
        self.noise, self.total_steps, self.stages = noise, total_steps, stages
        self.p_mean, self.p_std, self.k, self.b, self.q = p_mean, p_std, k, b, q
        self.distance = make_distance(distance, huber_c)  # c = 0: the (unsquared) L2 norm

    def stage(self, step: int) -> int:
        """Stages of equal length over ``total_steps``; the last lasts to the end of the run."""
        return min(step * self.stages // self.total_steps, self.stages - 1)

    def step_logs(self, step):
        return {"stage": self.stage(step)}

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        rng = batch_rng(generator)
        ln_t = self.p_mean + self.p_std * rng.randn((x0.shape[0],))
        t = ln_t.exp().clamp(self.noise.sigma_min, self.noise.sigma_max).to(x0)
        r = ect_r(t, self.stage(step), self.k, self.b, self.q)
        r = torch.where(r < self.noise.sigma_min, torch.zeros_like(r), r)  # below sigma_min: the data
        return {"t": t, "r": r, "z": rng.randn(x0.shape).to(x0)}

    def loss(self, net, x0: torch.Tensor, draws, *, target=None, condition=None):
        t, r, z = draws["t"], draws["r"], draws["z"]
        x_t = x0 + broadcast_to_batch(t, x0) * z
        x_r = x0 + broadcast_to_batch(r, x0) * z
        rng = SharedRNG(x0.device)
        with torch.no_grad():
            target_out = net(x_r, r.clamp(min=self.noise.sigma_min), condition)
            target_out = torch.where(broadcast_to_batch(r, x0) > 0, target_out, x0)
        rng.replay()
        loss = self.distance(net(x_t, t, condition), target_out) / (t - r)
        return loss, {"r_zero": (r == 0).float().mean()}


register(MethodSpec(
    name="ect", summary="easy consistency tuning: an EDM run (--init) tuned into a consistency model in stages",
    source="Geng et al. 2024, 'Consistency models made easy'",
    objective=EasyConsistencyTuningLoss, wrapper=ConsistencyFunction, init=True, resolve=fix_horizon,
    nullable={"objective.total_steps": int},
    build=lambda config, teacher: EasyConsistencyTuningLoss(noise_config(config), **objective_options(config))))
