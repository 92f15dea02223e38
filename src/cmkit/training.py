"""One training loop for every objective.

    run_dir = cmkit.train(config, "runs/teacher")

Every random draw of a step comes from generators seeded by (seed, step): batches and noise from
one shared by all processes and micro-batches (each keeps its rows of the global batch, see
batch_rng.py), dropout from one per micro-batch. So a resumed run continues bit for bit on CPU,
and 1 or N processes (torchrun) with the same global batch train the same model to float
rounding. The optimizer, EMA and target network are in every checkpoint.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from . import checkpoint, discrete_vp
from .batch_rng import BatchRNG, step_seed
from .compiled_step import compile_loss, use_run_cache
from .condition import Condition
from .config import base_section, check_config, default_config
from .distributed import World, sum_gradients, close, world_from_env
from .devices import resolve_device
from .data import ImageData, ImageScaler, LatentData, Standardizer, is_builtin, is_image_source, load_dataset, random_hflip
from .data.latent_cache import copy_components, latent_scaler
from .data.loader import PlannedBatches, default_workers
from .data.row_shards import ShardedRows
from .data.streams import StreamedImages
from .errors import CmkitError, Stopped, warn
from .latents import LatentCodec
from .safe_io import file_sha256
from .guidance import GuidanceInput, default_guidance
from .nets import load_backbone_weights
from .nets.diffusers_text_unet import save_lora
from .objectives import MethodSpec, get_method, methods
from .plotting import save_image_grid
from .text import PromptEncoder
from .run import Run, build_model, default_levels, generate, noise_config
from .precond import VPDenoiser

IMAGE_BACKBONES = ("unet", "diffusers", "diffusers-text")  # cmkit's UNet presets, or a diffusers teacher's own UNet2DModel
GRID_SAMPLES = 64  # images in each progress grid (8 x 8)
VOLATILE_METRICS = ("images_per_s", "max_memory_mb")  # measured, so no two runs share them
GRID_SEED = 0  # the same noise every time, so grids show the model changing, not the noise


def _diffusion_names() -> str:
    return " or ".join(name for name, spec in methods().items() if spec.diffusion)


def _source_run(config: dict, key: str, flag: str) -> Run:
    """A teacher (``key`` = "teacher") or an initialisation (``key`` = "init"): a diffusion run whose
    noise range, standardisation and architecture the new run inherits."""
    path = config[key]
    source = Run(path)
    if not source.spec.diffusion:
        role = "teacher" if key == "teacher" else "run to start from"
        raise CmkitError(f"{flag} {path} is {source.description}; {config['method']} needs an "
                         f"{_diffusion_names()} {role}")
    return source


def _inherit(config: dict, key: str, flag: str, source: Run, check: bool) -> dict:
    """``config`` with the source run's absolute path and its noise, model and standardizer
    sections (``check``: they must equal the ones ``config`` already has, as on a resume)."""
    out = copy.deepcopy(config)
    out[key] = str(Path(config[key]).resolve())
    whole_table = get_method(config["method"]).whole_table
    inherited = {**source.config, "noise": source.config["noise"] if whole_table else _student_noise(source.config)}
    for section in ("noise", "model", "standardizer"):
        if check and _comparable(out[section]) != _comparable(inherited[section]):
            raise CmkitError(f"{flag} {config[key]} differs from this run in its {section} (a run that changed "
                             "since this one started, or --init and --teacher runs that do not match)")
        out[section] = copy.deepcopy(inherited[section])
    out["model"].setdefault("num_classes", 0)  # a run from before class conditioning is unconditional
    return out


def _student_noise(source: dict) -> dict:
    """The noise range a run started from ``source`` trains in: the source's, except that a VP
    network's (a diffusers DDPM) stops at `discrete_vp.STUDENT_SIGMA_MAX`."""
    noise = dict(source["noise"])
    if "vp" in source["model"]:
        noise["sigma_max"] = min(noise["sigma_max"], discrete_vp.STUDENT_SIGMA_MAX)
    return noise


def _check_vp_network(config: dict, spec: MethodSpec) -> None:
    """A method whose network is a VP one only (LCM's) needs a discrete-time teacher."""
    if issubclass(spec.wrapper, VPDenoiser) and "vp" not in config["model"]:
        raise CmkitError(f"{spec.name} distils a discrete-time teacher (a diffusers DDPM-family folder: its grid is "
                         "the scheduler's timesteps); distil a cmkit edm teacher with cd")


def _check_time_input(config: dict, spec: MethodSpec, quiet: bool) -> None:
    """sCT/sCD differentiate the network along t. OpenAI's c_noise = 250 ln(sigma) moves the UNet's
    time embedding so fast near both ends of the noise range that the derivative explodes and
    training fails (digits: FD 429 against 25 from the same teacher with EDM's c_noise)."""
    model = config["model"]
    if spec.time_derivative and model.get("vp", {}).get("time_input") == "nearest":
        raise CmkitError(f"{spec.name} differentiates the network along the noise level, and this UNet's time "
                         "embedding is a learned table of integer timesteps (no derivative); use cd or ect")
    if spec.time_derivative and model.get("backbone") == "unet" and model.get("c_noise") == "openai" and not quiet:
        print(f"cmkit: warning: this run's time input is OpenAI's c_noise = 250 ln(sigma), which {spec.name} cannot "
              "differentiate stably; train the teacher with --set model.c_noise=edm (docs/images.md)",
              file=sys.stderr)


