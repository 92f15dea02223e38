"""diffusers out: a cmkit consistency model as a ``ConsistencyModelPipeline`` folder, or, for a
student of a DDPM-family teacher, a ``DDPMPipeline`` folder with an ``LCMScheduler`` (such folders
load back as runs: `cmkit.diffusers_runs`).

    cmkit export diffusers --checkpoint runs/fm-cd --out fm-cd-diffusers
    pipe = ConsistencyModelPipeline.from_pretrained("fm-cd-diffusers")

The two sides compute the same function: diffusers' CMStochasticIterativeScheduler scales the
input by 1 / sqrt(sigma^2 + sigma_data^2), feeds the UNet 250 ln(sigma) and combines with the
boundary-condition c_skip and c_out, which is cmkit's `ConsistencyFunction` with the ``openai``
c_noise. Its multistep levels are Karras-grid indices (``timesteps=[22, 0]``) over
``num_train_timesteps`` levels; `diffusers_timesteps` converts cmkit levels to them.

Weights are read and written as safetensors only: a folder with only .bin (pickle) weights is
refused rather than unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..diffusers_runs import SIDECAR
from ..discrete_vp import sigma_table
from ..errors import CmkitError
from ..noise import NoiseConfig
from ..objectives import methods
from ..outputs import whole_folder

GRID_LEVELS = 40  # num_train_timesteps when the run has no grid of its own (OpenAI's CD used 40)


def _scheduler_config(run, levels: int, clip: bool) -> dict:
    noise_range = run.noise_range
    return {"_class_name": "CMStochasticIterativeScheduler", "num_train_timesteps": levels,
            "sigma_min": noise_range.sigma_min, "sigma_max": noise_range.sigma_max,
            "sigma_data": noise_range.sigma_data, "s_noise": 1.0, "rho": noise_range.rho, "clip_denoised": clip}


def _grid_levels(run) -> int:
    """CD's grid size N (the levels its ODE steps were trained between), else GRID_LEVELS."""
    n = run.config.get("objective", {}).get("num_levels")
    return n if isinstance(n, int) and n >= 2 else GRID_LEVELS


def export_diffusers(run, out: str | Path, *, levels: int | None = None, clip_denoised: bool = False,
                     force: bool = False) -> Path:
    """Write ``run`` (an image consistency model) as a ConsistencyModelPipeline folder: a new one, or
    with ``force`` in place of an earlier export. The folder appears whole (written beside, then renamed)."""
    if not run.is_image:
        raise CmkitError("diffusers' ConsistencyModelPipeline generates images; this run was trained on vectors "
                         "(use cmkit export onnx)")
    if "diffusers" not in run.export_formats:
        exportable = [name for name, spec in methods().items()
                      if "diffusers" in spec.export_formats and not spec.frozen_init]
        raise CmkitError(f"export diffusers takes a consistency model with the boundary-condition "
                         f"parametrization ({', '.join(exportable)}); this is {run.description}")
    backbone = run.model.backbone
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        earlier = (out / SIDECAR).is_file()  # what this function writes last
        if not (force and earlier):
            raise CmkitError(f"{out} already exists" + (": pass --force to replace the export" if earlier else
                                                        " and is not a cmkit export: choose another --out"))
    with whole_folder(out) as tmp:
        _write_pipeline(run, backbone, tmp, levels, clip_denoised)
    return out


def _write_pipeline(run, backbone, out: Path, levels: int | None, clip_denoised: bool) -> Path:
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    if getattr(backbone, "lora", None):
        return _export_lora(run, out)
    if run.takes_text:
        return _export_text_lcm(run, out)
    if run.is_latent:
        raise CmkitError("a latent run without prompts has no diffusers pipeline to export to (diffusers' latent "
                         "consistency pipeline takes prompts); use the run with cmkit itself")
    if (getattr(backbone, "combined", False) or getattr(backbone, "guidance_input", False)
            or getattr(backbone, "time_inputs", 1) != 1):
        raise CmkitError("this run's UNet takes a guidance scale or a second time input, which "
                         "diffusers' pipelines cannot pass")
    if "vp" in run.config["model"]:
        if levels is not None or clip_denoised:
            raise CmkitError("--levels and --clip-denoised apply to ConsistencyModelPipeline exports; a student of "
                             "a DDPM teacher exports with an LCMScheduler on its teacher's timesteps")
        return _export_lcm(run, out)
    if run.model.c_noise_name != "openai":
        raise CmkitError("the pipeline's scheduler feeds the UNet 250 ln(sigma) (model.c_noise=openai); "
                         f"this run uses c_noise={run.model.c_noise_name}")
    levels = levels or _grid_levels(run)
    scheduler = CMStochasticIterativeScheduler.from_config(_scheduler_config(run, levels, clip_denoised))
    pipe = ConsistencyModelPipeline(unet=backbone.unet, scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    _write_sidecar(run, out)
    return out


def _export_lcm(run, out: Path) -> Path:
    """A student of a DDPM-family teacher as a ``DDPMPipeline`` folder whose scheduler is an
    ``LCMScheduler`` on the teacher's betas (those of the levels the student covers): the
    scheduler's boundary scalings are the student's
    (`cmkit.precond.VPConsistencyFunction`), so ``DDPMPipeline.from_pretrained(out)(num_inference_steps=k)``
    samples it in k steps, and cmkit loads the folder back as the same run."""
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=run.model.backbone.unet, scheduler=_lcm_scheduler(run)).save_pretrained(
        str(out), safe_serialization=True)
    _write_sidecar(run, out)
    return out


