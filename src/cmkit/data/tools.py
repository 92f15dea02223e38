"""`cmkit data check` and `cmkit data pack`: what a source holds, and a folder moved into tar shards.

    report = check_source("shards/train-{000000..000009}.tar", grid="grid.png")
    shards = pack_folder("images/", "shards/", shard_size=10000)
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CmkitError
from ..checkpoint import atomic_write_text
from .streams import CLASSES_NAME, BadSample, FolderSource, decode, open_source


@dataclass
class SourceReport:
    name: str
    kind: str
    images: int
    checked: int
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    modes: Counter = field(default_factory=Counter)  # "L"/"RGB" -> images
    class_names: list[str] | None = None
    class_counts: dict[int, int] | None = None
    bad: list[tuple[str, str]] = field(default_factory=list)  # (where: a path or archive:member, why)
    unlabelled_why: str | None = None

    def lines(self) -> list[str]:
        checked = "" if self.checked == self.images else f" (the first {self.checked} checked)"
        out = [f"{self.name}: {self.kind}, {self.images} images{checked}: "
               f"{self.checked - len(self.bad)} readable, {len(self.bad)} unreadable"]
        sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(5))
        out.append(f"  sizes: {sizes}{' ...' if len(self.sizes) > 5 else ''}")
        out.append(f"  colour: {', '.join(f'{m} ({n})' for m, n in self.modes.most_common())}")
        if self.class_counts is not None:
            names = self.class_names or [str(k) for k in range(max(self.class_counts) + 1)]
            counts = ", ".join(f"{names[k] if k < len(names) else k}: {n}" for k, n in sorted(self.class_counts.items()))
            out.append(f"  classes ({len(self.class_counts)}): {counts}")
        else:
            out.append(f"  classes: none ({self.unlabelled_why or 'unlabelled'})")
        if self.bad:
            out.append(f"  unreadable ({len(self.bad)}):")
        out += [f"    {where}: {why}" for where, why in self.bad[:50]]
        if len(self.bad) > 50:
            out.append(f"    ... and {len(self.bad) - 50} more")
        return out


def check_source(name: str, *, limit: int | None = None, grid: str | Path | None = None, seed: int = 0) -> SourceReport:
    """Decode every image of ``name`` (or the first ``limit``), counting sizes, colour modes and
    classes and listing the ones that do not decode; with ``grid``, a PNG of 64 of them (drawn
    with ``seed``)."""
    source = open_source(name)
    kind = type(source).__name__.replace("Source", "").lower()
    n = len(source) if limit is None else min(limit, len(source))
    report = SourceReport(name, kind, len(source), n, class_names=source.class_names,
                          unlabelled_why=getattr(source, "unlabelled_why", None))
    if source.labels is not None:
        report.class_counts = dict(Counter(int(v) for v in source.labels))
    chosen = set(np.random.default_rng(seed).permutation(n)[:64].tolist()) if grid is not None else set()
    shown = []
    for i in range(n):
        image = _decode_or_why(source, i)
        if isinstance(image, tuple):
            report.bad.append(image)
            continue
        report.sizes[(image.shape[2], image.shape[1])] += 1
        report.modes["L" if image.shape[0] == 1 else "RGB"] += 1
        if i in chosen and (not shown or image.shape == shown[0].shape):
            shown.append(image)
    if grid is not None and shown:
        from ..plotting import save_image_grid
        save_image_grid(np.stack(shown), grid)
    return report


def _decode_or_why(source, i: int):
    """Image ``i`` of ``source`` decoded, or (where, why) if it does not decode: ``where`` the
    file's path (folders) or ``archive:member``, as the user can find it."""
    key = source.keys[i]
    where = source.where(i)
    try:
        return decode(source.read(i), None, key)
    except BadSample as e:
        return where, str(e).removeprefix(f"cannot read image {key}: ")


def pack_folder(folder: str | Path, out: str | Path, *, shard_size: int = 10000, prefix: str = "train",
                skip_bad: bool = False) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write the images of ``folder`` (as `FolderSource` reads it: sorted, class sub-folders as
    labels) into tar shards ``out/{prefix}-{000000..}.tar``, WebDataset-style: ``{key}.png|jpg``
    (the file's bytes, not re-encoded) and ``{key}.cls``; (the shards, the skipped files). Every
    image is decoded first: one that does not decode is refused with its path, or with
    ``skip_bad`` left out and named. Keys are the packed images' positions, so the shards list
    them in the folder's order and train to the same weights. Shards are written under a
    temporary name and renamed, so an interrupted pack leaves no partial shard."""
    if shard_size < 1:
        raise CmkitError(f"--shard-size must be positive, got {shard_size}")
    source = FolderSource(folder)
    out = Path(out)
    if out.exists() and any(out.glob(f"{prefix}-*.tar")):
        raise CmkitError(f"{out} already holds {prefix}-*.tar shards; pack into an empty folder")
    # Each image is decoded here (and dropped: a large folder does not fit in memory decoded) to
    # refuse or skip what does not decode; the shards then take the files' bytes as they are.
    problems = {i: p for i in range(len(source)) if isinstance(p := _decode_or_why(source, i), tuple)}
    bad = list(problems.values())
    if bad and not skip_bad:
        named = "; ".join(f"{where} ({why})" for where, why in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CmkitError(f"{len(bad)} image(s) of {folder} do not decode: {named}; remove them, or pass "
                         "--skip-bad to pack the others")
    keep = [i for i in range(len(source)) if i not in problems]
    if not keep:
        raise CmkitError(f"no image of {folder} decodes")
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str((len(keep) - 1) // shard_size)))
    written = []
    for first in range(0, len(keep), shard_size):
        path = out / f"{prefix}-{first // shard_size:0{width}d}.tar"
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with tarfile.open(tmp, "w") as archive:
            for position in range(first, min(first + shard_size, len(keep))):
                i, key = keep[position], f"{position:08d}"
                suffix = Path(source.keys[i]).suffix.lower()
                _add(archive, f"{key}{'.jpg' if suffix == '.jpeg' else suffix}", source.read(i))
                if source.labels is not None:
                    _add(archive, f"{key}.cls", str(int(source.labels[i])).encode())
        os.replace(tmp, path)
        written.append(path)
    if source.class_names is not None:  # the names the labels stand for (TarSource reads them)
        atomic_write_text(out / CLASSES_NAME, json.dumps({"classes": source.class_names}) + "\n")
    return written, bad


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    archive.addfile(info, io.BytesIO(data))
