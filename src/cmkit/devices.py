"""Which device a command runs on: one rule for training, sampling, evaluation, editing and serving
(and, for training, how it compiles for it).

``auto`` takes a CUDA GPU when there is one, else Apple's MPS where torch has it, else the CPU. A
device asked for by name that this machine lacks is an error, never a silent fallback.
"""

from __future__ import annotations

import re

import torch

from .errors import CmkitError

DEVICE_NAMES = "cpu, cuda, cuda:N, mps or auto"
# torch.compile's modes. "reduce-overhead" adds CUDA graphs (static shapes: a fixed batch size,
# which training has); the max-autotune modes benchmark kernel choices (slow to compile).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def check_compile_mode(mode) -> str:
    if mode not in COMPILE_MODES:
        raise CmkitError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_device_name(name, what: str = "--device") -> str:
    """``name`` if it names a device at all (whether this machine has it is `resolve_device`'s)."""
    if not isinstance(name, str) or not (name in ("cpu", "cuda", "mps", "auto") or re.fullmatch(r"cuda:\d+", name)):
        raise CmkitError(f"{what} must be {DEVICE_NAMES}, got {name!r}")
    return name


def resolve_device(name: str, what: str = "--device") -> str:
    """The device ``name`` means on this machine."""
    check_device_name(name, what)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CmkitError(f"{what} is {name!r} but no CUDA device is available (use cpu or auto)")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise CmkitError(f"{what} is {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not mps_available():
        raise CmkitError(f"{what} is 'mps' but torch has no MPS device here (use cpu or auto)")
    return name
