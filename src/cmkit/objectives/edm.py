"""The EDM denoising loss (Karras et al. 2022), the teacher's objective."""

from __future__ import annotations

import torch

from ..batch_rng import batch_rng
from ..noise import broadcast_to_batch
from ..precond import EDMDenoiser
from .base import Objective
from .registry import MethodSpec, noise_config, objective_options, register


class EDMLoss(Objective):
    """lambda(sigma) ||D(x0 + sigma z, sigma) - x0||^2 with ln sigma ~ N(p_mean, p_std^2).

    lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 makes the loss of the ideal denoiser
    on N(0, sigma_data^2) data exactly 1 per dimension at every sigma. Returns per-sample losses
    (mean over dimensions).
    """

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2):
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        rng = batch_rng(generator)
        ln_sigma = self.p_mean + self.p_std * rng.randn((x0.shape[0],))
        return {"sigma": ln_sigma.exp().to(x0), "z": rng.randn(x0.shape).to(x0)}

    def loss(self, net, x0: torch.Tensor, draws, *, target=None, condition=None):
        sigma, z = draws["sigma"], draws["z"]
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        denoised = net(x0 + broadcast_to_batch(sigma, x0) * z, sigma, condition)
        loss = weight * (denoised - x0).pow(2).flatten(1).mean(1)
        return loss, {}


register(MethodSpec(
    name="edm", summary="an EDM diffusion teacher (a denoiser, sampled with Heun's ODE solver)",
    source="Karras et al. 2022, 'Elucidating the design space of diffusion-based generative models'",
    objective=EDMLoss, wrapper=EDMDenoiser, diffusion=True,
    build=lambda config, teacher: EDMLoss(noise_config(config).sigma_data, **objective_options(config))))
