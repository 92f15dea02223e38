"""Training objectives: small callables ``loss(net, x0, *, step, target, generator)`` returning
per-sample losses and a dict of values to log (the interface: `Objective`). Each objective's
module registers its method(s) (`MethodSpec`); importing this package registers them all, in the
order of the ``--method`` choices."""

from .base import Objective
from .edm import EDMLoss
from .consistency import (ConsistencyDistillationLoss, ConsistencyTrainingLoss, ct_num_levels,
                          ct_target_rate, teacher_step)
from .distances import PseudoHuber, l1, l2, make_distance
from .ict import ImprovedConsistencyTrainingLoss, ict_num_levels, lognormal_pair_probs
from .ect import EasyConsistencyTuningLoss, ect_r
from .scm import ContinuousConsistencyLoss, teacher_velocity, trigflow_F
from .tcm import TruncatedConsistencyLoss, TruncatedLogStudentT
from .meanflow import MeanFlowLoss
from .lcm import LatentConsistencyDistillationLoss
from .registry import MethodSpec, get_method, method_names, methods, register, unregister

__all__ = ["ConsistencyDistillationLoss", "ConsistencyTrainingLoss", "ContinuousConsistencyLoss",
           "EDMLoss", "EasyConsistencyTuningLoss", "ImprovedConsistencyTrainingLoss", "LatentConsistencyDistillationLoss",
           "MeanFlowLoss", "TruncatedConsistencyLoss", "TruncatedLogStudentT",
           "MethodSpec", "Objective", "PseudoHuber", "ct_num_levels", "ct_target_rate", "ect_r", "get_method",
           "ict_num_levels", "l1", "l2", "lognormal_pair_probs", "make_distance", "method_names", "methods",
           "register", "teacher_step", "teacher_velocity", "trigflow_F", "unregister"]