def _export_text_lcm(run, out: Path) -> Path:
    """A text-conditioned latent student with an ``LCMScheduler``, the run's VAE, tokenizer and text
    encoder: a guided student as a ``LatentConsistencyModelPipeline`` (the scale through the UNet's
    ``time_cond_proj_dim``: ``pipe(prompt, num_inference_steps=k, guidance_scale=w)`` samples what
    ``cmkit sample --prompt ... --steps k --guidance w`` does); an unguided one, whose UNet has no
    such input (which that pipeline requires), as a ``StableDiffusionPipeline``, sampled as an
    LCM-LoRA is, at ``guidance_scale=1`` (no classifier-free guidance)."""
    from ..nets.diffusers_text_unet import quiet_torchvision_notice
    quiet_torchvision_notice()
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    if "vp" not in run.config["model"]:
        raise CmkitError("LatentConsistencyModelPipeline steps an LCMScheduler: this run is not a student of a "
                         "discrete-time (DDPM-family) teacher")
    pipeline = LatentConsistencyModelPipeline if run.model.backbone.guidance_input else StableDiffusionPipeline
    pipe = pipeline(vae=run.codec.vae, text_encoder=run.prompts.text_encoder, tokenizer=run.prompts.tokenizer,
                    unet=run.model.backbone.unet, scheduler=_lcm_scheduler(run), safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    _write_sidecar(run, out)
    return out


def _export_lora(run, out: Path) -> Path:
    """An lcm-lora run's adapters as a diffusers LoRA folder (``pytorch_lora_weights.safetensors``),
    for ``pipe.load_lora_weights(out)`` on its base pipeline with an ``LCMScheduler``."""
    from ..checkpoint import LORA_FILE
    from ..nets.diffusers_text_unet import save_lora

    out.mkdir(parents=True, exist_ok=True)
    save_lora(run.model.backbone.unet, out, LORA_FILE)
    _write_sidecar(run, out)
    return out


def _lcm_scheduler(run):
    """An ``LCMScheduler`` on the teacher's betas, cut to the levels the student covers."""
    from diffusers import DDPMScheduler, LCMScheduler

    vp = run.config["model"]["vp"]
    table = dict(vp["table"])
    # The levels the student was trained on (and the one above its sigma_max, so that t(sigma) is
    # interpolated as before up to there): the teacher's first T' betas give exactly its first T'
    # noise levels, so the pipeline's timesteps stay within the student's range.
    levels = int((sigma_table(table) < run.noise_range.sigma_max).sum()) + 1
    # Sigmoid betas are DDPMScheduler's alone (LCMScheduler raises), so they are written out too.
    if levels < table["num_train_timesteps"] or table["beta_schedule"] == "sigmoid":
        betas = DDPMScheduler(**table).betas[:levels].tolist()
        table.update(num_train_timesteps=levels, trained_betas=betas)
    # steps_offset does not move LCMScheduler's timesteps; Stable Diffusion's pipelines warn unless it is 1.
    return LCMScheduler(**table, prediction_type=vp["prediction_type"], clip_sample=False,
                        timestep_scaling=vp.get("timestep_scaling", 10.0), steps_offset=1)


def _write_sidecar(run, out: Path) -> None:
    sidecar = {"method": run.method, "noise": run.config["noise"], "num_classes": run.num_classes,
               "class_names": run.class_names, "has_null_label": run.has_null_label,
               "source": str(run.path)}
    if run.is_latent:
        sidecar["image_channels"] = run.image_shape[0]
    if run.guidance_range is not None:
        sidecar["guidance"] = list(run.guidance_range)
    if run.spec.frozen_init:  # a TCM run: its network's parametrization and its sampling floor
        sidecar["init_method"] = run.config["init_method"]
        sidecar["objective"] = run.config["objective"]
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")


def diffusers_timesteps(sigmas, noise: NoiseConfig, levels: int) -> list[int]:
    """The ``timesteps`` argument of ConsistencyModelPipeline that samples at ``sigmas`` (which
    must lie on the ``levels``-level Karras grid of ``noise``)."""
    ramp = ((noise.sigma_max ** (1 / noise.rho) - np.asarray(sigmas, np.float64) ** (1 / noise.rho))
            / (noise.sigma_max ** (1 / noise.rho) - noise.sigma_min ** (1 / noise.rho)))
    index = np.rint(ramp * (levels - 1)).astype(int)
    grid = noise.karras(levels).double().numpy()
    if not np.allclose(grid[index], sigmas, rtol=1e-4):
        raise CmkitError(f"levels {list(sigmas)} are not on the {levels}-level Karras grid the pipeline samples from")
    return sorted(index.tolist(), reverse=True)


def describe_export(out: Path) -> str:
    """What `export_diffusers` wrote to ``out``, and how diffusers loads it, in one line."""
    from ..checkpoint import LORA_FILE

    if not (out / "model_index.json").is_file():
        return (f"wrote LCM-LoRA adapters to {out / LORA_FILE}: load them into the teacher's pipeline with "
                f"pipe.load_lora_weights('{out}') and an LCMScheduler, and sample at guidance_scale=1")
    index = json.loads((out / "model_index.json").read_text())
    scheduler = index.get("scheduler", [None, "?"])[1]
    return f"wrote a {index['_class_name']} (scheduler: {scheduler}) to {out}"