def _comparable(section: dict) -> dict:
    """A config section as a resumed run compares it with its source: less a guided student's
    guidance input (which its teacher lacks), with runs from before class conditioning unconditional."""
    section = {k: v for k, v in section.items() if k not in ("guidance", "lora")}
    if "backbone" in section:
        section.setdefault("num_classes", 0)
    return section


def _resolve_sources(config: dict, spec: MethodSpec, resumed: bool) -> tuple[dict, Run | None, Run | None]:
    """(config with the sources' sections, teacher, the run whose weights the network starts from).
    A method that takes a teacher starts from it unless --init says otherwise (CD: unless
    objective.init_from_teacher is false)."""
    teacher = init = None
    if spec.frozen_init:
        return _resolve_stage1(config, spec, resumed)
    if spec.teacher:
        teacher = _source_run(config, "teacher", "--teacher")
        config = _inherit(config, "teacher", "--teacher", teacher, check=resumed)
    if spec.init and config.get("init"):
        init = _source_run(config, "init", "--init")
        config = _inherit(config, "init", "--init", init, check=resumed or teacher is not None)
    elif teacher is not None and spec.starts_from_teacher and config["objective"].get("init_from_teacher", True):
        init = teacher
    return config, teacher, init


def _resolve_stage1(config: dict, spec: MethodSpec, resumed: bool) -> tuple[dict, Run, Run]:
    """A method that continues a consistency run (`MethodSpec.frozen_init`, TCM): the --init run
    is both where the network starts and the frozen model handed to the objective; its method is
    recorded (``init_method``), as it decides the network's parametrization."""
    if not config.get("init"):
        raise CmkitError(f"{spec.name} continues a consistency model: pass --init RUN (a trained "
                         f"{_consistency_names()} run)")
    path = config["init"]
    stage1 = Run(path)
    if not _continuable(stage1.spec):
        raise CmkitError(f"--init {path} is {stage1.description}; {spec.name} continues a consistency model "
                         f"({_consistency_names()})")
    if stage1.config["model"].get("guidance"):
        raise CmkitError(f"--init {path} is a guided student (it takes a guidance scale); {spec.name} continues "
                         "unguided consistency models")
    if resumed and not config.get("init_method"):
        raise CmkitError("the run's config.json does not say what its --init run was (init_method): it is incomplete")
    if resumed and config["init_method"] != stage1.method:
        raise CmkitError(f"--init {path} is now {stage1.description}, not the run this one started from "
                         f"(init_method {config['init_method']})")
    config = _inherit(config, "init", "--init", stage1, check=resumed)
    config["init_method"] = stage1.method
    return config, stage1, stage1


def _continuable(spec: MethodSpec) -> bool:
    """A consistency model another run can continue: not a diffusion teacher, not itself a
    continuation, not an LCM's VP-only network (its own timestep schedule and guidance input)."""
    return not (spec.diffusion or spec.frozen_init or issubclass(spec.wrapper, VPDenoiser))


def _consistency_names() -> str:
    return ", ".join(name for name, spec in methods().items() if _continuable(spec))


def preview_config(config: dict) -> tuple[dict, str | None]:
    """(the config a new run starts from, a note) for --print-config: with the --teacher's and
    --init run's sections as training takes them; a method whose teacher is not given yet shows a
    default EDM teacher's noise and model for this data, and the note says so."""
    spec = get_method(config["method"])
    if spec.frozen_init and not config.get("init"):
        return copy.deepcopy(config), (f"noise and model: a {spec.name} run takes them from its --init run, "
                                       "the consistency model it continues")
    if not (spec.teacher and not config.get("teacher")):
        return _resolve_sources(copy.deepcopy(config), spec, resumed=False)[0], None
    edm = next(name for name, other in methods().items() if other.diffusion)
    teacher = default_config(edm, images=is_image_source(config["data"]["name"]))
    shown = {}
    for key, value in config.items():
        shown[key] = value
        if key == "data":
            shown["noise"], shown["model"] = teacher["noise"], teacher["model"]
    return shown, (f"noise and model: a default {edm} teacher's for {config['data']['name']}; this {spec.name} run "
                   "takes them from its --teacher (a --config file leaves them out)")


