"""cmkit: consistency models -- teachers, distillation, training, sampling and evaluation."""

from .analytic import Gaussian, GaussianMixture
from .config import build_config, default_config
from .errors import CmkitError
from .guidance import GuidedDenoiser
from .noise import NoiseConfig, karras_sigmas
from .objectives import MethodSpec, Objective, methods
from .precond import ConsistencyFunction, EDMDenoiser
from .run import Run, load_run
from .sampling import sample_consistency, sample_euler, sample_heun
from .train import train

__version__ = "0.1.0"

__all__ = ["CmkitError", "ConsistencyFunction", "EDMDenoiser", "Gaussian", "GaussianMixture", "GuidedDenoiser",
           "MethodSpec", "NoiseConfig", "Objective", "Run", "build_config", "default_config", "karras_sigmas",
           "load_run", "methods", "sample_consistency", "sample_euler", "sample_heun", "train"]
