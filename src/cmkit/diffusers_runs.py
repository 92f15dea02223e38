"""diffusers folders loaded as cmkit runs, by their scheduler:

- a discrete-time VP diffusion model (a ``DDPMPipeline``/``DDIMPipeline`` folder, or a
  ``UNet2DModel`` folder with a DDPM-family scheduler config beside it or in ``../scheduler/``):
  a teacher, its network in EDM's sigma by `cmkit.precond.VPDenoiser`;
- a consistency model: a ``ConsistencyModelPipeline`` (CMStochasticIterativeScheduler, which is
  cmkit's `ConsistencyFunction` with the ``openai`` c_noise), or a pipeline with an ``LCMScheduler``
  (what ``cmkit export diffusers`` writes for a student of a VP teacher: `VPConsistencyFunction`).

Weights are read as safetensors only: a folder with only pickled weights (.bin, .ckpt, .pt) is
refused with the command that converts it, never unpickled. Anything else that cmkit cannot
represent exactly (VE models, latent pipelines, unknown schedulers) is refused with one line.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .config import base_section
from .discrete_vp import VP_SCHEDULERS, prediction_type, table_config, time_input_for, sigma_table
from .errors import CmkitError
from .nets.diffusers_unet import DiffusersUNet, unet_config
from .noise import NoiseConfig
from .objectives import get_method, methods
from .objectives.registry import network_wrapper
from .precond import LCMFunction, build_wrapper
from .safe_io import read_json

LCM_GUIDANCE_RANGE = (1.0, 16.0)  # an LCM pipeline without cmkit's record: LCM's w in [0, 15], as scale w + 1
SIDECAR = "cmkit.json"  # what diffusers' configs cannot say: class names, the null label, cmkit's noise
WEIGHTS = "diffusion_pytorch_model.safetensors"
PIPELINES = ("ConsistencyModelPipeline", "DDPMPipeline", "DDIMPipeline", "PNDMPipeline")
TEXT_PIPELINES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
VE_SCHEDULERS = ("ScoreSdeVeScheduler", "KarrasVeScheduler")


def _teacher_method() -> str:
    """The method an imported diffusion model counts as: the registry's diffusion method."""
    return next(name for name, spec in methods().items() if spec.diffusion)


def _pipeline_method() -> str:
    """The method an imported consistency pipeline without cmkit's record counts as: the first whose
    runs are this kind of model (a boundary-condition consistency function a pipeline can carry)."""
    return next(name for name, spec in methods().items() if "diffusers" in spec.export_formats)


def _lcm_method() -> str:
    """The method an ``LCMScheduler`` folder without cmkit's record counts as: the one whose network
    is LCM's own form (`cmkit.precond.LCMFunction`), which that scheduler computes exactly."""
    return next(name for name, spec in methods().items() if spec.wrapper is LCMFunction)


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

    def forward(self, x, sigma, condition=None):
        return self.model(x, sigma, condition).clamp(-1, 1)


def is_diffusers_folder(path: str | Path) -> bool:
    path = Path(path)
    if (path / "model_index.json").is_file():
        return True
    try:
        return (path / "config.json").is_file() and read_json(path / "config.json").get("_class_name") == "UNet2DModel"
    except (CmkitError, AttributeError):
        return False


def _find_scheduler(path: Path) -> dict | None:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                      path.parent / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            config = read_json(candidate, "scheduler config")
            if not isinstance(config, dict):
                raise CmkitError(f"{candidate} is not a scheduler config (a JSON object)")
            return config
    return None


def _check_pipeline(path: Path) -> bool:
    """Whether ``path`` is a text-to-image latent pipeline cmkit imports (else a pixel one)."""
    index = read_json(path / "model_index.json", "pipeline index")
    name = index.get("_class_name") if isinstance(index, dict) else None
    if isinstance(index, dict) and ("text_encoder_2" in index or "XL" in str(name)):
        raise CmkitError(f"{path} holds an SDXL-style pipeline ({name}: two text encoders and added time ids); "
                         f"cmkit imports {', '.join(TEXT_PIPELINES)} folders")
    if isinstance(index, dict) and ("vae" in index or "text_encoder" in index):
        if name not in TEXT_PIPELINES:
            raise CmkitError(f"{path} holds a {name!r}; cmkit imports the latent pipelines {', '.join(TEXT_PIPELINES)}")
        return True
    if name not in PIPELINES:
        raise CmkitError(f"{path} holds a {name!r}; cmkit imports {', '.join(PIPELINES)} folders and UNet2DModel "
                         "folders")
    return False


