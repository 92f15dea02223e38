"""Image geometry shared by the in-memory and the streamed readers: array layouts to (N, C, H, W)
and the fit to ``data.resolution``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CmkitError

FITS = ("pad", "resize")


def to_nchw(arr: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); NHWC -> NCHW; NCHW stays. Only uint8 with 1 or 3 channels."""
    if arr.dtype != np.uint8:
        raise CmkitError(f"{name}: images must be uint8 (0..255), got {arr.dtype}; convert with "
                         "np.clip(x, 0, 255).astype(np.uint8) (vector data must have shape (N, D))")
    if arr.ndim == 3:
        return arr[:, None]
    if arr.ndim != 4:
        raise CmkitError(f"{name}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {arr.shape}")
    last, first = arr.shape[3] in (1, 3), arr.shape[1] in (1, 3)
    if last and (not first or arr.shape[1] == arr.shape[2]):
        return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))
    if first:
        return arr
    raise CmkitError(f"{name}: cannot find a channel axis of size 1 or 3 in shape {arr.shape} "
                     "(RGBA: drop the alpha channel)")


def fit_resolution(images: torch.Tensor, resolution: int | None, fit: str = "pad") -> torch.Tensor:
    """Make (N, C, H, W) uint8 images square at ``resolution``: ``pad`` centres them on a black
    canvas (Fashion-MNIST 28 -> 32, as the CM and EDM papers pad MNIST-like data), ``resize``
    centre-crops to a square and resamples (bilinear, antialiased)."""
    if fit not in FITS:
        raise CmkitError(f"data.fit must be one of {', '.join(FITS)}, got {fit!r}")
    h, w = images.shape[2:]
    if resolution is None:
        if h != w:
            raise CmkitError(f"images are {h}x{w}, not square: set --set data.resolution=N")
        return images
    if resolution < 4:
        raise CmkitError(f"data.resolution must be at least 4, got {resolution}")
    if (h, w) == (resolution, resolution):
        return images
    if fit == "pad":
        if max(h, w) > resolution:
            raise CmkitError(f"cannot pad {h}x{w} images to {resolution}: use --set data.fit=resize")
        top, left = (resolution - h) // 2, (resolution - w) // 2
        return F.pad(images, (left, resolution - w - left, top, resolution - h - top))
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[:, :, top:top + side, left:left + side]
    out = []
    for chunk in square.split(1024):
        out.append(F.interpolate(chunk.float(), size=(resolution, resolution), mode="bilinear",
                                 antialias=True, align_corners=False).round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)