def _resolve_classes(config: dict, data, teacher: Run | None) -> dict:
    """``config`` with the run's number of classes K (0: unconditional) fixed, after checking the
    labels, the label dropout and guided distillation against it. K comes from the teacher or
    --init run when there is one, else from ``model.num_classes`` (null: the data's labels, if any)."""
    config = copy.deepcopy(config)
    model, train, obj = config["model"], config["train"], config["objective"]
    labels_k = data.num_classes
    K = model.get("num_classes")
    if K is None:
        K = labels_k or 0
    if not isinstance(K, int) or K < 0:
        raise CmkitError(f"model.num_classes must be a non-negative integer (0: unconditional), got {K!r}")
    if K and labels_k is None:
        raise CmkitError(f"the model is class-conditional ({K} classes) but {data.name} has no labels")
    if K and labels_k > K:
        raise CmkitError(f"{data.name} has labels up to {labels_k - 1}, but the model has only {K} classes")
    model["num_classes"] = K
    p = train.get("label_dropout", 0.0)
    if not 0 <= p < 1:
        raise CmkitError(f"--label-dropout must be in [0, 1), got {p}")
    text = "text_shape" in model
    if p and not K and not text:
        raise CmkitError("--label-dropout needs class labels or captions, and this run is unconditional")
    if K:
        names = data.class_names or []
        config.setdefault("class_names", list(names[:K]) + [str(i) for i in range(len(names), K)])
    if obj.get("guidance") is None and obj.get("prompt_guidance") is not None and text \
            and teacher.config["train"].get("label_dropout", 0.0):
        obj["guidance"] = list(obj["prompt_guidance"])  # the reference scripts' range: they always guide
    if obj.get("guidance") is not None:
        if not K and not text:
            raise CmkitError("guided distillation (--guidance) needs a class- or text-conditional teacher and "
                             "labelled or captioned data")
        if not teacher.config["train"].get("label_dropout", 0.0):
            raise CmkitError(f"--guidance needs a teacher trained with --label-dropout > 0; {config['teacher']} was not")
        # The student takes the scale as an input, unless its method gives it none (LCM-LoRA's).
        model["guidance"] = getattr(get_method(config["method"]).objective, "student_sees_guidance", True)
    return config


def _say_how_guided(config: dict) -> None:
    """At the start of a distillation from a text teacher: whether the student takes a guidance scale."""
    obj = config["objective"]
    if "prompt_guidance" not in obj or "text_shape" not in config["model"]:
        return
    method, scales = config["method"], obj["guidance"]
    if scales is None:
        print(f"cmkit: note: this {method} student is unguided: it will take no guidance scale (--guidance LO,HI "
              "distils the teacher's classifier-free guidance)", file=sys.stderr)
    elif not config["model"]["guidance"]:
        print(f"cmkit: note: distilling the teacher guided at scales in [{scales[0]:g}, {scales[1]:g}]; this "
              f"{method} student takes no guidance scale (its weights carry the guidance)", file=sys.stderr)
    else:
        print(f"cmkit: note: distilling the teacher guided at scales in [{scales[0]:g}, {scales[1]:g}]; the student "
              "takes the scale as an input (sample it with --guidance W; --guidance none trains an unguided "
              "student)", file=sys.stderr)


class Sources(NamedTuple):
    """What a run starts from besides its config: the loaded data, the teacher and the run whose
    weights it starts from (either may be None)."""

    data: object
    teacher: Run | None
    init: Run | None


def resolve_run_config(config: dict, *, resumed: bool = False, quiet: bool = False) -> tuple[dict, Sources]:
    """(the complete config a run trains with, its sources). Every derived value is filled in here,
    once, before training: the teacher's and --init run's sections and absolute paths, the data's
    absolute path, classes and units (the standardizer), the model's input shape, and the method's
    own (`MethodSpec.resolve`: a curriculum's horizon, sCM's tangent warm-up). ``config`` is left as
    it was. ``resumed``: the config is a run's saved one (its derived values must still hold)."""
    check_config(config)
    spec = get_method(config["method"])
    config, teacher, init = _resolve_sources(copy.deepcopy(config), spec, resumed)
    if resumed and "standardizer" not in config:
        raise CmkitError("the run's config.json has no standardizer: it is incomplete")
    d = config["data"]
    data = load_dataset(d)
    images, latent = isinstance(data, ImageData), isinstance(data, LatentData)
    shape = data.shape if images or latent else (data.dim,)
    for source, what in ((teacher, "teacher"), (init, "--init run")):
        if source is not None and source.is_latent and images:
            raise CmkitError(_encode_first(d["name"], source, what))
        if source is not None and source.shape != shape:
            raise CmkitError(f"data has shape {shape} but the {what} was trained on {source.shape}")
    if d["hflip"] and not images:
        raise CmkitError("data.hflip applies to images only")
    if not is_builtin(d["name"]):
        d["name"] = str(Path(d["name"]).resolve())  # so eval finds it from any directory
    config = _resolve_classes(config, data, teacher)
    if not resumed and not quiet:
        _say_how_guided(config)
    if not resumed:
        _check_vp_network(config, spec)
        _check_time_input(config, spec, quiet)
    if latent:
        _check_latent_sources(config, data, teacher or init)
    if images or latent:
        _check_fingerprint(config, data, resumed)
        if config["model"]["backbone"] not in IMAGE_BACKBONES:
            raise CmkitError(f"image data needs the unet backbone, not {config['model']['backbone']!r}")
        config.setdefault("standardizer", data.scaler_state() if latent else ImageScaler(shape).state())
        config["model"].update(image_channels=shape[0], resolution=shape[1])
    else:
        if "standardizer" not in config:
            config["standardizer"] = Standardizer.fit(data.train, config["noise"]["sigma_data"]).state()
        config["model"]["dim"] = data.dim
    config = spec.resolve(config)
    return config, Sources(data, teacher, init)


def _encode_first(data_name: str, source: Run, what: str) -> str:
    """The refusal of images given to a latent teacher, with the line that encodes them for it."""
    out = f"runs/{Path(str(data_name).rstrip('/')).name or 'data'}-latents"
    side = source.image_shape[-1]
    encode = (f"cmkit data encode {shlex.quote(str(data_name))} --pipeline {shlex.quote(str(source.path))} "
              f"--resolution {side} --out {out}")
    return (f"the {what} {source.path} is a latent model: it trains on its VAE's latents, not on images; encode the "
            f"images once ({encode}), then train with --data {out}")


