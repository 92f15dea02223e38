"""A trained run as a Python object: rebuild its model from config.json, load its weights, sample.

    run = cmkit.load_run("runs/cd")
    x = run.sample(1000, steps=2, seed=0)     # numpy array in the data's units
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import scaler_from_state
from .data.latent_cache import latent_scaler
from .classes import resolve_labels
from .condition import Condition, as_condition
from .diffusers_runs import is_diffusers_folder, load_diffusers
from .errors import CmkitError
from .guidance import GuidanceInput, GuidedDenoiser, check_guidance_scale, default_guidance
from .latents import LatentScaler, PreviewCodec
from .nets import build_backbone
from .noise import NoiseConfig, append_zero, check_sigmas, karras_sigmas
from .objectives import MethodSpec, get_method
from .objectives.registry import export_formats, network_wrapper, noise_config
from .precond import build_wrapper
from .sampling import SAMPLERS, sample_levels
from .text import PromptEncoder, check_prompt


def build_model(config: dict) -> torch.nn.Module:
    """The preconditioned network a config describes (random weights): the backbone in its
    method's wrapper (`MethodSpec.wrapper`; TCM's: its stage-1 run's)."""
    return build_wrapper(network_wrapper(config), build_backbone(config["model"]), noise_config(config), config["model"])


MULTISTEP_HIGH = 0.8
MULTISTEP_LOW = 0.1


def default_consistency_sigmas(steps: int, noise: NoiseConfig, floor: float | None = None) -> list[float]:
    """Levels for ``steps``-step consistency sampling when none are given: sigma_max, then the
    remaining levels log-spaced from ``MULTISTEP_HIGH`` down to ``MULTISTEP_LOW`` (capped to the
    noise range). 2 steps re-noise to 0.8, close to iCT's 0.821 on CIFAR-10. A network trained
    only above ``floor`` (TCM's transition level) gets levels log-spaced from sigma_max down to ``floor``: 2 steps re-noise to the floor itself, TCM's (80, 1)."""
    if steps < 1:
        raise CmkitError(f"--steps must be at least 1, got {steps}")
    if steps == 1:
        return [noise.sigma_max]
    if floor is not None and floor > noise.sigma_min:
        return np.geomspace(noise.sigma_max, min(floor, noise.sigma_max), steps).tolist()
    hi = min(MULTISTEP_HIGH, noise.sigma_max * 0.99)
    lo = max(MULTISTEP_LOW, noise.sigma_min * 1.01)
    if steps == 2:
        return [noise.sigma_max, hi]
    return [noise.sigma_max] + np.geomspace(hi, lo, steps - 1).tolist()


def default_levels(is_diffusion: bool, noise: NoiseConfig, steps: int | None = None,
                   floor: float | None = None) -> torch.Tensor:
    """Noise levels for ``steps`` steps: a Karras grid plus 0 (18 steps) for a diffusion model,
    `default_consistency_sigmas` (1 step; ``floor``: its) for a consistency model."""
    if not is_diffusion:
        return torch.tensor(default_consistency_sigmas(1 if steps is None else steps, noise, floor))
    steps = 18 if steps is None else steps
    if steps < 1:
        raise CmkitError(f"--steps must be at least 1, got {steps}")
    if steps == 1:
        return append_zero(torch.tensor([noise.sigma_max]))
    return append_zero(karras_sigmas(steps, noise.sigma_min, noise.sigma_max, noise.rho))


