"""The editing tasks on a loaded run: uint8 images (N, C, H, W) in, uint8 images out.

Each task builds a reference, an operator and a mask, and calls `edit`; ``n`` variations per
input come out input-major ((N * n, C, H, W): input 0's variations first). One seed fixes all of
them.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..condition import Condition
from ..errors import CmkitError
from ..noise import check_sigmas, karras_sigmas
from .algorithm import edit, flow_map, slerp
from .operators import ChannelMix, Identity, PatchOrthogonal

# SDEdit-style stroke editing: the paper's two levels (data in [-1, 1], like cmkit's images), and
# the strength live editing starts from (5.38 on the default Karras axis, 80 and rho 7).
STROKE_SIGMAS = (5.38, 2.24)
STROKE_STRENGTH = 0.6
EDIT_STEPS = 10
EDIT_SIGMA_LOW = 0.02


def default_edit_sigmas(run, steps: int = EDIT_STEPS) -> list[float]:
    """``steps`` levels of a Karras grid from sigma_max down to 0.02: the early levels find the
    content, the many small ones harmonise it with the kept part."""
    if steps < 1:
        raise CmkitError(f"--steps must be at least 1, got {steps}")
    if steps == 1:
        return [run.noise_range.sigma_max]
    low = max(EDIT_SIGMA_LOW, run.noise_range.sigma_min)
    return karras_sigmas(steps, low, run.noise_range.sigma_max, run.noise_range.rho).tolist()


def consistency_function(run, teacher_steps: int = 10, guidance: float | None = None, labels=None):
    """f(x, sigma, condition) of any run: a consistency model as it is, a teacher through its ODE
    flow map; with classifier-free guidance at ``guidance`` (teachers and guided students)."""
    model = run.network(guidance, labels)
    if run.is_diffusion:
        return flow_map(model, teacher_steps, run.noise_range.sigma_min, run.noise_range.rho)
    return model


def edit_labels(run, spec, inputs: int, n: int = 1, seed: int = 0) -> torch.Tensor | None:
    """Labels of ``inputs`` edited inputs (a list ``spec`` gives input i class spec[i], cycled), each
    repeated for its ``n`` variations. A conditional run edits with the null label by default
    when it has one (it was trained with label dropout); otherwise it needs a class."""
    if spec is None and run.num_classes:
        if not run.has_null_label:
            raise CmkitError("this run is class-conditional: pass --class (an index, a name or a comma list)")
        spec = "null"
    labels = run.labels(spec, inputs, seed)
    return None if labels is None else labels.repeat_interleave(n)


LATENT_TASKS = ("inpaint", "stroke")  # what a latent model edits through its VAE (the others constrain pixels)


def _require_images(run, task: str, latent: bool = False) -> None:
    """An image model; a latent one only for the tasks that work through its VAE (``latent``)."""
    if not run.is_image:
        raise CmkitError(f"{task} needs an image model; {run.path} was trained on vectors")
    if getattr(run, "is_latent", False) and not latent:  # its constraint is on pixels, the model on latents
        raise CmkitError(f"{task} works on pixel-space models; {run.path} generates latents that its VAE decodes "
                         f"(it takes {' and '.join(LATENT_TASKS)})")


def _image_shape(run) -> tuple[int, int, int]:
    """What the edited images are: the decoded images' shape for a latent run."""
    return tuple(getattr(run, "image_shape", run.shape))


def _check_batch(run, images: np.ndarray, task: str, channels: int | None = None) -> torch.Tensor:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CmkitError(f"{task}: expected uint8 images (N, C, H, W), got {images.dtype} {images.shape}")
    c, h, w = _image_shape(run)
    want = (channels or c, h, w)
    if tuple(images.shape[1:]) != want:
        raise CmkitError(f"{task}: the input is {len(images)} image(s) of {images.shape[2]}x{images.shape[3]} "
                         f"with {images.shape[1]} channel(s); this model takes {h}x{w} with {want[0]}")
    return torch.from_numpy(np.array(images))  # a copy: decoded images may be read-only


