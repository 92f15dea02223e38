"""torch.compile for the training step: one compiled loss (every network pass, the teacher's ODE
step, the distance and weighting), whose backward AOTAutograd compiles with it.

What stays eager, and why:
- the random draws (`Objective.draw`): they come from CPU generators seeded per step so that the
  batch split over processes does not change them; they are cheap;
- the autograd JVP of sCM and MeanFlow: dynamo cannot trace forward-mode AD through the UNet
  (`cmkit.objectives.jvp`), so the step's graph breaks around it;
- restoring the dropout RNG between the target and online passes (``torch.set_rng_state`` is a
  graph break), so that both passes draw the same masks.

Inductor runs with ``fallback_random``: its random ops then draw from torch's RNG as eager code
does, which is what makes replaying the RNG state give the two passes the same dropout masks.
Compiled kernels are cached in ``TORCHINDUCTOR_CACHE_DIR``; unless it is set, a run keeps them in
its own directory (``compile_cache/``), so that a resumed run, on this machine or another, does
not compile again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import COMPILE_CACHE
from .devices import check_compile_mode

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"

_cache_set_by_cmkit: str | None = None  # the value this process put in CACHE_ENV, if any


def compile_loss(fn, mode: str = "default"):
    """``fn`` compiled with inductor in ``mode`` (its backward too, when it is differentiated), on
    its first call, so that building a trainer neither loads dynamo nor fixes the cache folder
    before the run directory is in place."""
    check_compile_mode(mode)
    compiled = None

    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            from torch._inductor import list_mode_options

            from .objectives.jvp import run_eager_under_compile
            run_eager_under_compile()
            # mode and options cannot both be given to torch.compile: the mode's options, plus ours.
            compiled = torch.compile(fn, options={**list_mode_options(mode), "fallback_random": True})
        return compiled(*args, **kwargs)
    return call


def use_run_cache(run_dir: str | Path) -> str:
    """Point inductor's cache at ``run_dir/compile_cache`` unless the user chose a place; return
    where the cache is. Call it once the run directory is in place: importing dynamo (diffusers
    does) creates the folder the variable names."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    global _cache_set_by_cmkit
    current = os.environ.get(CACHE_ENV)
    # Inductor writes its default into the variable when it first looks: that is not a choice.
    if current is not None and current not in (_cache_set_by_cmkit, os.path.abspath(default_cache_dir())):
        return current
    _cache_set_by_cmkit = os.environ[CACHE_ENV] = str(Path(run_dir).resolve() / COMPILE_CACHE)
    return _cache_set_by_cmkit
