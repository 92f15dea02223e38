"""The interface every training objective implements (EDM's small callable losses, made explicit).

    loss, logs = objective(net, x0, step=k, target=target_net, generator=rng, condition=c)

is two calls, which the trainer makes separately so that it can compile the second:

    draws = objective.draw(x0, step=k, generator=rng, condition=c)   # every random number, eager
    loss, logs = objective.loss(net, x0, draws, target=target_net, condition=c)  # tensors only

``draw`` makes the step's random draws from the batch generator (`cmkit.batch_rng`, so that they do
not depend on how the batch is split over processes) and turns the training step into tensors
(a curriculum's grid, a warm-up factor). ``loss`` is then plain tensor code: no generator, no
Python number that changes from step to step, no ``.item()``; its logs are tensors. That is what
lets ``torch.compile`` trace it once, with the backward pass, as one graph per network pass group.

``net`` is the online model: a `cmkit.precond` wrapper, called as ``net(x, sigma, condition)`` in
EDM's sigma (``condition``: the batch's `cmkit.condition.Condition`, passed through unopened; a
guided objective adds its ``guidance`` kind), or through the wrapper's other documented entry points when the
objective needs the network in its own time variable (``net.trigflow`` for sCM, ``net.velocity``
for MeanFlow). Objectives never reach into the wrapper's attributes, so whatever the trainer does
(torch.compile, bf16 autocast around the call, data parallelism) applies to every objective alike.
"""

from __future__ import annotations

import abc

import torch

from ..condition import Condition


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

    def step_logs(self, step: int) -> dict:
        """Values of the schedule at training step ``step`` worth logging (a grid size, a stage)."""
        return {}

    @abc.abstractmethod
    def draw(self, x0: torch.Tensor, *, step: int = 0, generator=None,
             condition: Condition | None = None) -> dict[str, torch.Tensor]:
        """Every random draw of one step for the clean batch ``x0`` (on ``x0``'s device), from
        ``generator``, and whatever of the schedule at ``step`` the loss needs, as tensors."""

    @abc.abstractmethod
    def loss(self, net, x0: torch.Tensor, draws: dict[str, torch.Tensor], *, target=None,
             condition: Condition | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(per-sample losses (B,), tensors to log) for ``x0`` and the step's ``draws``."""

    def __call__(self, net, x0: torch.Tensor, *, step: int = 0, target=None, generator=None,
                 condition: Condition | None = None) -> tuple[torch.Tensor, dict]:
        """``loss`` on fresh ``draw``s, with the logs as numbers."""
        draws = self.draw(x0, step=step, generator=generator, condition=condition)
        loss, logs = self.loss(net, x0, draws, target=target, condition=condition)
        return loss, {**self.step_logs(step), **{k: float(v) for k, v in logs.items()}}
