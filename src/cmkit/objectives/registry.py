"""The method registry: one `MethodSpec` per training method, defined next to its objective.

Everything the rest of cmkit asks about a method is read from its spec: the command line's
``--method`` choices and help, the config defaults (``configs/<name>.json`` over
``configs/base.json``), the trainer (the objective, the derived config values, ``--teacher`` and
``--init``), `cmkit.Run` (the model wrapper, how it samples), export and serve. No other module
names a method. Adding one is an objective file that ends with ``register(MethodSpec(...))``, a
config file and tests (docs/design.md, "How to add a method").
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import CmkitError
from ..noise import NoiseConfig
from ..precond import ConsistencyFunction, VPConsistencyFunction
from .base import Objective


CONSISTENCY_FUNCTIONS = (ConsistencyFunction, VPConsistencyFunction)  # the pipelines' parametrizations


def _same(config: dict) -> dict:
    return config


@dataclass(frozen=True)
class MethodSpec:
    """What a training method is.

    name         the ``--method`` value, and the name in run directories' config.json
    summary      one line for ``cmkit train --help`` and docs/methods.md
    source       the paper the formulas come from
    objective    the objective class (`Objective`)
    wrapper      the preconditioning module around the backbone (`cmkit.precond`); its class
                 decides what a trained run is: a denoiser or a consistency function
    build        (resolved config, teacher model or None) -> the objective (`Objective`)
    resolve      config -> a new config with the method's derived values filled in (say a
                 curriculum's horizon); called once before training, never edits its argument
    diffusion    a diffusion teacher: sampled with an ODE solver (Heun/Euler), the source of
                 ``--teacher`` and ``--init``; otherwise a consistency model (1 network call per step)
    teacher      needs ``--teacher`` (a diffusion run), and takes its model, noise range and data
                 units from it (the config has no ``model``/``noise`` sections)
    init         accepts ``--init`` (a diffusion run whose weights it starts from)
    frozen_init  continues a consistency model: ``--init`` is required and names a consistency
                 run, whose weights the network starts from and whose parametrization (wrapper) it
                 keeps (so ``wrapper`` is only the usual one); that run's model, frozen, is what
                 ``build`` gets in place of a teacher (TCM's stage-1 model)
    sampling_floor  config -> the lowest noise level the network was trained at, when above
                 sigma_min (TCM's transition level): default few-step levels stay at or above it
    starts_from_teacher  with a teacher and no ``--init``, start from the teacher's weights
    guided       can distill classifier-free guidance (``--guidance LO,HI``)
    time_derivative  differentiates the network along the noise level (JVP)
    whole_table  from a VP (diffusers DDPM) teacher, trains on its whole noise table, as its
                 grid is the table's own (otherwise students stop at discrete_vp.STUDENT_SIGMA_MAX)
    latent_only  trains latent models only (LoRA adapters on a Stable-Diffusion --teacher): its runs
                 export to diffusers, never to ONNX, which writes pixel-space generators
    nullable     types of the method's config keys whose default is null
    config       the defaults file (default: the packaged ``configs/<name>.json``)
    """

    name: str
    summary: str
    source: str
    objective: type
    wrapper: type[nn.Module]
    build: Callable
    resolve: Callable[[dict], dict] = _same
    diffusion: bool = False
    teacher: bool = False
    init: bool = False
    starts_from_teacher: bool = False
    guided: bool = False
    time_derivative: bool = False
    whole_table: bool = False
    latent_only: bool = False
    frozen_init: bool = False
    sampling_floor: Callable[[dict], float] | None = None
    # The teacher as a view of the student's own network (LCM-LoRA: the base UNet with its adapters
    # off), built from (student, config) instead of loaded: one copy of the weights in memory.
    teacher_view: Callable | None = None
    nullable: dict = field(default_factory=dict)
    config: Path | None = None

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", self.name):
            raise ValueError(f"a method name is lower-case letters, digits, '-' and '_', got {self.name!r}")
        if not (isinstance(self.objective, type) and issubclass(self.objective, Objective)):
            raise ValueError(f"method {self.name}: objective must be an Objective subclass, got {self.objective!r}")
        if not (isinstance(self.wrapper, type) and issubclass(self.wrapper, nn.Module)):
            raise ValueError(f"method {self.name}: wrapper must be a torch module class, got {self.wrapper!r}")
        if self.diffusion and (self.teacher or self.init):
            raise ValueError(f"method {self.name}: a diffusion teacher takes no --teacher or --init")
        if self.starts_from_teacher and not self.teacher:
            raise ValueError(f"method {self.name}: starts_from_teacher needs teacher=True")
        if self.frozen_init and (self.teacher or not self.init):
            raise ValueError(f"method {self.name}: frozen_init needs init=True and no teacher")

    @property
    def export_formats(self) -> tuple[str, ...]:
        """How a trained run exports: ONNX for every pixel-space consistency model, a diffusers
        ConsistencyModelPipeline for those with its boundary-condition parametrization (a
        ``frozen_init`` method: as its --init run, `export_formats`)."""
        return _formats(self.diffusion, self.wrapper, self.latent_only)

    def defaults_file(self) -> str:
        """The method's defaults as text."""
        if self.config is not None:
            return Path(self.config).read_text()
        return resources.files("cmkit").joinpath("configs", f"{self.name}.json").read_text()


_METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (a second spec of the same name is an error)."""
    if spec.name in _METHODS and _METHODS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a method (for tests that register a throwaway one)."""
    _METHODS.pop(name, None)


def methods() -> dict[str, MethodSpec]:
    """Every registered method, by name, in registration order."""
    return dict(_METHODS)  # cmkit.objectives imports every built-in objective, which registers it


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def get_method(name: str) -> MethodSpec:
    """The spec of ``name``; an unknown name is a one-line error listing the known ones."""
    known = methods()
    if name not in known:
        import difflib
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CmkitError(f"unknown method {name!r}{hint}; known: {', '.join(known)}")
    return known[name]


def _formats(diffusion: bool, wrapper: type, latent_only: bool) -> tuple[str, ...]:
    if diffusion:
        return ()
    pipeline = ("diffusers",) if issubclass(wrapper, CONSISTENCY_FUNCTIONS) else ()
    return pipeline + (() if latent_only else ("onnx",))


def network_wrapper(config: dict) -> type[nn.Module]:
    """The preconditioning a run's network has: its method's wrapper, or for a method that
    continues a consistency run (``frozen_init``) that run's (``init_method``, recorded when the
    run starts)."""
    spec = get_method(config["method"])
    if not spec.frozen_init:
        return spec.wrapper
    if not config.get("init_method"):
        raise CmkitError(f"this {spec.name} run's config.json does not say what its --init run was (init_method)")
    return get_method(config["init_method"]).wrapper


def export_formats(config: dict) -> tuple[str, ...]:
    """How the run ``config`` describes exports (`MethodSpec.export_formats`, with its network's wrapper)."""
    spec, wrapper = get_method(config["method"]), network_wrapper(config)
    latent_only = spec.latent_only or (spec.frozen_init and get_method(config["init_method"]).latent_only)
    return _formats(spec.diffusion, wrapper, latent_only)


def noise_config(config: dict) -> NoiseConfig:
    """The run's noise range (its ``noise`` section)."""
    return NoiseConfig(**config["noise"])


def objective_options(config: dict, *drop: str) -> dict:
    """The ``objective`` section as keyword arguments, less ``drop``."""
    return {k: copy.deepcopy(v) for k, v in config["objective"].items() if k not in drop}


def with_objective(config: dict, **values) -> dict:
    """A copy of ``config`` with ``values`` set in its objective section."""
    out = copy.deepcopy(config)
    out["objective"].update(values)
    return out


def fix_horizon(config: dict) -> dict:
    """A curriculum's horizon ``objective.total_steps`` (null: the run's length), fixed in the
    saved config so that a resume with another ``--steps`` keeps it."""
    horizon = config["objective"]["total_steps"]
    return with_objective(config, total_steps=horizon or config["train"]["steps"])


def methods_table() -> str:
    """The registry as the Markdown table docs/methods.md shows (a test keeps them equal)."""
    rows = ["| method | what it is | starts from | objective | network | samples with | exports |",
            "|---|---|---|---|---|---|---|"]
    for name, spec in methods().items():
        init = "`--init` (a consistency run)" if spec.frozen_init else "`--init` (optional)" if spec.init else ""
        needs = ["`--teacher`" if spec.teacher else "", init]
        network = "its `--init` run's" if spec.frozen_init else f"`{spec.wrapper.__name__}`"
        exports = "as its `--init` run" if spec.frozen_init else ", ".join(spec.export_formats) or "-"
        rows.append(f"| `{name}` | {spec.summary} | {' + '.join(n for n in needs if n) or 'data'} "
                    f"| `{spec.objective.__name__}` "
                    f"| {network} | {'Heun/Euler ODE steps' if spec.diffusion else 'consistency steps'} "
                    f"| {exports} |")
    return "\n".join(rows) + "\n"