def strength_levels(run, strength: float, steps: int = 1) -> list[float]:
    """Image-to-image levels: ``steps`` levels from the fraction ``strength`` of the run's time axis
    down (strength 1: pure noise). An LCM takes exactly what diffusers' LCM img2img pipeline
    samples at (`LCMScheduler.set_timesteps(steps, strength=strength)`); any other network
    ``steps`` levels evenly spaced below it (u = strength (1 - i/k), i < k) on its noise table, if
    it has one, else on the Karras rho-axis between sigma_min and sigma_max."""
    if not 0 < strength <= 1:
        raise CmkitError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise CmkitError(f"steps must be at least 1, got {steps}")
    own = getattr(run.model, "default_levels", None)
    if own is not None and "strength" in inspect.signature(own).parameters:
        try:
            return own(steps, strength=strength).tolist()
        except ValueError as e:
            raise CmkitError(str(e)) from None
    table = getattr(getattr(run.model, "table", None), "sigmas", None)
    fractions = [strength * (1 - i / steps) for i in range(steps)]
    if table is not None:
        levels = [float(table[max(1, round(u * (len(table) - 1)))]) for u in fractions]
    else:
        noise = run.noise_range
        lo, hi = noise.sigma_min ** (1 / noise.rho), noise.sigma_max ** (1 / noise.rho)
        levels = [(lo + u * (hi - lo)) ** noise.rho for u in fractions]
    return sorted(set(levels), reverse=True)  # distinct and decreasing where a short table repeats a level


def _run_edit(run, y: torch.Tensor, *, sigmas, operator=None, mask=None, n: int = 1, seed: int = 0,
              teacher_steps: int = 10, class_labels=None, guidance: float | None = None, prompt=None,
              text: torch.Tensor | None = None, scaler=None, watch=None) -> np.ndarray:
    """Algorithm 4 on ``y`` (model units), conditioned on the labels, and on ``prompt`` or its
    embedding ``text`` ((1, L, D), e.g. cached) for a text model; uint8 images out."""
    if n < 1:
        raise CmkitError(f"--n must be positive, got {n}")
    watch = watch or Stopwatch()
    labels = edit_labels(run, class_labels, len(y), n, seed)
    model = consistency_function(run, teacher_steps, guidance, labels)
    condition = Condition(labels=labels)
    if prompt is not None:
        with watch("text"):
            text = run.text_condition(prompt, 1).text
    if text is not None:
        condition = condition.replace(text=text.expand(len(y) * n, -1, -1))
    try:
        sigmas = check_sigmas(sigmas, run.noise_range)
    except ValueError as e:
        raise CmkitError(str(e)) from None
    y = y.repeat_interleave(n, 0).to(run.device)
    if mask is not None and mask.shape[0] > 1:
        mask = mask.repeat_interleave(n, 0)
    gen = torch.Generator().manual_seed(seed)
    clip = None if getattr(run, "is_latent", False) else (-1.0, 1.0)  # latents have no fixed range
    try:
        with watch("network"):
            x = edit(model, y, sigmas, operator=operator, mask=None if mask is None else mask.to(run.device),
                     sigma_min=run.noise_range.sigma_min, generator=gen, clip=clip, condition=condition.to(run.device))
    except ValueError as e:
        raise CmkitError(str(e)) from None
    if not bool(torch.isfinite(x).all()):
        raise CmkitError("the edit produced values that are not finite (NaN or inf)" +
                         (f" at guidance {guidance:g}: use a smaller scale" if guidance is not None else ""))
    with watch("decode"):
        return (scaler or run.scaler).to_data(x)


