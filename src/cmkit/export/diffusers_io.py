"""diffusers in and out: a cmkit consistency model as a ``ConsistencyModelPipeline`` folder, and
such folders (or a bare ``UNet2DModel`` folder with a scheduler config, the layout of OpenAI's
converted CD/CT checkpoints) loaded as cmkit runs.

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
import torch
from torch import nn

from ..config import default_config
from ..errors import CmkitError
from ..nets.conditioning import labels_or_null
from ..noise import NoiseConfig
from ..precond import ConsistencyFunction
from ..safe_io import read_json

CONSISTENCY_METHODS = ("cd", "ct", "ict", "ect")  # f(x, sigma) with the boundary-condition scalings
SIDECAR = "cmkit.json"  # what diffusers' configs cannot say: class names, the null label, cmkit's noise
GRID_LEVELS = 40  # num_train_timesteps when the run has no grid of its own (OpenAI's CD used 40)


def _scheduler_config(run, levels: int, clip: bool) -> dict:
    noise = run.noise
    return {"_class_name": "CMStochasticIterativeScheduler", "num_train_timesteps": levels,
            "sigma_min": noise.sigma_min, "sigma_max": noise.sigma_max, "sigma_data": noise.sigma_data,
            "s_noise": 1.0, "rho": noise.rho, "clip_denoised": clip}


def _grid_levels(run) -> int:
    """CD's grid size N (the levels its ODE steps were trained between), else GRID_LEVELS."""
    n = run.config.get("objective", {}).get("num_levels")
    return n if isinstance(n, int) and n >= 2 else GRID_LEVELS


def export_diffusers(run, out: str | Path, *, levels: int | None = None, clip_denoised: bool = False) -> Path:
    """Write ``run`` (an image consistency model) as a ConsistencyModelPipeline folder."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    if not run.is_image:
        raise CmkitError("diffusers' ConsistencyModelPipeline generates images; this run was trained on vectors "
                         "(use cmkit export onnx)")
    if run.method not in CONSISTENCY_METHODS:
        raise CmkitError(f"export diffusers takes a consistency model with the boundary-condition "
                         f"parametrization ({', '.join(CONSISTENCY_METHODS)}); this is a {run.method} run")
    backbone = run.model.backbone
    if getattr(backbone, "combined", False) or getattr(backbone, "time_inputs", 1) != 1:
        raise CmkitError("this run's UNet takes a guidance scale or a second time input, which "
                         "ConsistencyModelPipeline cannot pass")
    if run.model.c_noise_name != "openai":
        raise CmkitError("the pipeline's scheduler feeds the UNet 250 ln(sigma) (model.c_noise=openai); "
                         f"this run uses c_noise={run.model.c_noise_name}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CmkitError(f"{out} already exists and is not empty")
    levels = levels or _grid_levels(run)
    scheduler = CMStochasticIterativeScheduler.from_config(_scheduler_config(run, levels, clip_denoised))
    pipe = ConsistencyModelPipeline(unet=backbone.unet, scheduler=scheduler)
    pipe.save_pretrained(str(out), safe_serialization=True)
    sidecar = {"method": run.method, "noise": run.config["noise"], "num_classes": run.num_classes,
               "class_names": run.class_names, "has_null_label": run.has_null_label,
               "source": str(run.path)}
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    return out


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


# ---------------------------------------------------------------------------------------------
# Import


class DiffusersUNet(nn.Module):
    """A loaded UNet2DModel behind cmkit's backbone interface F(x, c_noise, class_labels).
    ``null_label``: whether its label embedding has cmkit's extra null row (K + 1 rows)."""

    def __init__(self, unet, num_classes: int):
        super().__init__()
        self.unet, self.num_classes = unet, num_classes
        self.image_channels = unet.config.in_channels
        size = unet.config.sample_size
        self.resolution = size if isinstance(size, int) else size[0]

    def forward(self, x, c_noise, class_labels=None):
        labels = None
        if self.num_classes:
            if class_labels is None and self.unet.config.num_class_embeds == self.num_classes:
                raise ValueError("this model has no null label: pass class labels")
            labels = labels_or_null(class_labels, self.num_classes, x.shape[0], x.device)
        return self.unet(x, c_noise.to(x.dtype).expand(x.shape[0]), class_labels=labels).sample


