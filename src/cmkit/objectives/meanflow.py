"""MeanFlow (Geng et al. 2025): learn the average velocity u(z, r, t) = (1/(t - r)) int_r^t v(z_s, s) ds.

In flow-matching time (z_t = (1 - t) x0 + t eps, v = eps - x0), the MeanFlow identity
u(z_t, r, t) = v(z_t, t) - (t - r) du/dt gives the regression target

    u_tgt = v - (t - r) * JVP of u at (z_t, r, t) with tangent (v, 0, 1),    (stop-gradient)

with v the conditional velocity eps - x0. A fraction of samples has r = t: plain flow matching.
The loss sum((u - u_tgt)^2) is weighted by 1 / stopgrad(sum((u - u_tgt)^2) + c)^p.
"""

from __future__ import annotations

import torch

from ..batch_rng import batch_rng
from ..noise import broadcast_to_batch
from ..precond import MeanFlowModel
from .base import Objective
from .jvp import JVP_MODES, jvp
from .registry import MethodSpec, objective_options, register
from .rng import SharedRNG


def logit_normal(n: int, p_mean: float, p_std: float, generator) -> torch.Tensor:
    return torch.sigmoid(p_mean + p_std * batch_rng(generator).randn((n,)))


def meanflow_jvp(model, z, r, t, v, mode: str = "autograd", eps: float = 1e-3, condition=None):
    """(u(z, r, t), d/ds u(z + s v, r, t + s) at s = 0)."""
    def u(z, r, t):
        return model.velocity(z, r, t, condition)
    return jvp(u, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)), mode, eps, model)


class MeanFlowLoss(Objective):
    """The MeanFlow loss on a `MeanFlowModel` (called through its ``velocity``)."""

    def __init__(self, p_mean: float = -0.4, p_std: float = 1.0, flow_fraction: float = 0.75,
                 adaptive_p: float = 1.0, adaptive_c: float = 1e-3, jvp: str = "autograd",
                 r_p_mean: float | None = None, r_p_std: float | None = None):
        if not 0 <= flow_fraction <= 1 or p_std <= 0 or adaptive_p < 0 or adaptive_c <= 0:
            raise ValueError("need 0 <= flow_fraction <= 1, p_std > 0, adaptive_p >= 0, adaptive_c > 0")
        if (r_p_mean is None) != (r_p_std is None) or (r_p_std is not None and r_p_std <= 0):
            raise ValueError("set both r_p_mean and r_p_std (r_p_std > 0), or neither")
        if jvp not in JVP_MODES:
            raise ValueError(f"unknown jvp {jvp!r}; known: {', '.join(JVP_MODES)}")
        self.p_mean, self.p_std, self.flow_fraction = p_mean, p_std, flow_fraction
        self.r_p_mean, self.r_p_std = r_p_mean, r_p_std
        self.p, self.c, self.jvp = adaptive_p, adaptive_c, jvp

    def sample_times(self, n: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """t >= r, both logit-normal; r = t for a ``flow_fraction`` of the samples. The pair is sorted;
        its second draw has its own (r_p_mean, r_p_std) when set (py-meanflow's "v1" sampler, which
        puts r near 0 so that long jumps, those one-step sampling makes, are trained often)."""
        a = logit_normal(n, self.p_mean, self.p_std, generator)
        if self.r_p_mean is None:
            b = logit_normal(n, self.p_mean, self.p_std, generator)
        else:
            b = logit_normal(n, self.r_p_mean, self.r_p_std, generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        same = batch_rng(generator).rand(n) < self.flow_fraction
        return torch.where(same, t, r), t

    def target(self, model, z, r, t, v, condition=None):
        """u(z, r, t) (no grad) and the MeanFlow target."""
        u, du_dt = meanflow_jvp(model, z, r, t, v, self.jvp, condition=condition)
        return u, v - broadcast_to_batch(t - r, v) * du_dt

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        r, t = (s.to(x0) for s in self.sample_times(x0.shape[0], generator))
        return {"r": r, "t": t, "eps": batch_rng(generator).randn(x0.shape).to(x0)}

    def loss(self, net, x0: torch.Tensor, draws, *, target=None, condition=None):
        r, t, eps = draws["r"], draws["t"], draws["eps"]
        z = broadcast_to_batch(1 - t, x0) * x0 + broadcast_to_batch(t, x0) * eps
        v = eps - x0
        with torch.no_grad():
            rng = SharedRNG(x0.device)
            _, u_tgt = self.target(net, z, r, t, v, condition)
        rng.replay()
        sq = (net.velocity(z, r, t, condition) - u_tgt).float().pow(2).flatten(1).sum(1)
        weight = 1 / (sq.detach() + self.c) ** self.p
        return weight * sq, {"mse": sq.detach().mean() / x0[0].numel()}


register(MethodSpec(
    name="meanflow", summary="MeanFlow: the average velocity between two times, trained from scratch",
    source="Geng et al. 2025, 'Mean flows for one-step generative modeling'",
    objective=MeanFlowLoss, wrapper=MeanFlowModel, time_derivative=True,
    nullable={"objective.r_p_mean": float, "objective.r_p_std": float},
    build=lambda config, teacher: MeanFlowLoss(**objective_options(config))))
