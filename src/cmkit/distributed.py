"""Data-parallel training across the processes torchrun starts.

    torchrun --standalone --nproc_per_node=2 -m cmkit train ...

Every process builds the same model from the same seed, computes its shard of the global batch
(see batch_rng.py) and adds its gradients into one flat buffer that a single all-reduce averages.
That replaces DistributedDataParallel's backward hooks on purpose: the objectives call the online
network several times per step (online, stop-gradient target, replayed dropout) and the JVP ones
differentiate it with torch.func, which DDP's hooks do not follow. One all-reduce after backward
is exact for all of them; it gives up DDP's overlap of communication with backward, which is
small next to a consistency step's two to three network passes.

With identical gradients, optimizers, EMA and target updates, the weights stay identical on every
rank; `check_in_sync` verifies that at each checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .devices import resolve_device
from .errors import CmkitError


@dataclass(frozen=True)
class World:
    """This process's place among ``size`` training processes (size 1: no torch.distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this World joined the process group (and so leaves it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: str) -> str:
        """The device this rank trains on: ``requested`` (`cmkit.devices`), with a multi-process
        CUDA run putting each rank on cuda:LOCAL_RANK."""
        requested = resolve_device(requested, "train.device")
        if requested.startswith("cuda") and self.size > 1:
            torch.cuda.set_device(self.local_rank)
            return f"cuda:{self.local_rank}"
        return requested

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_(self, tensors) -> None:
        """Make rank 0's values everyone's."""
        if self.size > 1:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, src=0)

    def check_in_sync(self, modules: dict) -> None:
        """Raise if any module's weights differ between ranks (they must never drift apart)."""
        if self.size == 1:
            return
        sums = torch.stack([torch.stack([p.detach().double().sum() for p in m.state_dict().values()]).sum()
                            for m in modules.values()]).to(_comm_device())
        gathered = [torch.empty_like(sums) for _ in range(self.size)]
        dist.all_gather(gathered, sums)
        for other in gathered[1:]:
            if not torch.equal(other, gathered[0]):
                names = [n for n, a, b in zip(modules, gathered[0], other) if a != b]
                raise CmkitError(f"the ranks' {', '.join(names)} weights have drifted apart; this is a cmkit bug, "
                                 "please report it")


def _comm_device() -> torch.device:
    backend = dist.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def world_from_env(device: str = "auto") -> World:
    """The World torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK (a single process without
    them), joining the process group: NCCL for CUDA training, gloo on CPUs."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = resolve_device(device, "train.device").startswith("cuda")
    owns = not dist.is_initialized()  # a caller's script may have joined already
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(rank=rank, size=size, local_rank=local_rank, owns_group=owns)


def close(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def sum_gradients(world: World, params: list, extras: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``params`` over the ranks in one all-reduce (each rank's loss carries
    its 1/world-size share of the global mean), along with the per-rank numbers in ``extras``;
    returns the summed extras. A parameter a rank left without a gradient counts as zero there."""
    if world.size == 1:
        return extras
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + [extras.to(grads[0].device, grads[0].dtype)])
    world.all_reduce_sum_(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view(g.shape)
        offset += g.numel()
    return flat[offset:].to("cpu", extras.dtype)
