"""Shared dropout masks between two forward passes (iCT, ECT, sCM, MeanFlow).

Dropout draws from torch's global RNG of the device the network runs on. Replaying that state
before the second pass gives it the first pass's masks (same input shapes assumed), which is what
the references mean by "the same dropout RNG for the online and target passes".
"""

from __future__ import annotations

import torch


class SharedRNG:
    """``rng = SharedRNG(device)`` records the RNG state; ``rng.replay()`` restores it."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def replay(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)