def _check_latent_sources(config: dict, data: LatentData, source: Run | None) -> None:
    """A latent data set against the run it trains from: the same VAE (and text encoder), captions
    exactly when the model takes prompts."""
    text = "text_shape" in config["model"]
    if text and data.captions is None:
        raise CmkitError(f"the model takes prompts, but {data.name} was encoded without captions (cmkit data encode "
                         "--pipeline with a captioned source, or --caption-template)")
    if not text and data.captions is not None and config["model"]["backbone"] != "diffusers-text":
        warn(f"{data.name} has captions, but this model takes no prompts: it trains unconditionally on them")
    if source is None:
        return
    if not source.is_latent:
        raise CmkitError(f"{data.name} holds latents, but {source.path} is a pixel-space model")
    if LatentCodec.fingerprint(source.path / "vae") != data.meta["vae_sha256"]:
        raise CmkitError(f"{data.name} was encoded by another VAE than {source.path}'s: encode the images with its "
                         f"(cmkit data encode IMAGES --pipeline {source.path})")
    if text and file_sha256(source.path / "text_encoder" / "model.safetensors") != data.meta["text_encoder_sha256"]:
        raise CmkitError(f"{data.name}'s captions were encoded by another text encoder than {source.path}'s")


def _check_fingerprint(config: dict, data: ImageData | LatentData, resumed: bool) -> None:
    """Record the source's fingerprint in ``config``; a resumed run's must still match."""
    now = data.fingerprint()
    if now is None:
        return
    before = config.get("data_fingerprint")
    if resumed and before is not None and before != now:
        raise CmkitError(f"{data.name} changed since this run started ({before.get('images')} images then, "
                         f"{now.get('images')} now, or other held-out images or latents): its held-out split would "
                         "leak into training; restore the data or start a new run")
    config["data_fingerprint"] = now