class ClipDenoised(nn.Module):
    """f(x, sigma) clamped to [-1, 1], as the scheduler's ``clip_denoised`` does at every step."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def backbone(self):
        return self.model.backbone

    num_classes = property(lambda self: self.model.num_classes)
    noise = property(lambda self: self.model.noise)
    c_noise_name = property(lambda self: self.model.c_noise_name)

    def forward(self, x, sigma, class_labels=None):
        return self.model(x, sigma, class_labels).clamp(-1, 1)


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    try:
        return (path / "config.json").is_file() and read_json(path / "config.json").get("_class_name") == "UNet2DModel"
    except (CmkitError, AttributeError):
        return False


def _find_scheduler(path: Path) -> dict:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                      path.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            config = read_json(candidate, "scheduler config")
            if not isinstance(config, dict) or config.get("_class_name", "CMStochasticIterativeScheduler") != \
                    "CMStochasticIterativeScheduler":
                raise CmkitError(f"{candidate} is a {config.get('_class_name')!r} config; cmkit imports consistency "
                                 "models (CMStochasticIterativeScheduler)")
            return config
    from diffusers import CMStochasticIterativeScheduler
    return dict(CMStochasticIterativeScheduler().config)  # the pipeline's defaults, as diffusers would use


def load_diffusers(path: str | Path, device: str = "cpu") -> tuple[dict, nn.Module]:
    """(a cmkit run config, the consistency function f(x, sigma)) of a diffusers folder."""
    from diffusers import UNet2DModel

    path = Path(path)
    unet_dir = path / "unet" if (path / "model_index.json").is_file() else path
    if (path / "model_index.json").is_file():
        index = read_json(path / "model_index.json", "pipeline index")
        if not isinstance(index, dict) or index.get("_class_name") not in ("ConsistencyModelPipeline", None):
            raise CmkitError(f"{path} holds a {index.get('_class_name')!r}; cmkit imports ConsistencyModelPipeline "
                             "folders and UNet2DModel folders")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise CmkitError(f"{unet_dir} has no diffusion_pytorch_model.safetensors (cmkit never unpickles .bin "
                         "weights: convert them to safetensors first)")
    scheduler = _find_scheduler(path)
    try:
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CmkitError(f"cannot load the UNet in {unet_dir}: {str(e).splitlines()[0]}") from None
    sidecar = read_json(path / SIDECAR, "cmkit export record") if (path / SIDECAR).is_file() else {}
    embeds = unet.config.num_class_embeds or 0
    num_classes = sidecar.get("num_classes", embeds)
    noise = NoiseConfig(sigma_min=scheduler["sigma_min"], sigma_max=scheduler["sigma_max"],
                        sigma_data=scheduler["sigma_data"], rho=scheduler["rho"])
    backbone = DiffusersUNet(unet, num_classes)
    model: nn.Module = ConsistencyFunction(backbone, noise, c_noise="openai")
    if scheduler.get("clip_denoised", True):
        model = ClipDenoised(model)
    shape = [backbone.image_channels, backbone.resolution, backbone.resolution]
    config = {"method": sidecar.get("method", "cd"), "source": "diffusers", "noise": noise.__dict__.copy(),
              "model": {"backbone": "diffusers-unet", "num_classes": num_classes, "c_noise": "openai"},
              "standardizer": {"kind": "image", "shape": shape},
              "train": {"label_dropout": 0.1 if sidecar.get("has_null_label") else 0.0},
              "objective": {"num_levels": scheduler["num_train_timesteps"]},
              "class_names": sidecar.get("class_names"),
              "data": {**default_config("edm", images=True)["data"], "name": None, "resolution": shape[1]}}
    return config, model.to(device).eval().requires_grad_(False)
