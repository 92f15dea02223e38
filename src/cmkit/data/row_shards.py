"""Tensors too large for memory, stored as row shards: safetensors files each holding a run of rows.

    writer = ShardWriter(folder, "train", row_bytes, shard_mb=256)
    writer.add(latents=batch)            # any number of batches; a shard is written when full
    shards = writer.close()              # [{"file", "rows", "sha256"}, ...] for the index
    rows = ShardedRows(folder, shards, "latents")
    rows[torch.tensor([5, 70000, 3])]     # reads those rows only (safetensors slices of a mapped file)

`ShardedRows` is indexed like the tensor it stands for, so training (`data.loader.PlannedBatches`
reads rows ahead in worker processes), eval and the encoder's own checks use either one.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
from pathlib import Path

import torch

from ..errors import CmkitError
from ..safe_io import file_sha256


class ShardWriter:
    """Batches of rows (one or more named tensors, the same rows each) written to
    ``{prefix}-00000.safetensors`` and on, each at most ``shard_mb`` (at least one row)."""

    def __init__(self, folder: Path, prefix: str, row_bytes: int, shard_mb: float):
        self.folder, self.prefix = Path(folder), prefix
        self.rows_per_shard = max(1, int(shard_mb * 2**20) // max(1, row_bytes))
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_rows = 0
        self.shards: list[dict] = []

    def add(self, **tensors: torch.Tensor) -> None:
        counts = {len(t) for t in tensors.values()}
        if len(counts) != 1:
            raise ValueError(f"batches of different lengths: {counts}")
        for name, t in tensors.items():
            self.pending.setdefault(name, []).append(t.contiguous())
        self.pending_rows += counts.pop()
        while self.pending_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        from safetensors.torch import save_file

        whole = {name: torch.cat(parts) for name, parts in self.pending.items()}
        path = self.folder / f"{self.prefix}-{len(self.shards):05d}.safetensors"
        save_file({name: t[:rows].contiguous() for name, t in whole.items()}, str(path))
        self.shards.append({"file": path.name, "rows": rows, "sha256": file_sha256(path)})
        self.pending = {name: [t[rows:]] for name, t in whole.items()}
        self.pending_rows -= rows

    def close(self) -> list[dict]:
        if self.pending_rows:
            self._flush(self.pending_rows)
        return self.shards


def check_shards(folder: Path, shards: list[dict]) -> None:
    """Each shard present and its bytes the ones written (a SHA-256 per shard, read in blocks)."""
    for shard in shards:
        path = folder / shard["file"]
        if not path.is_file():
            raise CmkitError(f"{path} is missing: encode the source again")
        if file_sha256(path) != shard["sha256"]:
            raise CmkitError(f"{path} changed since it was written: encode the source again")


class ShardedRows:
    """The rows of tensor ``key`` across ``shards`` (in order), indexable like one tensor of shape
    ``shape``: ``rows[index]`` with an int, a slice or a tensor of row numbers reads those rows only.
    File handles are opened per process, so an instance can be handed to DataLoader workers."""

    def __init__(self, folder: Path, shards: list[dict], key: str):
        self.folder, self.shards, self.key = Path(folder), shards, key
        self.ends = list(itertools.accumulate(s["rows"] for s in shards))
        self._handles: dict[int, object] = {}
        self._pid = os.getpid()
        if not shards:
            raise CmkitError(f"{self.folder}: no shards of {key!r} on record")
        first = self._slice(0)
        self.item_shape, self.dtype = tuple(first.get_shape()[1:]), _DTYPES[first.get_dtype()]

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def _slice(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked worker: its own handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.folder / self.shards[shard]["file"]), framework="pt")
            except (OSError, ValueError, RuntimeError) as e:
                raise CmkitError(f"cannot read {self.folder / self.shards[shard]['file']}: "
                                 f"{str(e).splitlines()[0]}") from None
        return self._handles[shard].get_slice(self.key)

    def __len__(self) -> int:
        return self.ends[-1]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self.item_shape))

    @property
    def nbytes(self) -> int:
        return len(self) * math.prod(self.item_shape) * self.dtype.itemsize

    def row(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        shard = bisect.bisect_right(self.ends, i)
        start = self.ends[shard - 1] if shard else 0
        return self._slice(shard)[i - start:i - start + 1][0]

    def read_row(self, i: int) -> tuple[torch.Tensor, int]:
        """(row i, replacements made for it): what `data.loader` reads; stored rows never fail to decode."""
        return self.row(i), 0

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        index = torch.as_tensor(index).cpu()
        if index.ndim == 0:
            return self.row(int(index))
        if not len(index):
            return torch.empty((0, *self.item_shape), dtype=self.dtype)
        return torch.stack([self.row(int(i)) for i in index])

    def materialize(self) -> torch.Tensor:
        """Every row, as one tensor in memory."""
        return torch.cat([self._slice(s)[:] for s in range(len(self.shards))])


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8,
           "I64": torch.int64}

__all__ = ["ShardWriter", "ShardedRows", "check_shards"]
