"""Training objectives: small callables ``loss(net, x0, *, step, target, generator)`` returning
per-sample losses and a dict of values to log. ``needs_target`` says whether the trainer keeps a
target network, updated with ``target_rate(step)``."""

from .consistency import (ConsistencyDistillationLoss, ConsistencyTrainingLoss, ct_num_levels,
                          ct_target_rate, teacher_step)
from .distances import PseudoHuber, l1, l2, make_distance
from .ect import EasyConsistencyTuningLoss, ect_r
from .edm import EDMLoss
from .ict import ImprovedConsistencyTrainingLoss, ict_num_levels, lognormal_pair_probs
from .meanflow import MeanFlowLoss
from .scm import ContinuousConsistencyLoss, teacher_velocity, trigflow_F

__all__ = ["ConsistencyDistillationLoss", "ConsistencyTrainingLoss", "ContinuousConsistencyLoss",
           "EDMLoss", "EasyConsistencyTuningLoss", "ImprovedConsistencyTrainingLoss", "MeanFlowLoss",
           "PseudoHuber", "ct_num_levels", "ct_target_rate", "ect_r", "ict_num_levels", "l1", "l2",
           "lognormal_pair_probs", "make_distance", "teacher_step", "teacher_velocity", "trigflow_F"]