class LowPrecision(torch.nn.Module):
    """Runs ``model`` under bfloat16 autocast and returns float32 (``cmkit sample --bf16``)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, sigma, condition=None):
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.model(x, sigma, condition).float()


def fast_inference(model: torch.nn.Module, *, bf16: bool = False, compile: bool = False) -> torch.nn.Module:
    """``model`` wrapped for inference: bfloat16 autocast and/or torch.compile (on CUDA with CUDA
    graphs, mode reduce-overhead: one-step sampling is a single launch-bound call)."""
    if bf16:
        model = LowPrecision(model)
    if compile:
        device = next(model.parameters()).device
        model = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)
    return model


def generate_chunks(model: torch.nn.Module, shape: tuple[int, ...], levels: torch.Tensor, *, is_diffusion: bool,
                    n: int, seed: int = 0, noise: torch.Tensor | None = None, sampler: str = "heun",
                    sigma_min: float = 0.002, batch_size: int = 100_000, condition: Condition | None = None,
                    **churn):
    """`generate` one batch at a time (model units, on the CPU), so that memory stays bounded for
    any ``n``. Each batch draws its starting noise, then its re-noising, from one generator seeded
    ``seed``; so a seed fixes the samples for a given ``batch_size``."""
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    levels = levels.to(device)
    gen = torch.Generator().manual_seed(seed)
    if noise is not None:
        noise = torch.as_tensor(noise, dtype=torch.float32)
        if tuple(noise.shape) != (n, *shape):
            raise CmkitError(f"noise must have shape {(n, *shape)}, got {tuple(noise.shape)}")
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            size = min(batch_size, n - start)
            # Always draw the seed's starting noise, so that re-noising in multistep sampling uses
            # the same later draws whether or not ``noise`` replaces this one.
            chunk = torch.randn(size, *shape, generator=gen)
            if noise is not None:
                chunk = noise[start:start + size]
            cond = None if condition is None else condition.select(slice(start, start + size)).to(device)
            x = chunk.to(device) * levels[0]
            try:
                x = sample_levels(model, x, levels, cond, diffusion=is_diffusion, sampler=sampler,
                                  sigma_min=sigma_min, generator=gen, **churn)
            except ValueError as e:
                raise CmkitError(str(e)) from None
            x = x.float().cpu()
            if not bool(torch.isfinite(x).all()):
                raise CmkitError("sampling produced NaN or inf: check the sampler settings and the run's weights")
            yield x


def generate(model: torch.nn.Module, shape: tuple[int, ...], levels: torch.Tensor, **kwargs) -> torch.Tensor:
    """``n`` samples in model units from a denoiser (Heun/Euler over ``levels``, which end in 0) or
    a consistency function (1 step or multistep over ``levels``), for ``condition`` (a
    `cmkit.condition.Condition` of n rows) when given. One generator drives the starting noise,
    multistep re-noising and churn, so a seed fixes the samples. Keywords as `generate_chunks`."""
    return torch.cat(list(generate_chunks(model, shape, levels, **kwargs)))


class Run:
    """A run directory loaded for inference (EMA weights unless ``weights`` says otherwise)."""

    def __init__(self, path: str | Path, weights: str = "ema", device: str = "cpu"):
        self.path = Path(path)
        self.device = device
        self.codec = self.prompts = None  # a latent run's VAE; a text-conditioned run's prompt encoder
        self.preview: LatentScaler | None = None  # a fast approximate decoder for live frames (`use_preview`)
        if is_diffusers_folder(self.path):  # a ConsistencyModelPipeline or UNet2DModel folder
            self.config, self.model = load_diffusers(self.path, device)
            self.method, self.noise_range = self.config["method"], noise_config(self.config)
            self.spec = get_method(self.method)
            components = getattr(self.model, "components", {})
            self.codec, self.prompts = components.get("codec"), components.get("prompts")
            self.scaler = (LatentScaler(self.config["standardizer"], self.codec) if self.codec is not None
                           else scaler_from_state(self.config["standardizer"]))
            return
        self.config = checkpoint.read_run_config(self.path)
        try:
            self.method = self.config["method"]
            self.spec: MethodSpec = get_method(self.method)
            self.noise_range = noise_config(self.config)
            if self.config["standardizer"].get("kind") == "latent":
                self.scaler = latent_scaler(self.config["standardizer"], self.path)
                self.codec = self.scaler.codec.to(device)
            else:
                self.scaler = scaler_from_state(self.config["standardizer"])
            if "text_shape" in self.config["model"]:
                self.prompts = PromptEncoder.from_folder(self.path).to(device)
            self.model = build_model(self.config)
        except (KeyError, ValueError, TypeError) as e:
            raise CmkitError(f"{self.path}/config.json is incomplete or invalid ({type(e).__name__}: {e})") from None
        try:
            self.model.load_state_dict(checkpoint.load_weights(self.path, weights))
        except RuntimeError as e:
            raise CmkitError(f"{self.path}: weights do not match its config: {str(e).splitlines()[0]}") from None
        self.model.to(device).eval().requires_grad_(False)
        self.device = device

    @property
    def num_classes(self) -> int:
        """K for a class-conditional run (labels 0..K-1), 0 for an unconditional one."""
        return self.config["model"].get("num_classes") or 0

    @property
    def class_names(self) -> list[str] | None:
        return self.config.get("class_names")

    @property
    def has_null_label(self) -> bool:
        """Trained with label dropout, so the null label (unconditional) means something."""
        return bool(self.num_classes and self.config["train"].get("label_dropout", 0.0))

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """The guidance scales a guided-distilled student was trained for (None otherwise)."""
        scales = self.config.get("objective", {}).get("guidance")
        return None if scales is None or not self.config["model"].get("guidance") else tuple(scales)

    @property
    def takes_text(self) -> bool:
        """A text-conditioned run: it takes prompts (`text_condition`)."""
        return "text_shape" in self.config["model"]

    def text_condition(self, prompts, n: int) -> Condition:
        """The ``text`` condition of ``n`` samples for ``prompts`` (one prompt for all, or a list
        cycled over the samples); an empty condition for None (the empty prompt)."""
        if prompts is None:
            return Condition()
        if not self.takes_text:
            raise CmkitError("--prompt needs a text-conditioned run; this one takes no prompts")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise CmkitError("pass at least one prompt")
        try:
            prompts = [check_prompt(p) for p in prompts]
        except ValueError as e:
            raise CmkitError(f"--prompt: {e}") from None
        distinct = sorted(set(prompts))  # each prompt encoded once (eval passes one per sample)
        table = self.prompts(distinct).cpu()
        row = {p: i for i, p in enumerate(distinct)}
        rows = torch.tensor([row[p] for p in prompts])
        return Condition(text=table[rows[torch.arange(n) % len(prompts)]])

    def labels(self, spec, n: int, seed: int = 0) -> torch.Tensor | None:
        """(n,) labels for a ``--class`` spec (`cmkit.classes`); None for an unconditional run."""
        if spec is not None and self.takes_text:
            raise CmkitError("this run is text-conditional: it takes a prompt, not class labels")
        return resolve_labels(spec, n, num_classes=self.num_classes, class_names=self.class_names,
                              has_null=self.has_null_label, seed=seed)

    def network(self, guidance: float | None = None, labels: torch.Tensor | None = None) -> torch.nn.Module:
        """The network to sample or edit with: the model itself, the teacher with classifier-free
        guidance at ``guidance``, or a guided student with its guidance input set to ``guidance``
        (``labels``: the labels it will be given, checked here)."""
        if guidance is not None:
            try:
                guidance = check_guidance_scale(guidance)
            except ValueError as e:
                raise CmkitError(f"--guidance: {e}") from None
        if self.guidance_range is not None:
            lo, hi = self.guidance_range
            scale = default_guidance(self.guidance_range) if guidance is None else guidance
            if not lo <= scale <= hi:
                raise CmkitError(f"this student was distilled for guidance scales in [{lo:g}, {hi:g}], not {scale:g}")
            return GuidanceInput(self.model, scale)
        if guidance is None:
            return self.model
        if not self.num_classes and not self.takes_text:
            raise CmkitError("--guidance needs a class- or text-conditional run; this one is unconditional")
        distilled = self.config.get("objective", {}).get("guidance")
        if not self.is_diffusion and distilled is not None:  # LCM-LoRA's: its UNet has no input for a scale
            raise CmkitError(f"this {self.method} student takes no guidance scale: it was distilled from its teacher "
                             f"guided at scales in [{distilled[0]:g}, {distilled[1]:g}], which its weights carry; "
                             "sample it without --guidance")
        if not self.is_diffusion:
            raise CmkitError(f"this {self.method} run was not distilled with guidance (train it with "
                             "--guidance LO,HI from a guided teacher); only teachers take any --guidance")
        if not self.has_null_label and not self.takes_text:
            raise CmkitError("classifier-free guidance needs a teacher trained with --label-dropout > 0")
        if labels is not None and bool((labels == self.num_classes).any()):
            raise CmkitError("--guidance needs real classes, not the null label")
        return GuidedDenoiser(self.model, guidance)

    @property
    def is_diffusion(self) -> bool:
        """A diffusion teacher (sampled with an ODE solver), not a consistency model."""
        return self.spec.diffusion

    @property
    def description(self) -> str:
        """What the run is, as messages name it ("a diffusers DDPM teacher (a diffusion model)", "a
        cmkit ct run"): where it comes from, so that the article reads "a" before any method name."""
        if self.config.get("source") == "diffusers":
            if self.is_diffusion:
                return f"a diffusers {'Stable Diffusion' if self.takes_text else 'DDPM'} teacher (a diffusion model)"
            return f"a diffusers consistency model ({self.method})"
        return f"a cmkit {self.method} run" + (" (a diffusion model)" if self.is_diffusion else "")

    @property
    def is_image(self) -> bool:
        """Samples are images (of pixels, or of latents decoded by the run's VAE)."""
        return self.config["standardizer"].get("kind") in ("image", "latent")

    @property
    def is_latent(self) -> bool:
        return self.config["standardizer"].get("kind") == "latent"

    def use_preview(self, folder: str | Path) -> LatentScaler:
        """Load a TAESD-style ``AutoencoderTiny`` folder as this latent run's preview decoder: a
        `LatentScaler` through it (on the run's device), kept as ``self.preview`` and returned.
        ``self.scaler`` stays the run's own VAE (sample and eval decode through it); the preview
        is for frames that must be fast (cmkit serve's live mode). Refused: a run that is not
        latent, and a preview whose latent channels or downsampling differ from the run's VAE.
        (Which latent space a preview was distilled for is not recorded: TAESD for SD 1.x/2.x,
        TAESDXL for SDXL; a wrong one passes these checks and decodes wrong colours.)"""
        if not self.is_latent:
            raise CmkitError(f"a preview VAE needs a latent run; {self.path} is {self.description}, which has no VAE")
        full = self.scaler.codec
        preview = PreviewCodec.from_folder(folder, image_channels=self.image_shape[0])
        if preview.latent_channels != full.latent_channels:
            raise CmkitError(f"the preview VAE in {folder} has {preview.latent_channels} latent channels; this run's "
                             f"VAE has {full.latent_channels}")
        if preview.factor != full.factor:
            raise CmkitError(f"the preview VAE in {folder} downsamples by {preview.factor}; this run's VAE by "
                             f"{full.factor}")
        self.preview = LatentScaler(self.config["standardizer"], preview.to(self.device))
        return self.preview

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one sample in data units: the decoded image's for a latent run."""
        return tuple(self.scaler.image_shape) if self.is_latent else self.shape

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape: (dim,) for vectors, (C, H, W) for images."""
        return tuple(self.scaler.shape) if self.is_image else (self.config["model"]["dim"],)

    @property
    def dim(self) -> int:
        return int(np.prod(self.shape))

    def sigmas_for(self, steps: int | None = None, sigmas: list[float] | None = None) -> torch.Tensor:
        """The sampler's noise levels: explicit ``sigmas`` win; then levels `cmkit tune-sigmas` stored
        for ``steps``; else the default for ``steps``."""
        if sigmas is not None:
            try:
                sigmas = check_sigmas(sigmas, self.noise_range)
            except ValueError as e:
                raise CmkitError(str(e)) from None
            levels = torch.tensor(sigmas, dtype=torch.float32)
            return self._on_table(append_zero(levels) if self.is_diffusion else levels)
        tuned = self.config.get("sampling", {}).get("sigmas", {}).get(str(steps))
        if tuned is not None and not self.is_diffusion:  # chosen by cmkit tune-sigmas
            return self._on_table(torch.tensor(tuned, dtype=torch.float32))
        own = getattr(self.model, "default_levels", None)  # a network with its own schedule (an LCM's)
        if own is not None and not self.is_diffusion:
            try:
                return own(1 if steps is None else steps)
            except ValueError as e:
                raise CmkitError(str(e)) from None
        return self._on_table(default_levels(self.is_diffusion, self.noise_range, steps, self.sampling_floor))

    @property
    def sampling_floor(self) -> float | None:
        """The lowest level default few-step sampling re-noises to (`MethodSpec.sampling_floor`)."""
        floor = None if self.spec.sampling_floor is None else self.spec.sampling_floor(self.config)
        if floor is not None and not (isinstance(floor, (int, float)) and math.isfinite(floor) and floor > 0):
            raise CmkitError(f"{self.path}: the recorded sampling floor {floor!r} is not a positive number")
        return None if floor is None else float(floor)

    @property
    def export_formats(self) -> tuple[str, ...]:
        """What ``cmkit export`` writes this run as (diffusers, onnx)."""
        return export_formats(self.config)

    def _on_table(self, levels: torch.Tensor) -> torch.Tensor:
        """``levels`` moved onto the noise table of a network that knows only its levels (a
        diffusers UNet with learned time embeddings; EDM's ``round_sigma``), repeats dropped."""
        round_sigma = getattr(self.model, "round_sigma", None)
        if round_sigma is None:
            return levels
        positive = round_sigma(levels[levels > 0])
        keep = torch.cat([torch.ones(1, dtype=torch.bool), positive[1:] < positive[:-1]])
        return torch.cat([positive[keep], levels[levels <= 0]])

    def denoise(self, x: torch.Tensor, sigma, class_labels=None, condition=None) -> torch.Tensor:
        """The network's estimate of the clean data at noise level ``sigma`` (a number or one per
        sample, within `noise_range`), in model units: D(x; sigma) for a diffusion run, f(x, sigma)
        for a consistency model. ``class_labels``: a tensor of label indices (a conditional run);
        ``condition``: any other kinds the network takes (`cmkit.condition.Condition`)."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if tuple(x.shape[1:]) != self.shape:
            raise CmkitError(f"x must have shape (n, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        lo, hi = self.noise_range.sigma_min, self.noise_range.sigma_max
        if not bool(torch.isfinite(sigma).all()) or bool((sigma < lo * (1 - 1e-6)).any()) \
                or bool((sigma > hi * (1 + 1e-6)).any()):
            raise CmkitError(f"sigma must lie in the run's noise range [{lo:g}, {hi:g}]")
        cond = as_condition(condition)
        if class_labels is not None:
            cond = cond.replace(labels=torch.as_tensor(class_labels).long())
        try:
            with torch.inference_mode():
                return self.model(x.to(self.device), sigma.to(self.device), cond.to(self.device)).float().cpu()
        except ValueError as e:
            raise CmkitError(str(e)) from None

    def sample(self, n: int, **kwargs) -> np.ndarray:
        """``n`` samples in data units: float64 (n, dim) for vectors, uint8 (n, C, H, W) for
        images. Keywords as `sample_chunks`."""
        return np.concatenate(list(self.sample_chunks(n, **kwargs)))

    def sample_chunks(self, n: int, *, steps: int | None = None, sigmas: list[float] | None = None,
                      seed: int = 0, noise: np.ndarray | torch.Tensor | None = None, sampler: str = "heun",
                      batch_size: int | None = None, class_labels=None, guidance: float | None = None,
                      condition=None, prompt=None,
                      bf16: bool = False, compile: bool = False, **churn):
        """`sample`, one batch (``batch_size``; default 256 images or 100,000 vectors) at a time.
        ``noise`` (n, *shape) standard normal replaces the seed's. ``class_labels`` is a class spec
        (`cmkit.classes`; default: random classes of a conditional run), ``guidance`` a
        classifier-free guidance scale (teachers, and students distilled with guidance). ``bf16``
        and ``compile`` speed up inference (`fast_inference`). ``churn`` (s_churn, s_tmin, s_tmax,
        s_noise) goes to the Heun sampler of a teacher run. ``prompt``: a prompt, or prompts
        cycled over the samples, of a text-conditioned run. ``condition``: kinds other than the
        class and guidance scale a network takes, n rows each (`cmkit.condition.Condition`)."""
        levels = self.sigmas_for(steps, sigmas)
        if sampler not in SAMPLERS:
            raise CmkitError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        if churn and not (self.is_diffusion and sampler == "heun"):
            raise CmkitError("stochastic churn applies only to the Heun sampler of a teacher run")
        if n < 1:
            raise CmkitError(f"the number of samples must be positive, got {n}")
        if batch_size is not None and batch_size < 1:
            raise CmkitError(f"the batch size must be positive, got {batch_size}")
        if churn.get("s_churn", 0) < 0 or churn.get("s_noise", 1) < 0:
            raise CmkitError(f"s_churn and s_noise must be >= 0, got {churn.get('s_churn')}, {churn.get('s_noise')}")
        labels = self.labels(class_labels, n, seed)
        condition = as_condition(condition)
        if prompt is not None:
            condition = condition.replace(text=self.text_condition(prompt, n).text)
        if guidance is not None and self.takes_text and condition.text is None and self.is_diffusion:
            raise CmkitError("--guidance needs a prompt (--prompt TEXT)")
        model = fast_inference(self.network(guidance, labels), bf16=bf16, compile=compile)
        chunks = generate_chunks(model, self.shape, levels, is_diffusion=self.is_diffusion, n=n, seed=seed,
                                 noise=noise, sampler=sampler, sigma_min=self.noise_range.sigma_min,
                                 batch_size=batch_size or (256 if self.is_image else 100_000),
                                 condition=condition.replace(labels=labels), **churn)
        return (self.scaler.to_data(x) for x in chunks)  # arguments checked above, not at the first batch


def load_run(path: str | Path, weights: str = "ema", device: str = "cpu") -> Run:
    return Run(path, weights=weights, device=device)