def _check_weights(unet_dir: Path) -> None:
    if not (unet_dir / "config.json").is_file():
        raise CmkitError(f"{unet_dir} has no config.json: not a diffusers UNet2DModel folder")
    config = read_json(unet_dir / "config.json", "UNet config")
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name != "UNet2DModel":
        raise CmkitError(f"{unet_dir} holds a {name!r}; cmkit imports pixel-space UNet2DModels")
    if (unet_dir / WEIGHTS).is_file():
        return
    pickles = sorted(p.name for p in unet_dir.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise CmkitError(f"{unet_dir} has only pickled weights ({pickles[0]}); cmkit never unpickles them: convert "
                         f"once with UNet2DModel.from_pretrained('{unet_dir}').save_pretrained('{unet_dir}', "
                         "safe_serialization=True)")
    raise CmkitError(f"{unet_dir} has no {WEIGHTS}")


def _kind(scheduler: dict | None) -> str:
    """"consistency" (CMStochasticIterativeScheduler), "vp-student" (a VP consistency student, LCMScheduler) or "vp"."""
    name = "CMStochasticIterativeScheduler" if scheduler is None else scheduler.get("_class_name")
    if name == "CMStochasticIterativeScheduler":
        return "consistency"
    if name in VE_SCHEDULERS:
        raise CmkitError(f"{name} is a continuous-time VE model (score network); cmkit imports discrete-time VP "
                         "(DDPM-family) teachers and consistency pipelines")
    if name not in VP_SCHEDULERS:
        raise CmkitError(f"unknown scheduler {name!r}; cmkit imports CMStochasticIterativeScheduler and the "
                         "DDPM-family schedulers (DDPMScheduler, DDIMScheduler, ...)")
    return "vp-student" if name == "LCMScheduler" else "vp"


def load_diffusers(path: str | Path, device: str = "cpu") -> tuple[dict, nn.Module]:
    """(a cmkit run config, the model: a denoiser D(x, sigma) or consistency function f(x, sigma))
    of a diffusers folder."""
    from diffusers import UNet2DModel

    path = Path(path)
    pipeline = (path / "model_index.json").is_file()
    if pipeline and _check_pipeline(path):
        return _load_text_pipeline(path, device)
    unet_dir = path / "unet" if pipeline else path
    _check_weights(unet_dir)
    scheduler = _find_scheduler(path)
    if scheduler is None and pipeline and read_json(path / "model_index.json").get("_class_name") != \
            "ConsistencyModelPipeline":
        raise CmkitError(f"{path} has no scheduler/scheduler_config.json: its noise levels are unknown")
    kind = _kind(scheduler)
    sidecar = read_json(path / SIDECAR, "cmkit export record") if (path / SIDECAR).is_file() else {}
    try:
        vp = None if kind == "consistency" else _vp_section(scheduler, sidecar)
        unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True, low_cpu_mem_usage=False)
    except ValueError as e:
        raise CmkitError(f"{path}: {str(e).splitlines()[0]}") from None
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise CmkitError(f"cannot load the UNet in {unet_dir}: {str(e).splitlines()[0]}") from None
    if vp is not None:
        vp["time_input"] = time_input_for(dict(unet.config))
    num_classes = sidecar.get("num_classes", unet.config.num_class_embeds or 0)
    # cmkit's class-conditional UNets always have the null label's row; the record says whether
    # it was trained (label dropout), which is what guidance needs.
    null_label = True if sidecar.get("has_null_label") else None
    try:
        backbone = DiffusersUNet(unet, num_classes, null_label)
    except ValueError as e:
        raise CmkitError(f"{unet_dir}: {e}" + ("" if sidecar else f" (say so in {path / SIDECAR}: "
                                                                 '{"num_classes": K, "has_null_label": true})'))
    shape = [backbone.image_channels, backbone.resolution, backbone.resolution]
    model_section = {"backbone": "diffusers", "unet": unet_config(unet), "num_classes": num_classes,
                     "null_label": backbone.null_label, "image_channels": shape[0], "resolution": shape[1]}
    if kind == "consistency":
        scheduler = scheduler or _default_cm_scheduler()
        noise = NoiseConfig(sigma_min=scheduler["sigma_min"], sigma_max=scheduler["sigma_max"],
                            sigma_data=scheduler["sigma_data"], rho=scheduler["rho"])
        model_section["c_noise"] = "openai"
        method = sidecar.get("method", _pipeline_method())
    else:
        table = sigma_table(vp["table"])
        noise = NoiseConfig(**sidecar["noise"]) if "noise" in sidecar else NoiseConfig(
            sigma_min=float(table[0]), sigma_max=float(table[-1]))
        model_section.update(c_noise="timestep", vp=vp)
        method = _teacher_method() if kind == "vp" else sidecar.get("method", _lcm_method())
    config = {"method": method, "source": "diffusers", "noise": noise.__dict__.copy(), "model": model_section,
              "standardizer": {"kind": "image", "shape": shape},
              "train": {"label_dropout": 0.1 if sidecar.get("has_null_label", backbone.null_label) else 0.0},
              "objective": ({**sidecar.get("objective", {}), "num_levels": scheduler["num_train_timesteps"]}
                            if kind == "consistency" else {}),
              "class_names": sidecar.get("class_names"),
              "data": {**base_section("data"), "name": None, "resolution": shape[1]}}
    if sidecar.get("init_method"):
        config["init_method"] = sidecar["init_method"]
    model = build_wrapper(network_wrapper(config), backbone, noise, model_section)
    if kind == "consistency" and scheduler.get("clip_denoised", True):
        model = ClipDenoised(model)
    return config, model.to(device).eval().requires_grad_(False)


