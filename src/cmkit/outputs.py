"""Writing what the commands make: samples as .npy/.npz/.png, never into a run directory.

Shared by `cmkit sample` and `cmkit edit` (and anything else that writes beside a run)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .checkpoint import read_run_config
from .diffusers_runs import is_diffusers_folder
from .errors import CmkitError


@contextlib.contextmanager
def whole_folder(out: Path):
    """Yield a new folder beside ``out`` to write into; on success it replaces ``out`` in one rename,
    on any error it is removed, so ``out`` is always the old folder or the whole new one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 is not what a folder for others to load should have
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_to_clobber(out: Path, run_dir: str | Path) -> None:
    """Outputs never land inside a run directory or on the run's data file."""
    target = out.resolve()
    data = None if is_diffusers_folder(run_dir) else read_run_config(run_dir).get("data", {}).get("name")
    if Path(run_dir).resolve() in target.parents or str(target) == data:
        raise CmkitError(f"refusing to write {out}: it is inside the run directory or is the run's data")


def stream_samples(chunks, n: int, shape: tuple, out: Path, *, image: bool) -> None:
    """Write batches into an .npy as they come (images uint8 NHWC, vectors float64), through a
    temporary file renamed at the end, so memory holds one batch whatever ``n`` is."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npy")
    full = (n, shape[1], shape[2], shape[0]) if image else (n, *shape)
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8 if image else np.float64, shape=full)
    try:
        start = 0
        for x in chunks:
            array[start:start + len(x)] = x.transpose(0, 2, 3, 1) if image else x
            start += len(x)
        array.flush()
        del array
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(x: np.ndarray, out: Path, *, image: bool, title: str = "samples",
                  labels: np.ndarray | None = None) -> None:
    """Images (uint8 NCHW) go to a .png grid or uint8 NHWC .npy/.npz; vectors to .npy/.npz or a
    2-D scatter .png. An .npz also holds the class ``labels`` of a conditional run. Written to a
    temporary name, then renamed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        if image:
            from .plotting import save_image_grid
            save_image_grid(x, out, title=title)
            return
        if x.shape[1] != 2:
            raise CmkitError(f"a .png scatter plot needs 2-D data; this run has {x.shape[1]} dimensions")
        from .plotting import scatter_panels
        scatter_panels([(title, x)], out)
        return
    data = np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if image else x
    tmp = out.with_name(out.name + ".tmp" + out.suffix)
    if out.suffix == ".npy":
        np.save(tmp, data)
    else:
        arrays = {"images" if image else "samples": data}
        if labels is not None:
            arrays["labels"] = np.asarray(labels, dtype=np.int64)
        np.savez(tmp, **arrays)
    tmp.replace(out)
