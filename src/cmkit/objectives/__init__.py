"""Training objectives: small callables ``loss(net, x0, *, step, target, generator)`` returning
per-sample losses and a dict of values to log. ``needs_target`` says whether the trainer keeps a
target network, updated with ``target_rate(step)``."""

from .consistency import (ConsistencyDistillationLoss, ConsistencyTrainingLoss, ct_num_levels,
                          ct_target_rate, teacher_step)
from .distances import PseudoHuber, l1, l2, make_distance
from .edm import EDMLoss

__all__ = ["ConsistencyDistillationLoss", "ConsistencyTrainingLoss", "EDMLoss", "PseudoHuber",
           "ct_num_levels", "ct_target_rate", "l1", "l2", "make_distance", "teacher_step"]
