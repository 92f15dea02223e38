"""Truncated consistency models, TCM (Lee et al. 2024; NVlabs FastGen's TCM).

Stage 2 of a two-stage recipe. Stage 1 is any consistency model; TCM continues it, training the
network only on the noisy part of the trajectory, sigma >= sigma_t' (``transition_sigma``), and
spends none of its capacity on denoising the last stretch, which one-step sampling never asks of it.
The pair (t, r) is ECT's at its final gap, r = t (1 - (1 - ratio) n(t)); the target at r is the
online network's (no gradient) when r >= sigma_t', and the frozen stage-1 model's below it:

    f_tcm(x, s) = f_theta(x, s)  if s >= sigma_t'  else  f_stage1(x, s)
    loss = mean over the batch's rest of    d(f_theta(x_t, t), f_tcm(x_r, r)) / (t - r)
         + w_boundary * the same mean over its boundary part (t = sigma_t', so r < sigma_t')

t follows a Student-t on ln(sigma) (``p_mean``, ``p_std``, ``df``) truncated to
[sigma_t', sigma_max]; a fraction ``boundary_prob`` of each batch is placed at sigma_t'. As in
FastGen, the stage-1 model keeps dropout on, with the student's masks (one RNG state replayed), and
the student and its EMA start from the stage-1 run's EMA weights. Sampling needs the student only.
"""

from __future__ import annotations

import math

import torch

from ..batch_rng import batch_rng
from ..noise import NoiseConfig, broadcast_to_batch
from ..precond import ConsistencyFunction
from .base import Objective
from .distances import make_distance
from .ect import gap_r
from .registry import MethodSpec, noise_config, objective_options, register
from .rng import SharedRNG


class TruncatedLogStudentT:
    """ln(sigma) = mean + std T, T ~ Student-t(df), truncated to sigma in [low, high]; sampled by
    inverse CDF. With T = sqrt(df) sinh(u), u has density proportional to cosh(u)^(-df), smooth for
    any df (the heavy tails of df = 0.01 become a nearly flat density), so a table of its CDF on an
    even u grid, interpolated linearly, is exact to about 1e-7."""

    def __init__(self, mean: float, std: float, df: float, low: float, high: float, points: int = 4097):
        if not (std > 0 and df > 0 and 0 < low < high) or not all(map(math.isfinite, (mean, std, df, low, high))):
            raise ValueError(f"the time distribution needs std > 0, df > 0 and 0 < low < high, got std {std}, "
                             f"df {df}, range [{low}, {high}]")
        self.mean, self.std, self.df = mean, std, df
        to_u = lambda sigma: math.asinh((math.log(sigma) - mean) / (std * math.sqrt(df)))  # noqa: E731
        u = torch.linspace(to_u(low), to_u(high), points, dtype=torch.float64)
        density = torch.cosh(u) ** -df
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                         torch.cumsum((density[1:] + density[:-1]) / 2 * (u[1:] - u[:-1]), 0)])
        self.u, self.cdf = u, cdf / cdf[-1]
        self.low, self.high = low, high

    def icdf(self, q: torch.Tensor) -> torch.Tensor:
        """sigma at the quantiles ``q`` in [0, 1] (float64 inside, float32 out)."""
        q = q.to(torch.float64).clamp(0, 1)
        i = torch.searchsorted(self.cdf, q).clamp(1, len(self.cdf) - 1)
        c0, c1 = self.cdf[i - 1], self.cdf[i]
        w = ((q - c0) / (c1 - c0).clamp(min=1e-300)).clamp(0, 1)
        u = self.u[i - 1] + w * (self.u[i] - self.u[i - 1])
        sigma = torch.exp(self.mean + self.std * math.sqrt(self.df) * torch.sinh(u))
        return sigma.clamp(self.low, self.high).float()


