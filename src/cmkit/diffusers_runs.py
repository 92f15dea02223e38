"""diffusers folders loaded as cmkit runs: a ``ConsistencyModelPipeline`` folder (what
``cmkit export diffusers`` writes) or a bare ``UNet2DModel`` folder with a scheduler config (the
layout of OpenAI's converted CD/CT checkpoints).

diffusers' CMStochasticIterativeScheduler scales the input by 1 / sqrt(sigma^2 + sigma_data^2),
feeds the UNet 250 ln(sigma) and combines with the boundary-condition c_skip and c_out, which is
cmkit's `ConsistencyFunction` with the ``openai`` c_noise. Weights are read as safetensors only: a
folder with only .bin (pickle) weights is refused rather than unpickled.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import base_section
from .errors import CmkitError
from .nets.conditioning import labels_or_null
from .noise import NoiseConfig
from .objectives import methods
from .precond import ConsistencyFunction
from .safe_io import read_json

SIDECAR = "cmkit.json"  # what diffusers' configs cannot say: class names, the null label, cmkit's noise


def _pipeline_method() -> str:
    """The method an imported pipeline without cmkit's record counts as: the first whose runs are
    this kind of model (a boundary-condition consistency function a pipeline can carry)."""
    return next(name for name, spec in methods().items() if "diffusers" in spec.export_formats)


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
    config = {"method": sidecar.get("method", _pipeline_method()), "source": "diffusers", "noise": noise.__dict__.copy(),
              "model": {"backbone": "diffusers-unet", "num_classes": num_classes, "c_noise": "openai"},
              "standardizer": {"kind": "image", "shape": shape},
              "train": {"label_dropout": 0.1 if sidecar.get("has_null_label") else 0.0},
              "objective": {"num_levels": scheduler["num_train_timesteps"]},
              "class_names": sidecar.get("class_names"),
              "data": {**base_section("data"), "name": None, "resolution": shape[1]}}
    return config, model.to(device).eval().requires_grad_(False)
