"""A diffusers ``AutoencoderKL`` as the map between images and a latent model's units.

    codec = LatentCodec.from_folder("sd15/vae")
    z = codec.encode(images_uint8)       # (N, 4, H/8, W/8): (mean latent - shift) * scaling_factor
    images = codec.decode(z)             # (N, C, H, W) uint8

Latents are scaled by the VAE's ``scaling_factor`` (and shifted by ``shift_factor`` where the
config has one), as the pipelines do, so a latent model sees data of about unit scale. A cache is
encoded once, so it stores the posterior's mean: a sampled latent would freeze one draw of the
encoder's noise into every epoch anyway. The VAE runs in float32 unless the caller casts it.
Grey images through a colour VAE are repeated to three channels and decoded back to their mean.

A `PreviewCodec` does the same through a TAESD-style ``AutoencoderTiny`` (e.g. madebyollin/taesd):
a fast, approximate decoder for live previews, in the units diffusers' pipelines give it when it
replaces their ``vae`` (decode ``latents / scaling_factor + shift_factor``; encode
``(latents - shift_factor) * scaling_factor``, where ``latents`` is ``vae.encode(x).latents``).
TAESD's factors are 1.0 and 0.0: it takes and gives the SD-scaled latents a model works in.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import CmkitError
from .safe_io import file_sha256, read_json
from .text import refuse_pickles

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Where stderr is not a terminal (a log file, a pipe), a progress line this often in place of a bar:
# a bar redraws itself with carriage returns, which there make one endless line or nothing at all.
PROGRESS_LINE_SECONDS = 10.0


def _vae_class(folder: Path, wanted: str) -> str | None:
    """The ``_class_name`` in a VAE folder's config.json (None where it names none), refusing a
    folder without a config.json, or with one that is not a JSON object."""
    if not (folder / "config.json").is_file():
        raise CmkitError(f"{folder} has no config.json: not a diffusers {wanted} folder")
    config = read_json(folder / "config.json", "VAE config")
    if not isinstance(config, dict):
        raise CmkitError(f"{folder}/config.json is not a JSON object: not a diffusers {wanted} folder")
    name = config.get("_class_name")
    return name if isinstance(name, str) else None


class LatentCodec(nn.Module):
    """images (uint8, C channels) <-> latents (model units) through ``vae``."""

    what = "the VAE"  # how messages name it

    def __init__(self, vae: nn.Module, image_channels: int | None = None):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.vae_channels = int(config.in_channels)
        self.image_channels = image_channels or self.vae_channels
        if self.image_channels != self.vae_channels and not (self.image_channels == 1 and self.vae_channels == 3):
            raise CmkitError(f"{self.what} takes {self.vae_channels}-channel images, not {self.image_channels}-channel ones")
        self.factor = self._factor(config)
        self.latent_channels = int(config.latent_channels)

    @staticmethod
    def _factor(config) -> int:
        """How many pixels a latent cell covers along each side."""
        return 2 ** (len(config.block_out_channels) - 1)

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the VAE's own (unscaled) latents: the posterior's mean."""
        return self.vae.encode(x).latent_dist.mean

    @classmethod
    def from_folder(cls, folder: str | Path, image_channels: int | None = None) -> "LatentCodec":
        from diffusers import AutoencoderKL

        folder = Path(folder)
        if _vae_class(folder, "AutoencoderKL") == "AutoencoderTiny":
            raise CmkitError(f"{folder} holds an AutoencoderTiny (a TAESD-style preview decoder): cmkit uses one only "
                             "for live previews (cmkit serve --preview-vae); encode and decode with the full AutoencoderKL")
        refuse_pickles(folder, VAE_WEIGHTS)
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CmkitError(f"cannot load the VAE in {folder}: {str(e).splitlines()[0]}") from None
        return cls(vae.float(), image_channels)

    @staticmethod
    def fingerprint(folder: str | Path) -> str:
        """What identifies a VAE: the SHA-256 of its weights (a cache made with another is refused)."""
        return file_sha256(Path(folder) / VAE_WEIGHTS)

    def latent_shape(self, image_shape) -> tuple[int, int, int]:
        C, H, W = image_shape
        if H % self.factor or W % self.factor:
            raise CmkitError(f"the VAE downsamples by {self.factor}: images of {H}x{W} pixels do not divide; pass "
                             f"--resolution with a multiple of {self.factor}")
        return self.latent_channels, H // self.factor, W // self.factor

    def image_shape(self, latent_shape) -> tuple[int, int, int]:
        _, h, w = latent_shape
        return self.image_channels, h * self.factor, w * self.factor

    @torch.no_grad()
    def encode(self, images, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """(N, C, H, W) uint8 -> (N, c, h, w) float32 latents in model units."""
        out = [latents for _, latents in self.encode_batches(images, batch_size, progress)]
        return torch.cat(out) if out else torch.zeros(0, self.latent_channels, 1, 1)

    @torch.no_grad()
    def encode_batches(self, images, batch_size: int = 64, progress: bool = False):
        """(the images, their latents) one batch at a time. ``images``: a tensor, or anything
        indexed by a tensor of rows (a `cmkit.data.streams.StreamedImages` decodes only the batch in
        hand, so memory holds one batch of images)."""
        from tqdm.auto import tqdm

        device = next(self.vae.parameters()).device
        batches = range(0, len(images), batch_size)
        terminal = sys.stderr.isatty()
        began = last_line = time.monotonic()
        bar = tqdm(batches, desc="encode", unit="batch", disable=not (progress and terminal), dynamic_ncols=True)
        for done, start in enumerate(bar, 1):
            batch = images[torch.arange(start, min(start + batch_size, len(images)))]
            x = batch.to(device).float() / 127.5 - 1
            if x.shape[1] != self.vae_channels:
                x = x.expand(-1, self.vae_channels, -1, -1)
            latents = self._latents(x)
            yield batch, ((latents - self.shift_factor) * self.scaling_factor).float().cpu()
            now = time.monotonic()
            if progress and not terminal and now - last_line >= PROGRESS_LINE_SECONDS:
                print(f"encode: {done}/{len(batches)} batches, {now - began:.0f} s", file=sys.stderr, flush=True)
                last_line = now

    @torch.no_grad()
    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (float, the data's channels)."""
        dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode((latents / self.scaling_factor + self.shift_factor).to(dtype)).sample.float()
        return x.mean(1, keepdim=True) if self.image_channels != self.vae_channels else x


class PreviewCodec(LatentCodec):
    """A TAESD-style ``AutoencoderTiny`` in `LatentCodec`'s place: the same interface and units, a
    fraction of the full VAE's cost, approximate images (for live previews, never for eval).

    Its encoder gives latents directly (``.latents``, no posterior): diffusers' img2img takes them
    as they are (`retrieve_latents`), and so does this. Decoding applies the preview's own
    ``scaling_factor`` and ``shift_factor`` as a pipeline with it as ``vae`` does (TAESD's: 1.0
    and 0.0, so it decodes model units as they are)."""

    what = "the preview VAE"

    def __init__(self, vae: nn.Module, image_channels: int | None = None):
        config = vae.config
        if int(config.out_channels) != int(config.in_channels):
            raise CmkitError(f"the preview VAE takes {config.in_channels}-channel images but gives "
                             f"{config.out_channels}-channel ones; cmkit needs the same on both sides")
        super().__init__(vae, image_channels)

    @staticmethod
    def _factor(config) -> int:
        """The encoder's downsampling (a stride-2 convolution per block after the first), which
        must equal the decoder's upsampling (``upsampling_scaling_factor`` per block but the last).
        (diffusers' pipelines read ``block_out_channels``, the decoder's, and assume 2 per block.)"""
        down = 2 ** (len(config.encoder_block_out_channels) - 1)
        up = int(config.upsampling_scaling_factor) ** (len(config.decoder_block_out_channels) - 1)
        if down != up:
            raise CmkitError(f"the preview VAE's encoder downsamples by {down} but its decoder upsamples by {up}")
        return down

    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(x).latents

    @classmethod
    def from_folder(cls, folder: str | Path, image_channels: int | None = None) -> "PreviewCodec":
        """An ``AutoencoderTiny`` folder (config.json and safetensors weights, as diffusers'
        ``save_pretrained`` writes it), refusing anything else, pickled weights and missing ones."""
        from diffusers import AutoencoderTiny

        folder = Path(folder)
        name = _vae_class(folder, "AutoencoderTiny")
        if name != "AutoencoderTiny":
            raise CmkitError(f"{folder} holds {'an ' + name if name else 'no named model'}, not an AutoencoderTiny: a "
                             "preview VAE is a TAESD-style folder (e.g. madebyollin/taesd saved locally)")
        refuse_pickles(folder, VAE_WEIGHTS)
        # AutoencoderTiny writes ``block_out_channels`` into its own config (for the pipelines'
        # vae_scale_factor) and then warns, on every load, that its __init__ ignores it: noise.
        config_log = logging.getLogger("diffusers.configuration_utils")
        ignored = _Without("were passed to AutoencoderTiny, but are not expected")
        config_log.addFilter(ignored)
        try:
            vae, info = AutoencoderTiny.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False,
                                                        output_loading_info=True)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CmkitError(f"cannot load the preview VAE in {folder}: {str(e).splitlines()[0]}") from None
        finally:
            config_log.removeFilter(ignored)
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise CmkitError(f"the preview VAE in {folder} lacks {len(missing)} weights ({missing[0]}, ...): "
                             "its safetensors file does not match its config.json")
        return cls(vae.float(), image_channels)


class _Without(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class LatentScaler:
    """A latent run's data <-> model map (the ``standardizer`` of its config): model units are
    latents, data are the decoded images, (N, C, H, W) uint8."""

    def __init__(self, state: dict, codec: LatentCodec):  # or a PreviewCodec
        self.shape = tuple(state["shape"])  # the latents', what the model generates
        self.image_shape = tuple(state["image_shape"])
        self.codec = codec

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N, C, H, W) -> latents (the editing tasks' input)."""
        return self.codec.encode(images).to(next(self.codec.parameters()).device)

    def latent_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A pixel mask (N, 1, H, W; 1 = to fill) on the latent grid: a latent cell is filled when
        any pixel it covers is."""
        return torch.nn.functional.max_pool2d(mask.float(), self.codec.factor)

    def to_data(self, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        parts = [self.codec.decode_tensor(x[i:i + batch_size].to(next(self.codec.parameters()).device))
                 for i in range(0, len(x), batch_size)]
        images = torch.cat(parts).cpu()
        return ((images + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()

    @staticmethod
    def state_for(codec: LatentCodec, latent_shape, image_shape) -> dict:
        return {"kind": "latent", "shape": list(latent_shape), "image_shape": list(image_shape),
                "scaling_factor": codec.scaling_factor, "shift_factor": codec.shift_factor}
