"""What the server computes, without HTTP: requests checked against the limits and turned into
work (generations that can share a network call, editing and interpolation calls that run alone).

Work holds only the request: a generation draws its noise when its batch runs, from its own seed,
exactly as `cmkit sample --seed S` does (starting noise, then one re-noising draw per later level).
So a waiting request costs a few bytes, not a batch of noise, and its images do not depend on
which other requests shared its network call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch

from ..condition import Condition
from ..editing import tasks
from ..errors import CmkitError
from ..sampling import sample_levels
from ..text import check_prompt
from ..validate import check_float, check_int, check_seed

EDIT_TASKS = tuple(name for name, task in tasks.TASKS.items() if task.image)  # interpolation has its own endpoint


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (exposed at /api/info)."""

    max_n: int = 64
    max_steps: int = 8  # consistency steps per sample
    max_teacher_steps: int = 40  # Heun steps of an EDM teacher
    max_edit_steps: int = 40
    max_frames: int = 32
    max_upload_bytes: int = 4 * 2**20  # per uploaded file
    max_upload_pixels: int = 2**22  # 2048 x 2048: decoding is refused above this, before it starts
    max_json_bytes: int = 64 * 2**10  # a generation request is a few hundred bytes
    max_live_sessions: int = 32  # open live (WebSocket) connections
    max_live_rate: float = 240.0  # messages per second on one live connection (bursts of a second's worth)

    def body_bytes(self, multipart: bool) -> int:
        """The largest request body: two uploads and their fields for editing, else JSON."""
        return 2 * self.max_upload_bytes + self.max_json_bytes if multipart else self.max_json_bytes


@dataclass(frozen=True)
class Generation:
    levels: torch.Tensor
    seed: int
    n: int
    labels: torch.Tensor | None
    guidance: float | None
    prompt: str | None = None  # a text-conditioned model's (checked; "" is the empty prompt)
    preview: bool = False  # decode with the run's preview VAE (live frames)
    watch: tasks.Stopwatch = field(default_factory=tasks.Stopwatch, compare=False, repr=False)  # its group's times


def check_finite(x: torch.Tensor, guidance) -> None:
    """Refuse a result that is not a number (a huge guidance scale overflows the model)."""
    if not bool(torch.isfinite(x).all()):
        hint = f" at guidance {guidance:g}: use a smaller scale" if guidance is not None else ""
        raise CmkitError(f"the model produced values that are not finite (NaN or inf){hint}")


@dataclass(frozen=True)
class Edit:
    """A checked editing request, waiting for its uploads (``size``: what they are resized to)."""

    task: str
    size: tuple[int, int]
    grey: bool
    needs_mask: bool
    options: dict


PROMPT_CACHE = 256  # prompt embeddings kept: real-time typing resends the same prompts


