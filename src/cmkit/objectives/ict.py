"""Improved consistency training, iCT (Song & Dhariwal 2023).

CT without an EMA target (the target is the stop-gradient online network, with the same dropout
masks), pseudo-Huber distance, weighting 1/(sigma_hi - sigma_lo), noise pairs drawn from a
discretised lognormal, and a grid that doubles in size at fixed intervals.
"""

from __future__ import annotations

import math

import torch

from ..batch_rng import batch_rng
from ..noise import NoiseConfig, broadcast_to_batch
from ..precond import ConsistencyFunction
from .consistency import ConsistencyLoss
from .registry import MethodSpec, fix_horizon, noise_config, objective_options, register


def ict_num_levels(k: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """N(k) = min(s0 2^floor(k/K'), s1) + 1 with K' = floor(K / (log2 floor(s1/s0) + 1)), K' >= 1
    so that runs shorter than the number of doublings still progress."""
    stage_len = max(1, math.floor(total_steps / (math.log2(math.floor(s1 / s0)) + 1)))
    return min(s0 * 2 ** (max(k, 0) // stage_len), s1) + 1


def lognormal_pair_probs(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """p(n) proportional to erf((ln s_n - P_mean)/(sqrt2 P_std)) - erf((ln s_{n+1} - P_mean)/(sqrt2 P_std))
    for the pair (s_n > s_{n+1}) of a decreasing grid: the lognormal mass between the two levels."""
    cdf = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2) * p_std))
    probs = cdf[:-1] - cdf[1:]
    return (probs / probs.sum()).float()


class ImprovedConsistencyTrainingLoss(ConsistencyLoss):
    needs_target = False

    def __init__(self, noise: NoiseConfig = NoiseConfig(), total_steps: int = 1, s0: int = 10, s1: int = 1280,
                 p_mean: float = -1.1, p_std: float = 2.0, distance: str = "pseudo_huber",
                 huber_c: float | None = None, weighting: str = "inverse_gap"):
        super().__init__(noise, distance=distance, huber_c=huber_c, weighting=weighting)
        if total_steps < 1 or s0 < 1 or s1 < s0 or p_std <= 0:
            raise ValueError("need total_steps >= 1, 1 <= s0 <= s1 and p_std > 0")
        self.total_steps, self.s0, self.s1, self.p_mean, self.p_std = total_steps, s0, s1, p_mean, p_std

    def num_levels(self, step):
        return ict_num_levels(step, self.total_steps, self.s0, self.s1)

    def target_rate(self, step):
        return 0.0  # no target network: the stop-gradient online network

    def sample_pairs(self, sigmas, batch, generator):
        probs = lognormal_pair_probs(sigmas.cpu(), self.p_mean, self.p_std)
        return batch_rng(generator).multinomial(probs, batch)

    def lower(self, x_hi, x0, z, sigma_hi, sigma_lo, condition=None, guidance=None):
        return x0 + broadcast_to_batch(sigma_lo, x0) * z


register(MethodSpec(
    name="ict", summary="improved consistency training (pseudo-Huber, lognormal pairs, no EMA target)",
    source="Song & Dhariwal 2023, 'Improved techniques for training consistency models'",
    objective=ImprovedConsistencyTrainingLoss, wrapper=ConsistencyFunction, resolve=fix_horizon,
    nullable={"objective.huber_c": float, "objective.total_steps": int},
    build=lambda config, teacher: ImprovedConsistencyTrainingLoss(noise_config(config), **objective_options(config))))
