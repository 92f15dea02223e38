"""Latent consistency distillation, LCM (Luo et al. 2023), on any discrete-time VP teacher.

CD on the teacher's own timesteps: the skipping grid t in {k - 1, 2k - 1, ..., T - 1} (k = T / 50),
one DDIM step of the (guided) teacher from t to t - k (clamped at 0), the target network (an EMA
of the student) at t - k, and LCM's boundary scalings (`cmkit.precond.LCMFunction`). In cmkit's
sigma a DDIM step is an Euler step of the PF-ODE and the LCM guidance form c + w (c - u) is
classifier-free guidance at scale w + 1, cmkit's (and the pipelines' ``guidance_scale``)
convention; both are checked against a transcription of diffusers' reference script
(tests/test_lcm.py). Latents are data like any other: the method is the same in pixel space.
"""

from __future__ import annotations

import torch

from ..batch_rng import batch_rng
from ..condition import as_condition
from ..discrete_vp import skipping_grid
from ..errors import CmkitError
from ..noise import NoiseConfig
from ..precond import LCMFunction, VPDenoiser
from .consistency import ConsistencyDistillationLoss
from .registry import MethodSpec, noise_config, objective_options, register, with_objective


class LatentConsistencyDistillationLoss(ConsistencyDistillationLoss):
    """d(f(x_t, t), stopgrad f-(DDIM_{t -> t-k}(x_t), t - k)) on the teacher's timestep grid."""

    def __init__(self, teacher, noise: NoiseConfig = NoiseConfig(), num_ddim_timesteps: int = 50,
                 target_ema: float = 0.95, guidance: list[float] | None = None, distance: str = "l2",
                 huber_c: float | None = None):
        super().__init__(teacher, noise, num_levels=2, target_ema=target_ema, solver="euler", guidance=guidance,
                         distance=distance, huber_c=huber_c)
        table = getattr(teacher, "table", None)
        if table is None:
            raise ValueError("lcm needs a discrete-time teacher")
        self.starts, self.skip = skipping_grid(len(table.sigmas), num_ddim_timesteps)
        self.sigmas = table.sigmas.float()  # the scheduler's float32 levels: t(sigma) is their index exactly

    def num_levels(self, step):
        return len(self.starts)

    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None, condition=None):
        B = x0.shape[0]
        t_hi = self.starts[batch_rng(generator).randint(len(self.starts), B)]
        t_lo = (t_hi - self.skip).clamp(min=0)
        draws = {"sigma_hi": self.sigmas[t_hi].to(x0), "sigma_lo": self.sigmas[t_lo].to(x0),
                 "z": batch_rng(generator).randn(x0.shape).to(x0)}
        scales = self.guidance_scales(as_condition(condition), B, generator)
        if scales is not None:
            draws["guidance"] = scales
        return draws


def _builder(objective: type, *own: str):
    """The build function of an LCM method: ``objective`` on the teacher, from the objective
    section less the keys that are not the loss's (``own``: settings resolved elsewhere)."""
    def build(config: dict, teacher):
        if getattr(teacher, "table", None) is None:
            raise CmkitError(f"{config['method']} distils a discrete-time teacher (a diffusers DDPM-family folder: its "
                             "grid is the scheduler's timesteps); distil a cmkit edm teacher with cd")
        return objective(teacher, noise_config(config), **objective_options(config, "init_from_teacher",
                                                                            "prompt_guidance", *own))
    return build


# objective.prompt_guidance: the guidance range a text teacher's student gets by default (null: unguided).
NULLABLE = {"objective.huber_c": float, "objective.guidance": list, "objective.prompt_guidance": list}

register(MethodSpec(
    name="lcm", summary="latent consistency distillation from a diffusers DDPM-family --teacher (DDIM steps on "
                        "its timestep grid, LCM's boundary, guidance as an input)",
    source="Luo et al. 2023, 'Latent consistency models'",
    objective=LatentConsistencyDistillationLoss, wrapper=LCMFunction, teacher=True, starts_from_teacher=True,
    guided=True, whole_table=True,
    nullable=NULLABLE, build=_builder(LatentConsistencyDistillationLoss)))


# LCM-LoRA (Luo et al. 2023b, "LCM-LoRA: a universal Stable-Diffusion acceleration module"): the same
# distillation training LoRA adapters only. As diffusers' train_lcm_distill_lora_sd_wds.py does, the
# teacher is the base UNet with the adapters off, the target is the student itself (no EMA target,
# stop-gradient) and the student takes no guidance input: its scale is fixed by the training range.

LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules")


class AdaptersOff(torch.nn.Module):
    """``model`` (a denoiser over a LoRA-adapted backbone) with its adapters disabled while it runs:
    the base network, computed from the same weights."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    table = property(lambda self: self.model.table)
    noise = property(lambda self: self.model.noise)
    backbone = property(lambda self: self.model.backbone)
    num_classes = property(lambda self: self.model.num_classes)

    def forward(self, x, sigma, condition=None):
        unet = self.model.backbone.unet
        unet.disable_adapters()
        try:
            return self.model(x, sigma, condition)
        finally:
            unet.enable_adapters()


class LatentConsistencyLoRALoss(LatentConsistencyDistillationLoss):
    needs_target = False  # the target is the online network, under stop-gradient
    student_sees_guidance = False


def _teacher_view(student: torch.nn.Module, config: dict) -> torch.nn.Module:
    """LCM-LoRA's teacher: the student's backbone as the teacher's denoiser, adapters off."""
    model = config["model"]
    return AdaptersOff(VPDenoiser(student.backbone, noise_config(config), c_noise="timestep", vp=model["vp"]))


def _resolve_lora(config: dict) -> dict:
    """The adapters' settings (objective.lora_*) as the model section's ``lora``, which builds them."""
    obj = config["objective"]
    if "text_shape" not in config["model"]:
        raise CmkitError("lcm-lora adapts a Stable-Diffusion-family UNet (a text-conditioned --teacher folder)")
    rank, alpha, dropout, targets = (obj[k] for k in LORA_KEYS)
    if not (isinstance(rank, int) and rank >= 1) or not alpha > 0 or not 0 <= dropout < 1:
        raise CmkitError(f"objective.lora_rank must be a positive integer, lora_alpha positive and lora_dropout in "
                         f"[0, 1); got {rank}, {alpha}, {dropout}")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise CmkitError("objective.lora_target_modules must be a list of module names")
    out = with_objective(config)
    out["model"] = {**out["model"], "lora": {"rank": rank, "alpha": alpha, "dropout": dropout,
                                             "target_modules": targets}}
    return out


register(MethodSpec(
    name="lcm-lora", summary="LCM with LoRA adapters on a Stable-Diffusion-family --teacher (the base UNet with the "
                             "adapters off is the teacher; saves pytorch_lora_weights.safetensors)",
    source="Luo et al. 2023, 'LCM-LoRA: a universal Stable-Diffusion acceleration module'",
    objective=LatentConsistencyLoRALoss, wrapper=LCMFunction, teacher=True, starts_from_teacher=True,
    guided=True, whole_table=True, latent_only=True, teacher_view=_teacher_view, resolve=_resolve_lora,
    nullable=NULLABLE, build=_builder(LatentConsistencyLoRALoss, *LORA_KEYS)))
