"""Batches of a streamed data set (images decoded, or latent rows read from their shards), read
ahead in DataLoader worker processes.

The trainer's batch rows are a function of (seed, step, the process's share) only (batch_rng.py),
so they can be computed before the step: ``plan(step)`` yields this process's rows for each of its
micro-batches, a DataLoader decodes them in ``workers`` processes (pinned memory for a GPU), and
``take(rows)`` hands over the next batch after checking it is the one the step drew. A resume
starts the plan at its step: nothing before it is read again, and any process count reads the
rows it would have read in an unbroken run.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import CmkitError


def default_workers(processes_per_machine: int = 1) -> int:
    """Decoding processes for one training process: the cores it may use, less one for itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, processes_per_machine) - 1))


class _Rows(Dataset):
    """Rows of a `StreamedImages` or a `ShardedRows`: anything with ``read_row(i)`` giving (the row,
    how many replacements were made for it)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, row: int):
        return row, *self.rows.read_row(row)


class _Plan(Sampler):
    def __init__(self, plan: Callable[[int], Iterator[torch.Tensor]], start: int, stop: int):
        self.plan, self.start, self.stop = plan, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            for rows in self.plan(step):
                yield rows.tolist()

    def __len__(self) -> int:
        return 0  # unknown micro-batch count per step; DataLoader does not need it


def _collate(items):
    rows, images, bad = zip(*items)
    return torch.tensor(rows), torch.stack(images), sum(bad)


class PlannedBatches:
    """The batches ``plan`` names from ``start`` to ``stop`` (exclusive), decoded ahead;
    ``per_step``: the batches (micro-batches) the plan names for each step."""

    def __init__(self, rows, plan: Callable[[int], Iterator[torch.Tensor]], start: int,
                 stop: int, *, per_step: int = 1, workers: int, pin_memory: bool = False, prefetch: int = 4):
        self.start, self.per_step, self.taken = start, per_step, 0
        loader = DataLoader(_Rows(rows), batch_sampler=_Plan(plan, start, stop), num_workers=workers,
                            collate_fn=_collate, pin_memory=pin_memory,
                            prefetch_factor=prefetch if workers else None, persistent_workers=False)
        self._batches = iter(loader)

    def close(self) -> None:
        """Stop the worker processes now (idle ones left to the garbage collector were measured to
        slow this process down several times)."""
        self._batches = iter(())

    @property
    def next_step(self) -> int:
        """The step whose batch `take` returns next."""
        return self.start + self.taken // self.per_step

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(the next planned batch, how many of its rows were replacements for images that did not
        decode); ``rows`` must be the ones it read."""
        try:
            planned, batch, bad = next(self._batches)
        except StopIteration:
            raise CmkitError("the data loader ran past its planned steps") from None
        if not torch.equal(planned, rows.cpu()):
            raise RuntimeError("the data loader's batch is not the one the step drew (a plan out of step)")
        self.taken += 1
        return batch, bad
