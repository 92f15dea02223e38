"""Randomness that does not depend on how a batch is split over processes or micro-batches.

A training step's global batch of G samples may be computed by one process in one pass, by W
processes, or in A accumulated micro-batches. Every per-sample draw (data indices, noise levels,
noise, flips, label dropout) is made for all G rows from a generator seeded by (seed, step); each
shard keeps its own rows. So shard r of a 2-process run sees exactly rows [r G/2, (r+1) G/2) of
what a 1-process run draws, and the runs agree to float rounding. Drawing G rows where G/W are
needed costs a few microseconds next to a network pass.

    rng = BatchRNG(generator, start=64, total=128)   # this shard: rows 64..127
    z = rng.randn(x0.shape)                            # x0 holds the shard's rows
"""

from __future__ import annotations

import numpy as np
import torch


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that is a function of (seed, step, stream) only, so a resumed run, any number
    of processes and any step order see the same randomness (stream 0: the batch; 1 + m: dropout of
    micro-batch m)."""
    words = np.random.SeedSequence([seed, step, stream]).generate_state(2, np.uint32)
    return (int(words[0]) << 31 | int(words[1]) >> 1) & (2**63 - 1)


class BatchRNG:
    """Draws for a global batch of ``total`` rows, of which this shard keeps ``[start, start + n)``
    (n: the size each draw asks for). ``total=None`` means the shard is the whole batch."""

    def __init__(self, generator: torch.Generator | None = None, start: int = 0, total: int | None = None):
        self.generator, self.start, self.total = generator, start, total

    def _rows(self, n: int) -> tuple[int, slice]:
        total = n if self.total is None else self.total
        if self.start + n > total:
            raise ValueError(f"a shard of {n} rows from {self.start} does not fit a batch of {total}")
        return total, slice(self.start, self.start + n)

    def randn(self, shape) -> torch.Tensor:
        total, rows = self._rows(shape[0])
        return torch.randn((total, *shape[1:]), generator=self.generator)[rows]

    def rand(self, n: int) -> torch.Tensor:
        total, rows = self._rows(n)
        return torch.rand(total, generator=self.generator)[rows]

    def randint(self, high: int, n: int) -> torch.Tensor:
        total, rows = self._rows(n)
        return torch.randint(0, high, (total,), generator=self.generator)[rows]

    def subset(self, fraction: float, n: int) -> tuple[torch.Tensor, int]:
        """(this shard's rows of a random subset of the global batch, the subset's global size):
        exactly int(fraction x total) rows, chosen without replacement; each row with probability
        ``fraction`` when that rounds to 0 (a batch too small for one)."""
        total, rows = self._rows(n)
        u = torch.rand(total, generator=self.generator)
        k = int(total * fraction)
        chosen = torch.zeros(total, dtype=torch.bool)
        if k:
            chosen[u.argsort()[:k]] = True
        else:
            chosen = u < fraction
        return chosen[rows], int(chosen.sum())

    def multinomial(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` indices drawn with replacement with probabilities ``probs``."""
        total, rows = self._rows(n)
        return torch.multinomial(probs, total, replacement=True, generator=self.generator)[rows]


def batch_rng(generator) -> BatchRNG:
    """A BatchRNG from what objectives accept: a BatchRNG, a torch.Generator or None (torch's global RNG)."""
    return generator if isinstance(generator, BatchRNG) else BatchRNG(generator)