def _vp_section(scheduler: dict, sidecar: dict) -> dict:
    """A run config's ``model.vp`` for a VP network: its table, prediction type and time input."""
    vp = {"prediction_type": prediction_type(scheduler), "table": table_config(scheduler)}
    if scheduler.get("clip_sample") and scheduler.get("_class_name") == "LCMScheduler":
        raise ValueError("an LCMScheduler with clip_sample clamps x0 before the boundary scalings; cmkit's "
                         "students do not")
    if scheduler.get("_class_name") == "LCMScheduler":
        vp["timestep_scaling"] = float(scheduler.get("timestep_scaling", 10.0))
    return vp


def _default_cm_scheduler() -> dict:
    from diffusers import CMStochasticIterativeScheduler
    return dict(CMStochasticIterativeScheduler().config)  # the pipeline's defaults, as diffusers would use


def _load_text_pipeline(path: Path, device: str) -> tuple[dict, nn.Module]:
    """A ``StableDiffusionPipeline`` (a teacher) or ``LatentConsistencyModelPipeline`` (a student)
    folder: its UNet2DConditionModel in EDM's sigma over the latents of its VAE, prompts through its
    own tokenizer and text encoder (the empty prompt as the unconditional input)."""
    from diffusers import UNet2DConditionModel

    from .latents import LatentCodec, LatentScaler
    from .nets.diffusers_text_unet import DiffusersTextUNet, text_unet_config
    from .text import PromptEncoder, refuse_pickles

    unet_dir = path / "unet"
    config = read_json(unet_dir / "config.json", "UNet config") if (unet_dir / "config.json").is_file() else None
    if not isinstance(config, dict) or config.get("_class_name") != "UNet2DConditionModel":
        raise CmkitError(f"{unet_dir} holds no UNet2DConditionModel (config.json)")
    refuse_pickles(unet_dir, WEIGHTS)
    scheduler = _find_scheduler(path)
    if scheduler is None:
        raise CmkitError(f"{path} has no scheduler/scheduler_config.json: its noise levels are unknown")
    kind = _kind(scheduler)
    if kind == "consistency":
        raise CmkitError(f"{path}: a latent pipeline with a CMStochasticIterativeScheduler is not a cmkit import")
    sidecar = read_json(path / SIDECAR, "cmkit export record") if (path / SIDECAR).is_file() else {}
    codec = LatentCodec.from_folder(path / "vae", image_channels=sidecar.get("image_channels"))
    prompts = PromptEncoder.from_folder(path)
    try:
        vp = _vp_section(scheduler, sidecar)
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), use_safetensors=True, low_cpu_mem_usage=False)
    except ValueError as e:
        raise CmkitError(f"{path}: {str(e).splitlines()[0]}") from None
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise CmkitError(f"cannot load the UNet in {unet_dir}: {str(e).splitlines()[0]}") from None
    if unet.config.addition_embed_type is not None or unet.config.class_embed_type is not None:
        added = unet.config.addition_embed_type or unet.config.class_embed_type
        raise CmkitError(f"{unet_dir} takes added embeddings ({added}); cmkit imports prompt-only UNets")
    vp["time_input"] = time_input_for(dict(unet.config))
    guided = unet.config.time_cond_proj_dim is not None
    try:
        backbone = DiffusersTextUNet(unet, prompts.shape, guidance=guided)
    except ValueError as e:
        raise CmkitError(f"{path}: {e}") from None
    backbone.null_text.copy_(prompts.null())
    latent_shape = (backbone.image_channels, backbone.resolution, backbone.resolution)
    image_shape = codec.image_shape(latent_shape)
    model_section = {"backbone": "diffusers-text", "unet": text_unet_config(unet), "text_shape": list(prompts.shape),
                     "guidance": guided, "num_classes": 0, "image_channels": latent_shape[0],
                     "resolution": latent_shape[1], "c_noise": "timestep", "vp": vp}
    table = sigma_table(vp["table"])
    noise = NoiseConfig(**sidecar["noise"]) if "noise" in sidecar else NoiseConfig(
        sigma_min=float(table[0]), sigma_max=float(table[-1]))
    method = _teacher_method() if kind == "vp" else sidecar.get("method", _lcm_method())
    objective = {"guidance": sidecar.get("guidance", list(LCM_GUIDANCE_RANGE))} if guided else {}
    config = {"method": method, "source": "diffusers", "noise": noise.__dict__.copy(), "model": model_section,
              "standardizer": LatentScaler.state_for(codec, latent_shape, image_shape),
              "train": {"label_dropout": 0.1},  # Stable Diffusion dropped 10% of captions: the empty prompt means something
              "objective": objective, "class_names": None,
              "data": {**base_section("data"), "name": None, "resolution": image_shape[1]}}
    model = build_wrapper(get_method(method).wrapper, backbone, noise, model_section)
    model = model.to(device).eval().requires_grad_(False)
    # Not submodules: the run's decoder and prompt encoder (`cmkit.run.Run`), not weights of the model.
    model.components = {"codec": codec.to(device), "prompts": prompts.to(device)}
    return config, model
