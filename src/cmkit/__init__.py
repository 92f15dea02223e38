"""cmkit: consistency models -- teachers, distillation, training, sampling and evaluation.

The public names below load on first use (PEP 562), so that `import cmkit` and `cmkit --help`
do not pay for importing torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Gaussian": "analytic", "GaussianMixture": "analytic",
    "build_config": "config", "default_config": "config",
    "CmkitError": "errors",
    "GuidedDenoiser": "guidance",
    "NoiseConfig": "noise", "karras_sigmas": "noise",
    "MethodSpec": "objectives", "Objective": "objectives", "methods": "objectives",
    "ConsistencyFunction": "precond", "EDMDenoiser": "precond",
    "Run": "run", "load_run": "run",
    "sample_consistency": "sampling", "sample_euler": "sampling", "sample_heun": "sampling",
    "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cmkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
