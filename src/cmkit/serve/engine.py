"""What the server computes, without HTTP: generation requests turned into batchable work, and
editing requests turned into calls of `cmkit.editing.tasks`.

A generation request draws its noise from its own seed exactly as `cmkit sample --seed S` does
(starting noise, then one re-noising draw per later level), so a request's images do not depend
on which other requests shared its network call, and equal the command line's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CmkitError
from ..sampling import sample_levels


@dataclass(frozen=True)
class Limits:
    max_n: int = 64
    max_steps: int = 8  # consistency steps per sample
    max_teacher_steps: int = 40  # Heun steps of an EDM teacher
    max_edit_steps: int = 40
    max_upload_bytes: int = 4 * 2**20
    max_frames: int = 32


@dataclass
class Generation:
    levels: torch.Tensor
    noise: torch.Tensor
    renoise: list
    labels: torch.Tensor | None
    guidance: float | None


class Engine:
    def __init__(self, run, limits: Limits = Limits()):
        self.run, self.limits = run, limits

    def generation(self, *, n: int, seed: int, steps: int | None, sigmas: list[float] | None, class_spec,
                   guidance: float | None) -> tuple[tuple, Generation]:
        """(batching key, work) for one request, checked against the limits."""
        run, limits = self.run, self.limits
        if not 1 <= n <= limits.max_n:
            raise CmkitError(f"n must be in [1, {limits.max_n}], got {n}")
        cap = limits.max_teacher_steps if run.is_diffusion else limits.max_steps
        if steps is not None and not 1 <= steps <= cap:
            raise CmkitError(f"steps must be in [1, {cap}], got {steps}")
        if sigmas is not None and not 1 <= len(sigmas) <= cap:
            raise CmkitError(f"give 1 to {cap} sigmas, got {len(sigmas)}")
        levels = run.sigmas_for(steps, sigmas)  # checks explicit sigmas
        labels = run.labels(class_spec, n, seed)
        run.network(guidance, labels)  # checks the guidance request now, not in the worker
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n, *run.shape, generator=gen)
        renoise = [] if run.is_diffusion else [torch.randn(n, *run.shape, generator=gen) for _ in levels[1:]]
        key = ("generate", tuple(levels.tolist()), guidance)
        return key, Generation(levels, noise, renoise, labels, guidance)

    @torch.inference_mode()
    def run_group(self, work: list) -> list:
        """Compute a group of compatible jobs: generations in one batch, anything else (callables)
        one by one."""
        if not isinstance(work[0], Generation):
            return [job() for job in work]
        run, first = self.run, work[0]
        sizes = [len(w.noise) for w in work]
        noise = torch.cat([w.noise for w in work]).to(run.device)
        labels = None if first.labels is None else torch.cat([w.labels for w in work]).to(run.device)
        model = run.network(first.guidance, labels)
        levels = first.levels.to(run.device)
        renoise = None
        if not run.is_diffusion:
            renoise = [torch.cat([w.renoise[i] for w in work]).to(run.device) for i in range(len(levels) - 1)]
        x = sample_levels(model, noise * levels[0], levels, labels, diffusion=run.is_diffusion,
                          sigma_min=run.noise_range.sigma_min, noises=renoise)
        data = run.scaler.to_data(x.float().cpu())
        return list(np.split(data, np.cumsum(sizes)[:-1]))