class Engine:
    def __init__(self, run, limits: Limits = Limits()):
        self.run, self.limits = run, limits
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()

    def _prompt(self, prompt) -> str | None:
        """A request's prompt, checked (`cmkit.text.check_prompt`): "" when a text model gets none."""
        if not self.run.takes_text:
            if prompt is not None:
                raise CmkitError("this model takes no prompt")
            return None
        try:
            return check_prompt("" if prompt is None else prompt)
        except ValueError as e:
            raise CmkitError(str(e)) from None

    def _embedding(self, prompt: str, watch: tasks.Stopwatch | None = None) -> torch.Tensor:
        """(1, L, D) embedding of a checked prompt, from a small LRU cache (worker thread)."""
        if prompt in self._embeddings:
            self._embeddings.move_to_end(prompt)
        else:
            with watch("text") if watch is not None else nullcontext():
                self._embeddings[prompt] = self.run.text_condition(prompt, 1).text
            if len(self._embeddings) > PROMPT_CACHE:
                self._embeddings.popitem(last=False)
        return self._embeddings[prompt]

    def _labels_and_guidance(self, class_spec, n: int, seed: int, guidance):
        guidance = None if guidance is None else check_float("guidance", guidance, 0)
        labels = self.run.labels(class_spec, n, seed)
        self.run.network(guidance, labels)  # checks the guidance request now, not in the worker
        return labels, guidance

    def generation(self, *, n, seed, steps, sigmas, class_spec, guidance, prompt=None,
                   preview: bool = False) -> tuple[tuple, Generation]:
        """(batching key, work) for one generation request."""
        run, limits = self.run, self.limits
        n = check_int("n", n, 1, limits.max_n)
        seed = check_seed(seed)
        cap = limits.max_teacher_steps if run.is_diffusion else limits.max_steps
        if steps is not None:
            steps = check_int("steps", steps, 1, cap)
        if sigmas is not None and not 1 <= len(sigmas) <= cap:
            raise CmkitError(f"give 1 to {cap} sigmas, got {len(sigmas)}")
        levels = run.sigmas_for(steps, sigmas)  # noise.check_sigmas: finite, positive, decreasing, in range
        labels, guidance = self._labels_and_guidance(class_spec, n, seed, guidance)
        preview = preview and self.preview is not None
        key = ("generate", tuple(levels.tolist()), guidance, preview)
        return key, Generation(levels, seed, n, labels, guidance, self._prompt(prompt), preview)

    @property
    def preview(self):
        """The run's preview VAE (a scaler), if it has one: live frames decode with it."""
        return getattr(self.run, "preview", None)

    def stroke(self, *, seed, strength, steps, class_spec, guidance, prompt=None, preview: bool = False) -> tuple:
        """(checked options, call maker) of a live canvas frame: stroke editing (SDEdit; for a
        latent model image-to-image through its VAE, with a text model's prompt) of one canvas."""
        run, limits = self.run, self.limits
        if not run.is_image:
            raise CmkitError("the canvas needs an image model")
        seed = check_seed(seed)
        strength = check_float("strength", strength, 0.01, 1)
        steps = check_int("steps", steps, 1, limits.max_steps)
        if class_spec is None and run.num_classes and not run.has_null_label:
            raise CmkitError("this model is class-conditional and has no unconditional label: send a class")
        _, guidance = self._labels_and_guidance(class_spec, 1, seed, guidance)
        prompt = self._prompt(prompt)
        scaler = self.preview if preview else None
        levels = run.sigmas_for(sigmas=tasks.strength_levels(run, strength, steps))  # checked, on the table
        levels = levels[levels > 0].tolist()  # a teacher's Heun grid ends at 0; editing's levels do not

        def call(picture: np.ndarray, watch: tasks.Stopwatch):
            text = None if prompt is None else self._embedding(prompt, watch)
            return tasks.stroke(run, picture, sigmas=levels, seed=seed, class_labels=class_spec, guidance=guidance,
                                text=text, scaler=scaler, watch=watch)
        return call

    def interpolation(self, *, seed_a, seed_b, frames, class_spec, guidance):
        """A call computing ``frames`` images between two seeds' samples."""
        if self.run.is_latent:
            raise CmkitError("interpolation works on pixel-space models; this one generates latents")
        seed_a, seed_b = check_seed(seed_a, "seed_a"), check_seed(seed_b, "seed_b")
        frames = check_int("frames", frames, 2, self.limits.max_frames)
        guidance = None if guidance is None else check_float("guidance", guidance, 0)
        return partial(tasks.interpolate, self.run, seed_a, seed_b, frames, class_labels=class_spec,
                       guidance=guidance)

    def edit(self, task: str, *, seed, steps, n, class_spec, guidance, factor, sigma) -> Edit:
        """Check an editing request before its uploads are decoded."""
        run, limits = self.run, self.limits
        if task not in EDIT_TASKS:
            raise CmkitError(f"unknown task {task!r}; tasks: {', '.join(EDIT_TASKS)}")
        if not run.is_image:
            raise CmkitError("editing needs an image model")
        if run.is_latent and task not in tasks.LATENT_TASKS:
            raise CmkitError(f"{task} works on pixel-space models; this one generates latents (it takes "
                             f"{' and '.join(tasks.LATENT_TASKS)})")
        spec = tasks.TASKS[task]
        n = check_int("n", n, 1, limits.max_n)
        seed = check_seed(seed)
        steps = None if steps is None else check_int("steps", steps, 1, limits.max_edit_steps)
        c, h, w = run.image_shape
        size = (h, w)
        if spec.factor:
            factor = check_int("factor", factor, 2, h)
            if h % factor or w % factor:
                raise CmkitError(f"factor must divide the model's size {h}x{w}, got {factor}")
            size = (h // factor, w // factor)  # the upload is the low-resolution image
        if spec.sigma:
            lo, hi = run.noise_range.sigma_min, run.noise_range.sigma_max
            sigma = check_float("sigma", sigma, lo, hi)
        if class_spec is None and run.num_classes and not run.has_null_label:
            raise CmkitError("this model is class-conditional and has no unconditional label: send the class "
                             "field (an index or a name) with the image")
        labels, guidance = self._labels_and_guidance(class_spec, n, seed, guidance)
        return Edit(task, size, grey=c == 1 and not spec.grey_input, needs_mask=spec.mask,
                    options=dict(factor=factor, sigma=sigma, n=n, seed=seed, steps=steps, class_labels=class_spec,
                                 guidance=guidance))

    def decode_picture(self, source, what: str, size: tuple[int, int], grey: bool) -> np.ndarray:
        """(1, C, H, W) uint8 at ``size`` from an uploaded PNG/JPEG (a binary file or bytes; a
        worker thread runs this): allow-listed formats, pixels capped before decoding."""
        import io

        from PIL import Image

        from ..safe_io import read_image
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        arr = read_image(source, name=what, mode="L" if grey else "RGB", max_pixels=self.limits.max_upload_pixels)
        if arr.shape[:2] != tuple(size):
            arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
        return (arr[None, None] if arr.ndim == 2 else arr.transpose(2, 0, 1)[None]).copy()

    def edit_call(self, edit: Edit, picture: np.ndarray, mask: np.ndarray | None):
        """The call running a checked edit on its decoded uploads ((1, C, H, W) uint8 and (H, W) bool)."""
        return partial(tasks.run_task, self.run, edit.task, picture, mask=mask, **edit.options)

    @torch.inference_mode()
    def run_group(self, work: list) -> list:
        """Compute a group of compatible jobs: generations in one batch (each drawing its own noise
        from its seed), anything else (calls) one by one."""
        if not isinstance(work[0], Generation):
            return [job() for job in work]
        run, first = self.run, work[0]
        levels = first.levels
        noise, renoise = [], [[] for _ in levels[1:]] if not run.is_diffusion else []
        for w in work:
            gen = torch.Generator().manual_seed(w.seed)
            noise.append(torch.randn(w.n, *run.shape, generator=gen))
            for draws in renoise:
                draws.append(torch.randn(w.n, *run.shape, generator=gen))
        noise = torch.cat(noise).to(run.device)
        renoise = [torch.cat(draws).to(run.device) for draws in renoise] or None
        labels = None if first.labels is None else torch.cat([w.labels for w in work]).to(run.device)
        watch = first.watch
        text = None
        if run.takes_text:
            text = torch.cat([self._embedding(w.prompt, watch).expand(w.n, -1, -1) for w in work]).to(run.device)
        model = run.network(first.guidance, labels)
        levels = levels.to(run.device)
        with watch("network"):
            x = sample_levels(model, noise * levels[0], levels, Condition(labels=labels, text=text),
                              diffusion=run.is_diffusion, sigma_min=run.noise_range.sigma_min, noises=renoise)
        check_finite(x, first.guidance)
        with watch("decode"):
            data = (self.preview if first.preview else run.scaler).to_data(x.float().cpu())
        for w in work[1:]:
            w.watch.seconds.update(watch.seconds)
        return list(np.split(data, np.cumsum([w.n for w in work])[:-1]))