def build_optimizer(params, train_cfg: dict) -> torch.optim.Optimizer:
    optimizers = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if train_cfg["optimizer"] not in optimizers:
        raise CmkitError(f"unknown optimizer {train_cfg['optimizer']!r}; known: {', '.join(optimizers)}")
    extra = {}
    if train_cfg["fused_optimizer"]:
        if train_cfg["optimizer"] == "radam":
            raise CmkitError("train.fused_optimizer needs adam or adamw (torch has no fused RAdam)")
        extra["fused"] = True
    return optimizers[train_cfg["optimizer"]](params, lr=train_cfg["lr"], betas=tuple(train_cfg["betas"]),
                                              weight_decay=train_cfg["weight_decay"], **extra)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * online (rate 0 copies), in a few multi-tensor kernels on
    a GPU instead of two per tensor (the same arithmetic as ``lerp_``)."""
    torch._foreach_lerp_(list(ema.parameters()), list(online.parameters()), 1 - rate)
    buffers = list(ema.buffers())
    if buffers:
        torch._foreach_copy_(buffers, list(online.buffers()))


def _checkpoint_gradients(net: torch.nn.Module) -> None:
    """Recompute a UNet's block activations in the backward pass instead of keeping them
    (``train.gradient_checkpointing``; every image backbone is a diffusers UNet): less memory for
    about a third more compute."""
    unet = getattr(net.backbone, "unet", None)
    if unet is None or not getattr(unet, "_supports_gradient_checkpointing", False):
        raise CmkitError("train.gradient_checkpointing applies to image runs (a UNet); this network keeps its "
                         "activations")
    unet.enable_gradient_checkpointing()


def share_frozen(copy_: torch.nn.Module, source: torch.nn.Module) -> None:
    """Make ``copy_``'s parameters that are frozen in ``source`` the very tensors of ``source``:
    an EMA of constant weights is those weights, and a LoRA run then holds its base once."""
    for (name, mine), (_, theirs) in zip(copy_.named_parameters(), source.named_parameters()):
        if not theirs.requires_grad:
            module_name, _, leaf = name.rpartition(".")
            copy_.get_submodule(module_name)._parameters[leaf] = theirs


def ema_rate(rate: float, step: int) -> float:
    """The sampling EMA's rate, warmed up as min(rate, (1 + step) / (10 + step)) so that early
    random weights do not linger in short runs (the warm-up k-diffusion and EDM use too)."""
    return min(rate, (1 + step) / (10 + step))


def _check_machine(config: dict, world: World) -> None:
    """What a config needs of this machine and process count."""
    train = config["train"]
    shards = world.size * train["grad_accum"]
    if train["batch_size"] % shards:
        raise CmkitError(f"train.batch_size {train['batch_size']} must divide evenly over {world.size} process(es) "
                         f"x {train['grad_accum']} accumulated micro-batch(es)")
    if train["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise CmkitError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    resolve_device(train["device"], "train.device")


class Trainer:
    """Everything one run trains with: data, model, EMA, target, objective, optimizer and RNGs.

    ``step()`` performs one optimisation step; ``save()``/``restore()`` round-trip everything
    that a bit-exact resume needs."""

    def __init__(self, config: dict, world: World = World(), *, resumed: bool = False):
        """``config``: a built config (`build_config`), or with ``resumed`` a run's saved one; it is
        not changed. ``self.config`` is the complete config the run trains with."""
        self.world = world
        self.config, sources = resolve_run_config(config, resumed=resumed, quiet=not world.is_main)
        _check_machine(self.config, world)
        self.spec = get_method(self.config["method"])
        self.images = isinstance(sources.data, ImageData)
        self.latent = isinstance(sources.data, LatentData)
        self.num_classes = self.config["model"]["num_classes"]
        name = self.config["data"]["name"]
        self.protected = [p for p in (self.config.get("teacher"), None if is_builtin(name) else name) if p]
        try:
            self._build(self.config, sources)
        except (ValueError, TypeError, KeyError) as e:
            raise CmkitError(f"invalid config: {e}") from None

    def _build(self, config: dict, sources: Sources) -> None:
        self.train_cfg = train_cfg = config["train"]
        self.device = self.world.device(train_cfg["device"])
        teacher, data = sources.teacher, sources.data

        torch.manual_seed(train_cfg["seed"])  # initialisation: the same on every rank
        self.generator = torch.Generator()  # batches and noise, reseeded every step
        self.net = build_model(config)
        if train_cfg.get("gradient_checkpointing"):
            _checkpoint_gradients(self.net)
        # After the seed: an objective may own weights (sCM's adaptive weighting). A method whose
        # teacher is a view of the student's network (LCM-LoRA's base UNet) keeps one copy of it.
        if teacher is not None and self.spec.teacher_view is not None:
            teacher_model = self.spec.teacher_view(self.net, config)
        else:
            teacher_model = None if teacher is None else teacher.model.to(self.device)
        self.objective = self.spec.build(config, teacher_model)
        init = sources.init
        if init is not None:
            load_backbone_weights(self.net.backbone, init.model.backbone)
        self.net.to(self.device).train()
        self.extra_modules = {name: m.to(self.device) for name, m in self.objective.modules.items()}
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        share_frozen(self.ema, self.net)  # frozen weights (a LoRA run's base) are their own average
        self.target = copy.deepcopy(self.net).requires_grad_(False) if self.objective.needs_target else None
        self.memory_format = (torch.channels_last if train_cfg["channels_last"] and (self.images or self.latent)
                              else torch.contiguous_format)
        self.net.to(memory_format=self.memory_format)
        params = [p for m in (self.net, *self.extra_modules.values()) for p in m.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, train_cfg)
        # Vectors are standardised once; images stay uint8 (on the device) until a batch is drawn.
        # A streamed set (StreamedImages) stays on disk: batches come decoded from a PlannedBatches.
        self.streamed = isinstance(data.train, (StreamedImages, ShardedRows))
        self.loader, self.bad_images, self.images_read = None, 0, 0
        self.x_train = (data.train if self.streamed else data.train.to(self.device) if self.images or self.latent
                        else Standardizer.from_state(config["standardizer"]).to_model(data.train))
        # Prompts: a caption index per latent and one embedding per distinct caption (and the empty one).
        # Without cached embeddings, each batch's captions go through the frozen text encoder.
        self.text_ids = self.text_table = self.null_text = self.prompts = self.grid_decoder = None
        if "text_shape" in config["model"]:
            self.text_ids, self.null_text = data.train_text_ids.to(self.device), data.null_text.to(self.device)
            self.captions = data.captions
            if data.text_table is not None:
                self.text_table = data.text_table.to(self.device)
            else:
                self.prompts = PromptEncoder.from_folder(data.name).to(self.device)
        self.y_train = data.train_labels.to(self.device) if self.num_classes else None
        # Kinds of condition other than the class label that the data carries, one row per sample.
        self.c_train = Condition(getattr(data, "train_conditions", None)).to(self.device)
        self.device_type = torch.device(self.device).type
        # The loss of a step, compiled whole (compiled_step.py); the weights, the EMA and the
        # target keep their plain module names.
        self.loss_fn = compile_loss(self._loss, train_cfg["compile_mode"]) if train_cfg["compile"] else self._loss
        self.skipped_steps = 0  # steps skipped for a NaN/inf loss or gradient, over the whole run
        self.bad_in_row = 0
        self.stop_signal = None  # set by SIGTERM/SIGINT; the run stops, saved, after the step in progress
        self.stopping = False  # a stop every rank agreed on
        self._sync_weights()

    def runtime(self) -> dict:
        """Where and how this session trains (config.json's ``runtime``; a resumed run may differ)."""
        return {"device": self.device, "processes": self.world.size,
                "precision": "bf16" if self.train_cfg["bf16"] else "fp32",
                "compile": self.train_cfg["compile_mode"] if self.train_cfg["compile"] else False,
                "torch": torch.__version__}

    def describe(self) -> str:
        runtime = self.runtime()
        processes = "1 process" if runtime["processes"] == 1 else f"{runtime['processes']} processes"
        compile_note = runtime["compile"] or "off"
        if runtime["compile"] and self.spec.time_derivative and self.config["objective"].get("jvp") == "autograd":
            compile_note += " (the JVP pass eager: torch.func.jvp does not compile)"
        return (f"{runtime['device']} ({processes}), {runtime['precision']}, "
                f"compile {compile_note}, torch {runtime['torch']}")

    @property
    def modules(self) -> dict:
        modules = {"model": self.net, "ema": self.ema, **self.extra_modules}
        if self.target is not None:
            modules["target"] = self.target
        return modules

    def _sync_weights(self) -> None:
        """Start every rank from rank 0's weights (the same seed builds the same ones; this makes it certain)."""
        self.world.broadcast_([t for m in self.modules.values() for t in (*m.parameters(), *m.buffers())])

    def _seed_dropout(self, seed: int) -> None:
        """Seed the global RNG that dropout draws from, on the training device only (torch.manual_seed
        would also seed every CUDA device: 75 us, a tenth of a small network's step)."""
        if self.device.startswith("cuda"):
            torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)

    def _batch_rng(self, step: int, micro_batch: int, generator: torch.Generator) -> BatchRNG:
        """The draws of micro-batch ``micro_batch`` (its place in the global batch) at ``step``."""
        total = self.train_cfg["batch_size"]
        micro = total // (self.world.size * self.train_cfg["grad_accum"])
        return BatchRNG(generator.manual_seed(step_seed(self.train_cfg["seed"], step)), start=micro_batch * micro,
                        total=total)

    def _planned_rows(self, step: int):
        """This process's training rows at ``step``, one tensor per micro-batch: the first draw of
        each micro-batch's generator, as `_draw` makes it (the streamed loader decodes ahead)."""
        accum = self.train_cfg["grad_accum"]
        micro = self.train_cfg["batch_size"] // (self.world.size * accum)
        for a in range(accum):
            yield self._batch_rng(step, self.world.rank * accum + a, torch.Generator()).randint(len(self.x_train), micro)

    def _streamed_batch(self, step: int, rows: torch.Tensor) -> torch.Tensor:
        if self.loader is None or self.loader.next_step != step:  # the first step, or steps out of order
            self.close()
            workers = self.config["data"]["workers"]
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's processes on this machine
            self.loader = PlannedBatches(self.x_train, self._planned_rows, step, self.train_cfg["steps"],
                                         per_step=self.train_cfg["grad_accum"],
                                         workers=default_workers(local) if workers is None else workers,
                                         pin_memory=self.device.startswith("cuda"))
        batch, bad = self.loader.take(rows)
        self.bad_images += bad
        self.images_read += len(rows)
        limit = self.config["data"]["max_bad_fraction"]
        if self.images_read >= 1000 and self.bad_images > limit * self.images_read:
            raise CmkitError(f"{self.bad_images} of {self.images_read} images read did not decode (more than "
                             f"data.max_bad_fraction = {limit}); cmkit data check {self.config['data']['name']} "
                             "lists them")
        return batch

    def close(self) -> None:
        """Stop the streamed loader's worker processes (a later step starts new ones)."""
        if self.loader is not None:
            self.loader.close()
            self.loader = None

    def _draw(self, rng: BatchRNG, size: int, step: int = 0) -> tuple[torch.Tensor, Condition]:
        """This shard's ``size`` training samples (in model units) and their condition."""
        train_cfg = self.train_cfg
        index = rng.randint(len(self.x_train), size)
        batch = (self._streamed_batch(step, index).to(self.device, non_blocking=True) if self.streamed
                 else self.x_train[index.to(self.device)])
        index = index.to(self.device)
        if self.images:
            if self.config["data"]["hflip"]:
                batch = random_hflip(batch, rng)
            batch = ImageScaler.to_model(batch).contiguous(memory_format=self.memory_format)
        labels = text = None
        if self.y_train is not None:
            labels = self.y_train[index]
            if train_cfg.get("label_dropout"):  # classifier-free guidance training: some labels become null
                drop = (rng.rand(size) < train_cfg["label_dropout"]).to(self.device)
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        if self.text_ids is not None:
            text = self._embed(self.text_ids[index])
            if train_cfg.get("label_dropout"):  # caption dropout: some prompts become the empty one
                drop = (rng.rand(size) < train_cfg["label_dropout"]).to(self.device)
                text = torch.where(drop[:, None, None], self.null_text, text)
        return batch.to(self.device), self.c_train.select(index).replace(labels=labels, text=text)

    def _embed(self, caption_ids: torch.Tensor) -> torch.Tensor:
        """The embeddings of captions ``caption_ids``: cached rows, or the text encoder's output."""
        if self.text_table is not None:
            return self.text_table[caption_ids.to(self.device)]
        return self.prompts([self.captions[i] for i in caption_ids.tolist()], warn_truncated=False)

    def step(self, step: int) -> dict:
        """One optimisation step on the global batch: this rank's micro-batches, gradients averaged
        over the ranks, then one update (skipped everywhere if any rank saw a NaN/inf)."""
        train_cfg, world = self.train_cfg, self.world
        accum, total = train_cfg["grad_accum"], train_cfg["batch_size"]
        micro = total // (world.size * accum)
        params = self.optimizer.param_groups[0]["params"]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, bad, extra = torch.zeros(()), 0.0, {}
        for a in range(accum):
            m = world.rank * accum + a  # this micro-batch's place in the global batch
            rng = self._batch_rng(step, m, self.generator)
            self._seed_dropout(step_seed(train_cfg["seed"], step, 1 + m))
            batch, condition = self._draw(rng, micro, step)
            draws = self.objective.draw(batch, step=step, generator=rng, condition=condition)
            loss, logs = self.loss_fn(batch, condition, draws)
            loss = loss / (accum * world.size)
            extra = {**self.objective.step_logs(step), **{k: float(v) for k, v in logs.items()}}
            if torch.isfinite(loss):
                loss.backward()
            else:
                bad = 1.0
            loss_sum += loss.detach().cpu()
        flags = sum_gradients(world, params, torch.stack([loss_sum, torch.tensor(bad),
                                                              torch.tensor(float(self.stop_signal is not None))]))
        loss_value, bad, self.stopping = flags[0].item(), flags[1].item() > 0, flags[2].item() > 0
        grad_norm = torch.tensor(math.nan)
        if not bad:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, train_cfg["grad_clip"] or math.inf)
        if not torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip the step, count it
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_in_row += 1
            if self.bad_in_row > train_cfg["max_bad_steps"]:
                raise CmkitError(f"the loss or its gradients were NaN or inf for {self.bad_in_row} steps in a row "
                                 f"(up to step {step + 1}); the last checkpoint is intact: lower --lr, set "
                                 "train.grad_clip, or check the data")
            return {"step": step + 1, "loss": loss_value, "grad_norm": grad_norm.item(), "skipped": True,
                    "skipped_steps": self.skipped_steps, **extra}
        self.bad_in_row = 0
        for group in self.optimizer.param_groups:
            group["lr"] = train_cfg["lr"] * min(1.0, (step + 1) / max(1, train_cfg["lr_warmup"]))
        self.optimizer.step()
        if self.target is not None:
            ema_update(self.target, self.net, self.objective.target_rate(step))
        ema_update(self.ema, self.net, ema_rate(train_cfg["ema_rate"], step))
        if self.streamed:
            extra["bad_images"] = self.bad_images
        return {"step": step + 1, "loss": loss_value, "grad_norm": grad_norm.item(),
                "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped_steps, **extra}

    def _loss(self, batch: torch.Tensor, condition: Condition, draws: dict) -> tuple[torch.Tensor, dict]:
        """The mean loss of a micro-batch and its logged tensors: what ``train.compile`` compiles."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.train_cfg["bf16"]):
            per_sample, logs = self.objective.loss(self.net, batch, draws, target=self.target, condition=condition)
        return per_sample.float().mean(), logs

    def sample_grid(self, path: Path) -> None:
        """A grid of EMA samples (1 step for a consistency model, 18 Heun steps for a teacher)."""
        noise_range = noise_config(self.config)
        diffusion = self.spec.diffusion
        labels = torch.arange(GRID_SAMPLES) % self.num_classes if self.num_classes else None
        text = None
        if self.text_ids is not None:  # the first captions, in turn
            text = self._embed(torch.arange(GRID_SAMPLES) % len(self.captions))
        model = self.ema
        if self.config["model"].get("guidance"):
            model = GuidanceInput(model, default_guidance(self.config["objective"]["guidance"]))
        x = generate(model, tuple(self.x_train.shape[1:]), default_levels(diffusion, noise_range),
                     is_diffusion=diffusion, n=GRID_SAMPLES, seed=GRID_SEED, sigma_min=noise_range.sigma_min,
                     condition=Condition(labels=labels, text=text))
        what = "EMA, Heun 35 NFE" if diffusion else "EMA, 1 step"
        if self.latent:  # decoded by the data set's VAE (the one copied into the run), loaded once
            if self.grid_decoder is None:
                self.grid_decoder = latent_scaler(self.config["standardizer"], self.config["data"]["name"])
            images = self.grid_decoder.to_data(x)
        else:
            images = ImageScaler.to_data(x)
        save_image_grid(images, path, title=f"{self.config['method']} {path.stem}: {what}")

    def save(self, out: Path, step: int) -> None:
        """A checkpoint from rank 0, once every rank has checked that their weights agree."""
        self.world.check_in_sync(self.modules)
        if self.world.is_main:
            checkpoint.save_checkpoint(out, modules=self.modules, optimizer=self.optimizer, step=step,
                                       rng={"skipped_steps": torch.tensor([self.skipped_steps])},
                                       keep=self.train_cfg["keep_checkpoints"])
            if getattr(self.ema.backbone, "lora", None):  # what pipe.load_lora_weights(RUN) reads
                checkpoint.save_lora_file(out, functools.partial(save_lora, self.ema.backbone.unet))

    def restore(self, out: Path) -> int:
        """Load the latest checkpoint of ``out``; return its step."""
        step, optim_state, rng = checkpoint.load_training_state(out)
        for name, module in self.modules.items():
            module.load_state_dict(checkpoint.load_weights(out, name))
        self.optimizer.load_state_dict(optim_state)
        self.skipped_steps = int(rng["skipped_steps"][0]) if "skipped_steps" in rng else 0
        return step


class _StopOnSignals:
    """While active, SIGTERM and SIGINT ask the trainer to stop after the step in progress (a
    second SIGINT interrupts at once). Only the main thread can own signal handlers; elsewhere
    this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, {}

    def _handle(self, signum, frame):
        if self.trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _peak_memory_mb(device: str) -> float:
    """Peak memory of this process: CUDA memory allocated on a GPU, else the resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _Logs:
    """metrics.jsonl (and TensorBoard when asked for), written by rank 0 only."""

    def __init__(self, out: Path, train_cfg: dict, active: bool):
        self.active, self.tensorboard = active, None
        if not active:
            return
        self.file = open(out / "metrics.jsonl", "a")
        if train_cfg["tensorboard"]:  # its import was checked with the config
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.active:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def train(config: dict, out: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True, own_signals: bool = False) -> Path:
    """Train (or, with ``resume``, continue training) the run ``config`` describes into ``out``.
    ``config`` (from `build_config`) is not changed; the run's complete config is in out/config.json.

    On resume the run's saved config is used, with ``train.steps`` (the step to stop at) taken
    from ``config``. Under torchrun every process calls this; rank 0 writes the run directory.

    SIGTERM or SIGINT (pre-emption, Ctrl-C) finish the step in progress and save a checkpoint; a
    second SIGINT interrupts at once. Then, with ``own_signals`` (the `cmkit` command, which owns
    its process), `Stopped` is raised. Otherwise (a script, a test runner) the signal goes on to
    the handler that was there before: Ctrl-C raises KeyboardInterrupt, SIGTERM's default ends
    the process, so pytest and user scripts stop as they would without cmkit.
    """
    out = Path(out)
    world = world_from_env(config["train"].get("device", "auto"))
    try:
        return _train(config, out, world, resume=resume, force=force, progress=progress and world.is_main)
    except Stopped as e:
        if own_signals:
            raise
        stopped = e
    finally:
        close(world)
    signal.raise_signal(stopped.signum)  # the previous handlers are back in place
    raise stopped  # they ignored it: still, training stopped


def _train(config: dict, out: Path, world: World, *, resume: bool, force: bool, progress: bool) -> Path:
    if resume:
        checkpoint.prepare_run_dir(out, resume=True, force=force)
        saved = checkpoint.read_run_config(out)
        steps, method = config["train"].get("steps", saved["train"]["steps"]), config.get("method")
        if method is not None and method != saved.get("method"):
            raise CmkitError(f"{out} is a run of method {saved.get('method')}, not {method}")
        # The step to stop at, and the machine's settings if given (a run may move between machines).
        # Data and train settings added since the run was written take their defaults.
        moved = {k: config["train"][k] for k in ("device", "compile", "compile_mode") if k in config["train"]}
        config = {**saved, "data": {**base_section("data"), **saved["data"]},
                  "train": {**base_section("train"), **saved["train"], "steps": steps, **moved}}
    trainer = Trainer(config, world, resumed=resume)
    # Complete: what config.json records, with where and how this (latest) session trains.
    config = {**trainer.config, "runtime": trainer.runtime()}
    total = config["train"]["steps"]
    start = 0
    if resume:
        start = trainer.restore(out)
        if start >= total:
            raise CmkitError(f"{out} is already at step {start}; pass --steps above it to train further")
        world.barrier()  # every rank has read the log's checkpoint before rank 0 rewrites the log
        if world.is_main:
            _truncate_metrics(out / "metrics.jsonl", start, config["train"]["log_every"])
        horizon = config["objective"].get("total_steps")
        if progress and horizon is not None and horizon != total:
            print(f"cmkit: note: the {config['method']} curriculum keeps its horizon objective.total_steps = "
                  f"{horizon}", file=sys.stderr)
    else:
        checkpoint.check_new_run_dir(out, force=force, protect=tuple(trainer.protected))
        world.barrier()  # every rank checked before rank 0 creates (or replaces) the directory
        if world.is_main:
            checkpoint.prepare_run_dir(out, resume=False, force=force, protect=tuple(trainer.protected))
            if trainer.latent:  # the decoder and prompt encoder the run samples with, from its data
                copy_components(Path(config["data"]["name"]), out)
    if world.is_main:
        checkpoint.atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    world.barrier()
    if config["train"]["compile"]:
        use_run_cache(out)  # the directory is in place; nothing has compiled yet

    if progress:  # once the run is sure to start
        print(f"cmkit: {config['method']} on {trainer.describe()}", file=sys.stderr)
    train_cfg = config["train"]
    logs = _Logs(out, train_cfg, world.is_main)
    try:
        with _StopOnSignals(trainer), \
                tqdm(range(start, total), initial=start, total=total, disable=not progress,
                     desc=f"train {config['method']}", dynamic_ncols=True) as bar:
            for step in bar:
                tick = time.perf_counter()
                record = trainer.step(step)
                # Throughput of the step itself (checkpoints and grids excluded), and peak memory.
                record["images_per_s"] = round(train_cfg["batch_size"] / (time.perf_counter() - tick), 2)
                record["max_memory_mb"] = round(_peak_memory_mb(trainer.device), 1)
                done = record["step"]
                if done % train_cfg["log_every"] == 0 or done == total or trainer.stopping:
                    logs.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                if trainer.stopping and done != total:
                    trainer.save(out, done)
                    world.barrier()
                    raise Stopped(trainer.stop_signal or signal.SIGTERM, done)
                if done % train_cfg["save_every"] == 0 and done != total:
                    trainer.save(out, done)
                if (world.is_main and (trainer.images or trainer.latent) and train_cfg["sample_every"]
                        and (done % train_cfg["sample_every"] == 0 or done == total)):
                    trainer.sample_grid(out / "samples" / f"step-{done:07d}.png")
        trainer.save(out, total)
        world.barrier()
    finally:
        trainer.close()
        logs.close()
    return out


def _truncate_metrics(path: Path, step: int, log_every: int) -> None:
    """Make the log read as an unbroken run's would: drop lines past the checkpoint being resumed,
    a closing line at that step that was off the log_every rhythm, and a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if logged < step or (logged == step and step % log_every == 0):
            kept.append(line)
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))