class TruncatedConsistencyLoss(Objective):
    def __init__(self, stage1: torch.nn.Module, noise: NoiseConfig = NoiseConfig(), transition_sigma: float = 1.0,
                 boundary_prob: float = 0.25, w_boundary: float = 0.1, p_mean: float = 0.0, p_std: float = 0.2,
                 df: float = 0.01, ratio: float = 0.999, k: float = 8.0, b: float = 1.0,
                 distance: str = "pseudo_huber", huber_c: float | None = 0.0):
        if stage1 is None:
            raise ValueError("TCM needs its stage-1 model")
        if not noise.sigma_min < transition_sigma < noise.sigma_max:
            raise ValueError(f"objective.transition_sigma must lie inside the noise range "
                             f"({noise.sigma_min:g}, {noise.sigma_max:g}), got {transition_sigma}")
        if not 0 <= boundary_prob < 1:
            raise ValueError(f"objective.boundary_prob must be in [0, 1), got {boundary_prob}")
        if not (w_boundary >= 0 and math.isfinite(w_boundary)):
            raise ValueError(f"objective.w_boundary must be a finite number >= 0, got {w_boundary}")
        if not 0 < ratio < 1:
            raise ValueError(f"objective.ratio must be in (0, 1), got {ratio}")
        self.stage1 = stage1.train().requires_grad_(False)  # dropout on, as the online network's
        self.noise, self.transition = noise, float(transition_sigma)
        self.boundary_prob, self.w_boundary = boundary_prob, w_boundary
        self.times = TruncatedLogStudentT(p_mean, p_std, df, self.transition, noise.sigma_max)
        self.shrink, self.k, self.b = 1 - ratio, k, b
        self.distance = make_distance(distance, huber_c)  # c = 0: the (unsquared) L2 norm

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        rng = batch_rng(generator)
        n = x0.shape[0]
        t = self.times.icdf(rng.rand(n))
        boundary, count = rng.subset(self.boundary_prob, n)
        total = n if rng.total is None else rng.total
        t = torch.where(boundary, torch.full_like(t, self.transition), t)
        r = gap_r(t, self.shrink, self.k, self.b)
        r = torch.where(r < self.noise.sigma_min, torch.zeros_like(r), r)  # below sigma_min: the data
        # Per-row weights whose batch mean is mean(rest) + w_boundary mean(boundary part).
        rest = total - count
        weight = torch.where(boundary, torch.tensor(self.w_boundary * total / max(count, 1)),
                             torch.tensor(total / max(rest, 1)))
        return {"t": t.to(x0), "r": r.to(x0), "z": rng.randn(x0.shape).to(x0), "weight": weight.to(x0),
                "boundary": boundary.to(x0.device)}

    def loss(self, net, x0: torch.Tensor, draws, *, target=None, condition=None):
        t, r, z = draws["t"], draws["r"], draws["z"]
        x_t = x0 + broadcast_to_batch(t, x0) * z
        x_r = x0 + broadcast_to_batch(r, x0) * z
        r_in = r.clamp(min=self.noise.sigma_min)
        rng = SharedRNG(x0.device)
        with torch.no_grad():
            online = net(x_r, r_in, condition)
            rng.replay()
            frozen = self.stage1(x_r, r_in, condition)
            rows = (-1,) + (1,) * (x0.dim() - 1)
            target_out = torch.where((r < self.transition).view(rows), frozen, online)
            target_out = torch.where((r > 0).view(rows), target_out, x0)
        rng.replay()
        per_sample = self.distance(net(x_t, t, condition), target_out) / (t - r)
        boundary = draws["boundary"]
        logs = {"below_transition": (r < self.transition).float().mean(), "boundary": boundary.float().mean()}
        return per_sample * draws["weight"], logs


def _sampling_floor(config: dict) -> float | None:
    return config["objective"].get("transition_sigma")  # None: a folder exported before it was recorded


register(MethodSpec(
    name="tcm", summary="truncated consistency model: a consistency run (--init) trained on the noisy levels only",
    source="Lee et al. 2024, 'Truncated consistency models'",
    objective=TruncatedConsistencyLoss, wrapper=ConsistencyFunction, init=True, frozen_init=True,
    sampling_floor=_sampling_floor, nullable={"objective.huber_c": float},
    build=lambda config, stage1: TruncatedConsistencyLoss(stage1, noise_config(config), **objective_options(config))))
