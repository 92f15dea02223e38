"""Zero-shot editing with a consistency model (or a teacher's ODE flow map): one routine, `edit`,
over invertible linear operators, and the tasks built on it."""

from .algorithm import edit, fit_range, flow_map, project, slerp
from .operators import (LUMA, ChannelMix, Identity, LinearOperator, PatchOrthogonal, check_invertible,
                        orthogonal_with_first_column)
from .tasks import (STROKE_SIGMAS, TASKS, EditTask, colorize, consistency_function, default_edit_sigmas, denoise,
                    inpaint, interpolate, run_task, seed_noise, stroke, superres)

__all__ = ["edit", "fit_range", "flow_map", "project", "slerp", "LUMA", "ChannelMix", "Identity", "LinearOperator",
           "PatchOrthogonal", "check_invertible", "orthogonal_with_first_column", "STROKE_SIGMAS", "TASKS", "EditTask",
           "colorize", "run_task",
           "consistency_function", "default_edit_sigmas", "denoise", "inpaint", "interpolate", "seed_noise", "stroke",
           "superres"]
