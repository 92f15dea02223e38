"""The interface every training objective implements (EDM's small callable losses, made explicit).

    loss, logs = objective(net, x0, step=k, target=target_net, generator=rng, class_labels=y)

``net`` is the online model: a `cmkit.precond` wrapper, called as ``net(x, sigma, class_labels,
guidance=...)`` in EDM's sigma, or through the wrapper's other documented entry points when the
objective needs the network in its own time variable (``net.trigflow`` for sCM, ``net.velocity``
for MeanFlow). Objectives never reach into the wrapper's attributes, so whatever the trainer does
to the network (torch.compile of the backbone, bf16 autocast around the call, data parallelism)
applies to every objective alike.
"""

from __future__ import annotations

import abc

import torch


class Objective(abc.ABC):
    """A training loss.

    needs_target   the trainer keeps a target network (a copy of the online one), passed as
                   ``target`` and moved toward the online weights with ``target_rate(step)``
                   after each step (0 copies them)
    modules        extra trained modules (say a learned loss weighting): optimised with the
                   network and saved in every checkpoint under their names
    """

    needs_target: bool = False

    def target_rate(self, step: int) -> float:
        """EMA rate of the target network after training step ``step``."""
        return 0.0

    @property
    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    @abc.abstractmethod
    def __call__(self, net, x0: torch.Tensor, *, step: int = 0, target=None, generator=None,
                 class_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(per-sample losses (B,), values to log) for the clean batch ``x0`` at training step
        ``step``; every random draw comes from ``generator`` (`cmkit.batch_rng`)."""