def inpaint(run, images: np.ndarray, mask: np.ndarray, *, sigmas=None, steps: int = EDIT_STEPS, n: int = 1,
            seed: int = 0, **cond) -> np.ndarray:
    """Fill the pixels where ``mask`` (bool (H, W) or (N, 1, H, W); True = unknown) is set.

    A latent model fills the latent cells that cover a masked pixel, from the input's latents with
    the hole mid-grey; the decoded result then takes the input's own pixels outside the mask, so
    the known pixels stay exact there too."""
    _require_images(run, "inpainting", latent=True)
    pixels = _check_batch(run, images, "inpainting")
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    h, w = _image_shape(run)[1:]
    if mask.ndim == 2:
        mask = mask[None, None]
    if mask.ndim != 4 or tuple(mask.shape[2:]) != (h, w) or mask.shape[1] != 1 or mask.shape[0] not in (1, len(pixels)):
        raise CmkitError(f"inpainting: the mask must be {h}x{w} (the model's size), got {tuple(mask.shape)}")
    if not getattr(run, "is_latent", False):
        mask = mask.float()
        y = run.scaler.to_model(pixels) * (1 - mask)  # the hole starts as mid-grey, not as what the input had
        return _run_edit(run, y, sigmas=sigmas or default_edit_sigmas(run, steps), operator=Identity(), mask=mask,
                         n=n, seed=seed, **cond)
    grey = torch.where(mask, torch.full_like(pixels, 128), pixels)
    cells = run.scaler.latent_mask(mask)
    y = run.scaler.to_model(grey) * (1 - cells.to(run.device))
    out = _run_edit(run, y, sigmas=sigmas or default_edit_sigmas(run, steps), operator=Identity(), mask=cells,
                    n=n, seed=seed, **cond)
    keep = np.repeat(~mask.numpy(), len(pixels) * n // len(mask), axis=0)
    inputs = np.repeat(pixels.numpy(), n, axis=0)
    return np.where(np.broadcast_to(keep, out.shape), inputs, out)


def colorize(run, images: np.ndarray, *, sigmas=None, steps: int = EDIT_STEPS, n: int = 1, seed: int = 0,
             **cond) -> np.ndarray:
    """Colour grey (N, 1, H, W) or colour (N, 3, H, W) images, keeping their luminance."""
    _require_images(run, "colorization")
    if run.shape[0] != 3:
        raise CmkitError(f"colorization needs an RGB model; {run.path} makes {run.shape[0]}-channel images")
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    y = run.scaler.to_model(_check_batch(run, images, "colorization"))
    mask = torch.ones(1, 3, 1, 1)
    mask[:, 0] = 0  # keep the luminance coordinate
    return _run_edit(run, y, sigmas=sigmas or default_edit_sigmas(run, steps), operator=ChannelMix.colorization(),
                     mask=mask, n=n, seed=seed, **cond)


def superres(run, low: np.ndarray, factor: int, *, sigmas=None, steps: int = EDIT_STEPS, n: int = 1,
             seed: int = 0, **cond) -> np.ndarray:
    """``factor`` times larger images whose ``factor`` x ``factor`` patch means are the input's pixels."""
    _require_images(run, "super-resolution")
    c, h, w = run.shape
    if factor < 2 or h % factor or w % factor:
        raise CmkitError(f"super-resolution: --factor must be at least 2 and divide the model's size {h}x{w}, "
                         f"got {factor}")
    low = np.asarray(low)
    if low.dtype != np.uint8 or low.ndim != 4 or tuple(low.shape[1:]) != (c, h // factor, w // factor):
        got = (f"{low.shape[0]} image(s) of {low.shape[2]}x{low.shape[3]} with {low.shape[1]} channel(s)"
               if low.ndim == 4 else f"{low.dtype} {low.shape}")
        raise CmkitError(f"super-resolution: the input must be {h // factor}x{w // factor} with {c} channel(s) "
                         f"for --factor {factor} (the model makes {h}x{w}), got {got}; pass --downscale to "
                         "make it from full-size images")
    y = run.scaler.to_model(torch.from_numpy(np.array(low)))  # a copy: decoded images may be read-only
    y = y.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    op = PatchOrthogonal.superresolution(factor)
    return _run_edit(run, y, sigmas=sigmas or default_edit_sigmas(run, steps), operator=op,
                     mask=op.coefficient_mask(y.shape), n=n, seed=seed, **cond)


def downscale(images: np.ndarray, factor: int) -> np.ndarray:
    """uint8 (N, C, H, W) images whose pixels are the means of ``factor`` x ``factor`` patches
    (rounded): the measurement super-resolution inverts, to make its input from full-size images."""
    n, c, h, w = images.shape
    if factor < 2 or h % factor or w % factor:
        raise CmkitError(f"--downscale: --factor {factor} must be at least 2 and divide the input's {h}x{w}")
    patches = images.reshape(n, c, h // factor, factor, w // factor, factor).astype(np.float64)
    return np.clip(np.round(patches.mean(axis=(3, 5))), 0, 255).astype(np.uint8)


def stroke(run, images: np.ndarray, *, sigmas=None, strength: float | None = None, steps: int | None = None,
           n: int = 1, seed: int = 0, prompt=None, scaler=None, watch=None, **cond) -> np.ndarray:
    """SDEdit: a stroke painting, noised to sigmas[0], becomes a realistic image; for a latent
    model, image-to-image on the painting's latents (with a text model's ``prompt``). The levels:
    ``sigmas``, else `strength_levels` (``strength``, ``steps``: 1), else the paper's two levels.
    ``scaler``: the image <-> model map (default the run's; a preview VAE's for live frames);
    ``watch``: a `Stopwatch` that times the parts."""
    _require_images(run, "stroke editing", latent=True)
    if sigmas is None:
        sigmas = STROKE_SIGMAS if strength is None and steps is None else \
            strength_levels(run, STROKE_STRENGTH if strength is None else strength, steps or 1)
    watch = watch or Stopwatch()
    pixels = _check_batch(run, images, "stroke editing")
    with watch("encode"):
        y = (scaler or run.scaler).to_model(pixels)
    return _run_edit(run, y, sigmas=list(sigmas), n=n, seed=seed, prompt=prompt, scaler=scaler, watch=watch, **cond)


def denoise(run, noisy: np.ndarray, sigma: float, *, class_labels=None, guidance: float | None = None) -> np.ndarray:
    """One call f(y, sigma): ``sigma`` is the noise's standard deviation in model units (images:
    [-1, 1], so 25 grey levels of 255 is about 0.2)."""
    _require_images(run, "denoising")
    if not run.noise_range.sigma_min <= sigma <= run.noise_range.sigma_max:
        raise CmkitError(f"--sigma must lie in [{run.noise_range.sigma_min}, {run.noise_range.sigma_max}], got {sigma}")
    y = run.scaler.to_model(_check_batch(run, noisy, "denoising")).to(run.device)
    labels = edit_labels(run, class_labels, len(y))
    labels = None if labels is None else labels.to(run.device)
    with torch.no_grad():
        f = consistency_function(run, guidance=guidance, labels=labels)
        return run.scaler.to_data(f(y, sigma, Condition(labels=labels)))


def seed_noise(run, seed: int) -> torch.Tensor:
    """The standard-normal starting noise `run.sample(1, seed=seed)` uses."""
    return torch.randn(1, *run.shape, generator=torch.Generator().manual_seed(seed))


def interpolate(run, seed_a: int, seed_b: int, frames: int, *, class_labels=None,
                guidance: float | None = None) -> np.ndarray:
    """``frames`` one-step samples along the great circle between the two seeds' noises; the first
    and last equal `run.sample(1, steps=1, seed=...)` of the two seeds (of a conditional run: with
    one class for all frames, by default the one `run.sample` draws for seed A)."""
    if frames < 2:
        raise CmkitError(f"--frames must be at least 2, got {frames}")
    z = slerp(seed_noise(run, seed_a), seed_noise(run, seed_b), torch.linspace(0, 1, frames))
    sigma = run.noise_range.sigma_max
    labels = run.labels(class_labels, 1, seed_a)
    labels = None if labels is None else labels.expand(frames).to(run.device)
    with torch.no_grad():
        f = consistency_function(run, teacher_steps=18, guidance=guidance, labels=labels)
        x = f(z.to(run.device) * sigma, sigma, Condition(labels=labels))
    return run.scaler.to_data(x)


class Stopwatch:
    """Seconds spent per named part (``with watch("network"): ...``), summed over repeats."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class EditTask:
    """One editing task as the front ends (``cmkit edit``, ``cmkit serve``) offer it: what it is
    called, what it takes besides the run, and the function that does it.

    image        takes input images (interpolation makes its frames from two seeds instead)
    mask         takes a mask (True = fill in)          factor  takes an upscaling factor
    sigma        takes the input noise's sigma          levels  takes noise levels (sigmas)
    steps        takes a number of levels of the default grid
    strength     takes a strength and a number of steps instead (image-to-image, `strength_levels`)
    variations   makes ``n`` variations per input from ``seed``
    grey_input   accepts grey inputs for an RGB model (colorization)
    """

    name: str
    help: str
    function: Callable
    image: bool = True
    mask: bool = False
    factor: bool = False
    sigma: bool = False
    levels: bool = True
    steps: bool = True
    strength: bool = False
    variations: bool = True
    grey_input: bool = False


TASKS = {task.name: task for task in (
    EditTask("inpaint", "fill the white pixels of a mask (or a box)", inpaint, mask=True),
    EditTask("colorize", "colour grey images (RGB models)", colorize, grey_input=True),
    EditTask("superres", "make --factor times larger images whose patch means are the input", superres, factor=True),
    EditTask("stroke", "turn a stroke painting into a realistic image (SDEdit)", stroke, steps=False,
             strength=True),
    EditTask("denoise", "remove Gaussian noise of a known --sigma", denoise, sigma=True, levels=False, steps=False,
             variations=False),
    EditTask("interpolate", "one-step samples along the great circle between two seeds' noises", interpolate,
             image=False, levels=False, steps=False, variations=False),
)}


def run_task(run, name: str, images: np.ndarray, *, mask=None, factor: int | None = None, sigma: float | None = None,
             n: int = 1, seed: int = 0, sigmas=None, steps: int | None = None, class_labels=None,
             guidance: float | None = None, **options) -> np.ndarray:
    """Run the image task ``name`` (`TASKS`) on uint8 ``images`` with what it takes of the rest
    (options it does not take are ignored; None means the task's default)."""
    if name not in TASKS or not TASKS[name].image:
        known = [t.name for t in TASKS.values() if t.image]
        raise CmkitError(f"unknown editing task {name!r}; tasks: {', '.join(known)}")
    task = TASKS[name]
    args = [images] + [value for wanted, value in ((task.mask, mask), (task.factor, factor), (task.sigma, sigma))
                       if wanted]
    options = {"class_labels": class_labels, "guidance": guidance, **options}  # a task's own (stroke: strength)
    if task.variations:
        options.update(n=n, seed=seed)
    if task.levels and sigmas is not None:
        options["sigmas"] = sigmas
    if (task.steps or task.strength) and steps is not None:
        options["steps"] = steps
    return task.function(run, *args, **options)
