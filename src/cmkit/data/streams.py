"""Image sets read in place, one image at a time: folders, EDM zip archives, WebDataset-style tar
shards and memory-mapped .npy arrays.

    source = open_source("shards/train-{000000..000099}.tar")
    images = StreamedImages(source, rows, ...)      # indexable like a uint8 tensor (N, C, H, W)
    batch = images[torch.tensor([5, 17, 3])]         # decodes three images

A source lists its samples (keys, labels) without decoding any; an index of byte offsets is built
once for tar shards and cached next to them, checked against each shard's size and mtime.
Decoding (PNG/JPEG only, size-capped), the mode conversion and the fit to ``data.resolution`` are
per image, and the same code turns a small source into the in-memory tensor, so a set trains to the
same weights whether it is streamed or loaded. A member that does not decode is replaced by the next
row that does, and counted.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CmkitError
from ..safe_io import READ_ERRORS, check_npy_header, read_image, read_json
from .files import folder_classes
from .geometry import fit_resolution, to_nchw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INDEX_NAME = ".cmkit-index.json"  # next to tar shards
CLASSES_NAME = "classes.json"  # next to tar shards, optional: {"classes": [name of label 0, ...]}
MAX_MEMBER_BYTES = 64 * 2**20  # an encoded training image is far smaller; larger is refused unread
MAX_LABEL_BYTES = 4096
MAX_CAPTION_BYTES = 65536  # a caption (.txt member or file) larger than this is refused unread


class BadSample(Exception):
    """A member that cannot be decoded (truncated, corrupt, not PNG/JPEG)."""


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``train-{000000..000099}.tar`` (zero-padded numeric ranges) and
    ``{a,b}`` alternatives, expanded in order."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        if int(hi) < int(lo) or int(hi) - int(lo) > 10**6:
            raise CmkitError(f"bad shard range {{{body}}} in {pattern}")
        width = len(lo) if lo.startswith("0") else 0
        parts = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        parts = body.split(",")
    return [out for part in parts for out in expand_braces(head + part + tail)]


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


class ImageSource(abc.ABC):
    """The samples of a set: ``keys`` (sorted, unique), ``labels`` ((N,) int64 or None) and
    ``class_names``; ``read(i)`` is sample i's encoded bytes (or a decoded array for .npy)."""

    name: str
    keys: list[str]
    labels: np.ndarray | None = None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @abc.abstractmethod
    def read(self, i: int):
        ...

    def where(self, i: int) -> str:
        """Sample i as a user finds it: ``archive:member`` here; sources of files say the path."""
        return f"{self.name}:{self.keys[i]}"

    def __getstate__(self):  # DataLoader workers reopen files in their own process
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state


class FolderSource(ImageSource):
    """Every PNG/JPEG below a folder (recursive, sorted). If every image sits in a first-level
    sub-folder, those are the classes (sorted names -> labels 0..K-1)."""

    def __init__(self, root: str | Path):
        self.root, self.name = Path(root), str(root)
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise CmkitError(f"no .png/.jpg/.jpeg images found under {root}")
        self.keys = [p.relative_to(self.root).as_posix() for p in files]
        names, labels, self.unlabelled_why = folder_classes(self.keys, str(root))
        if names is not None:
            self.class_names, self.labels = names, labels
        self._handles = {}

    def where(self, i: int) -> str:
        return str(self.root / self.keys[i])

    def read(self, i: int) -> bytes:
        path = self.root / self.keys[i]
        if path.stat().st_size > MAX_MEMBER_BYTES:
            raise BadSample(f"{path} is larger than {MAX_MEMBER_BYTES} bytes")
        return path.read_bytes()


class ZipSource(ImageSource):
    """A zip of PNG/JPEG files in EDM's ``dataset_tool.py`` layout: labels (optional) in
    ``dataset.json`` as ``{"labels": [["00000/img00000000.png", 6], ...]}``."""

    def __init__(self, path: str | Path):
        self.path, self.name = Path(path), str(path)
        self._handles = {}
        try:
            with zipfile.ZipFile(self.path) as archive:
                infos = {i.filename: i for i in archive.infolist() if not i.is_dir()}
                meta = None
                if "dataset.json" in infos:
                    if infos["dataset.json"].file_size > 2**30:
                        raise CmkitError(f"{path}: dataset.json is implausibly large")
                    meta = json.loads(archive.read("dataset.json").decode("utf-8"))
        except CmkitError:
            raise
        except (*READ_ERRORS, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CmkitError(f"cannot read zip archive {path}: {str(e).splitlines()[0]}") from None
        self.keys = sorted(name for name in infos if Path(name).suffix.lower() in IMAGE_SUFFIXES)
        if not self.keys:
            raise CmkitError(f"zip archive {path} holds no .png/.jpg/.jpeg images")
        labels = (meta or {}).get("labels")
        if labels is not None:
            try:
                table = {str(name): int(label) for name, label in labels}
                self.labels = np.array([table[key] for key in self.keys], dtype=np.int64)
            except (TypeError, ValueError, KeyError) as e:
                raise CmkitError(f"{path}: dataset.json labels do not cover the images ({e})") from None
            if self.labels.min() < 0:
                raise CmkitError(f"{path}: dataset.json has negative labels")

    def _archive(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if pid not in self._handles:
            self._handles = {pid: zipfile.ZipFile(self.path)}
        return self._handles[pid]

    def read(self, i: int) -> bytes:
        try:
            archive = self._archive()
            if archive.getinfo(self.keys[i]).file_size > MAX_MEMBER_BYTES:
                raise BadSample(f"{self.keys[i]} is larger than {MAX_MEMBER_BYTES} bytes")
            return archive.read(self.keys[i])
        except BadSample:
            raise
        except (*READ_ERRORS, zipfile.BadZipFile) as e:
            raise BadSample(f"{self.keys[i]}: {str(e).splitlines()[0]}") from None


class TarSource(ImageSource):
    """WebDataset-style tar shards: members ``{key}.png|jpg|jpeg`` with an optional ``{key}.cls``
    (an integer label) or ``{key}.json`` (``{"label": n}``). ``shards``: a list of .tar paths. The
    index (each image's shard, offset and size, and the labels) is built by reading the tar
    headers once, and cached in ``.cmkit-index.json`` next to the first shard (rebuilt when a
    shard's size or mtime changed; where the folder is read-only, rebuilt each time)."""

    def __init__(self, shards: list[str | Path], name: str):
        self.shards, self.name = [Path(s) for s in shards], name
        self._handles = {}
        missing = [str(s) for s in self.shards if not s.is_file()]
        if missing:
            raise CmkitError(f"missing tar shard {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        index = self._cached_index() or self._build_index()
        self.keys = index["keys"]
        self.locations = index["locations"]
        self.captions = index["captions"]  # per image: text, None, or {"bad": why} (`cmkit.data.captions`)
        labels = index["labels"]
        if not self.keys:
            raise CmkitError(f"{name}: the tar shards hold no .png/.jpg/.jpeg images")
        if any(label is not None for label in labels):
            if any(label is None for label in labels):
                raise CmkitError(f"{name}: some images have a .cls/.json label and some do not")
            self.labels = np.array(labels, dtype=np.int64)
            self.class_names = self._class_names()

    def _class_names(self) -> list[str] | None:
        path = self.shards[0].parent / CLASSES_NAME
        if not path.is_file():
            return None
        data = read_json(path, "class names file")
        names = data.get("classes") if isinstance(data, dict) else None
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) > self.labels.max()):
            raise CmkitError(f"{path} must hold {{\"classes\": [...]}} with a name for every label")
        return names

    def _index_path(self) -> Path:
        return self.shards[0].parent / INDEX_NAME

    def _stamps(self) -> dict:
        return {str(s.resolve()): _stamp(s) for s in self.shards}

    def _cached_index(self) -> dict | None:
        try:
            cached = json.loads(self._index_path().read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(cached, dict) or cached.get("shards") != self._stamps() or "captions" not in cached:
            return None  # another set of shards, or one changed since: rebuild
        return cached

    def _build_index(self) -> dict:
        entries = {}
        for number, shard in enumerate(self.shards):
            try:
                with tarfile.open(shard, "r:") as archive:
                    for member in archive:
                        if not member.isfile():
                            continue
                        base = member.name.rsplit("/", 1)[-1]
                        stem, dot, suffix = base.partition(".")
                        key = member.name[:len(member.name) - len(base)] + stem
                        entry = entries.setdefault((number, key), {})
                        suffix = "." + suffix.lower() if dot else ""
                        if suffix in IMAGE_SUFFIXES:
                            entry["image"] = [number, member.offset_data, member.size]
                        elif suffix in (".cls", ".json") and member.size <= MAX_LABEL_BYTES:
                            raw = archive.extractfile(member).read()
                            entry["label"] = _parse_label(raw, suffix)
                            if suffix == ".json":
                                entry["caption"] = _parse_caption(raw, suffix)
                        elif suffix == ".txt":
                            entry["caption"] = (_parse_caption(archive.extractfile(member).read(), suffix)
                                                if member.size <= MAX_CAPTION_BYTES else
                                                {"bad": f"larger than {MAX_CAPTION_BYTES} bytes"})
            except (tarfile.TarError, *READ_ERRORS) as e:
                raise CmkitError(f"cannot read tar shard {shard}: {str(e).splitlines()[0]}") from None
        images = sorted((key, entry) for (number, key), entry in entries.items() if "image" in entry)
        index = {"shards": self._stamps(), "keys": [key for key, _ in images],
                 "locations": [entry["image"] for _, entry in images],
                 "labels": [entry.get("label") for _, entry in images],
                 "captions": [entry.get("caption") for _, entry in images]}
        if len(set(index["keys"])) != len(index["keys"]):
            raise CmkitError(f"{self.name}: two shards hold images with the same key")
        try:
            tmp = self._index_path().with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(index))
            os.replace(tmp, self._index_path())
        except OSError:
            pass  # a read-only data folder: the index is rebuilt next time
        return index

    def _shard(self, number: int):
        pid = os.getpid()
        if self._handles.get("pid") != pid:
            self._handles = {"pid": pid}
        if number not in self._handles:
            self._handles[number] = open(self.shards[number], "rb")
        return self._handles[number]

    def where(self, i: int) -> str:
        return f"{self.shards[self.locations[i][0]]}:{self.keys[i]}"

    def read(self, i: int) -> bytes:
        number, offset, size = self.locations[i]
        if size > MAX_MEMBER_BYTES:
            raise BadSample(f"{self.keys[i]} is larger than {MAX_MEMBER_BYTES} bytes")
        fh = self._shard(number)
        fh.seek(offset)
        data = fh.read(size)
        if len(data) != size:
            raise BadSample(f"{self.keys[i]} is truncated in {self.shards[number]}")
        return data


def _parse_caption(raw: bytes, suffix: str):
    """A member's caption: text, None (a .json without one), or {"bad": why}."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"bad": "not UTF-8 text"}
    if suffix == ".txt":
        return text.strip()
    try:
        value = json.loads(text)
    except ValueError:
        return None
    caption = value.get("text", value.get("caption")) if isinstance(value, dict) else None
    return caption.strip() if isinstance(caption, str) else None


def _parse_label(raw: bytes, suffix: str) -> int | None:
    try:
        text = raw.decode("utf-8").strip()
        value = json.loads(text) if suffix == ".json" else int(text)
        if isinstance(value, dict):
            value = value.get("label", value.get("cls"))
        return int(value) if value is not None and int(value) >= 0 else None
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


class NpySource(ImageSource):
    """A uint8 .npy of images, memory-mapped: (N, H, W), (N, H, W, C) or (N, C, H, W)."""

    def __init__(self, path: str | Path):
        self.path, self.name = Path(path), str(path)
        try:
            with open(self.path, "rb") as fh:
                shape, dtype = check_npy_header(fh, self.path.stat().st_size, self.path.name, in_memory=False)
        except CmkitError:
            raise
        except READ_ERRORS as e:
            raise CmkitError(f"cannot read {self.path.name}: {str(e).splitlines()[0]}") from None
        if len(shape) >= 2:
            to_nchw(np.zeros((1, *shape[1:]), dtype), self.path.name)  # the in-memory reader's checks and errors
        self.keys = range(shape[0])  # row numbers are the keys (str(key) where a name is needed)
        self._handles = {}

    def _array(self) -> np.ndarray:
        pid = os.getpid()
        if pid not in self._handles:
            self._handles = {pid: np.load(self.path, mmap_mode="r", allow_pickle=False)}
        return self._handles[pid]

    def read(self, i: int) -> np.ndarray:
        return np.asarray(self._array()[i])


def is_stream_source(name: str | None) -> bool:
    """Whether ``name`` is a zip archive, a tar shard or shard pattern, or a folder of tar shards."""
    if not name:
        return False
    path = Path(name)
    if path.is_file():
        return path.suffix.lower() in (".zip", ".tar")
    if "{" in name and name.endswith(".tar"):
        return True
    return path.is_dir() and any(path.glob("*.tar")) and not any(
        p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*"))


def open_source(name: str) -> ImageSource:
    """The source ``name`` names: a folder of images, a folder of .tar shards, a shard pattern, a
    .tar, a .zip or a .npy."""
    path = Path(name)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
            return TarSource(shards, name)
        return FolderSource(path)
    if "{" in name and name.endswith(".tar"):
        return TarSource(expand_braces(name), name)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise CmkitError(f"data not found: {name}")
    if suffix == ".zip":
        return ZipSource(path)
    if suffix == ".tar":
        return TarSource([path], name)
    if suffix == ".npy":
        return NpySource(path)
    raise CmkitError(f"{name}: not an image source cmkit streams (a folder, .zip, .tar or shard pattern, .npy)")


# ---------------------------------------------------------------------------------------------
# Decoding


def decode(raw, mode: str | None, label: str = "image") -> np.ndarray:
    """(C, H, W) uint8 from PNG/JPEG bytes (converted to ``mode``, "L" or "RGB"; None: grey stays
    grey, anything else becomes RGB) or from an array row."""
    if isinstance(raw, np.ndarray):
        return to_nchw(raw[None], label)[0]
    try:
        arr = read_image(io.BytesIO(raw), str(label), mode)
    except CmkitError as e:
        raise BadSample(str(e)) from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class StreamedImages:
    """Rows ``rows`` of ``source``, indexable like a uint8 tensor (N, C, H, W) that is never held:
    ``images[index]`` decodes the images it names. A row that does not decode (or has another
    size, when no resolution is set) is replaced by the next one that does, and counted in
    ``bad``; ``reads`` counts decoded images."""

    def __init__(self, source: ImageSource, rows: np.ndarray, *, resolution: int | None, fit: str,
                 mode: str | None = None, size: tuple[int, int] | None = None):
        self.source, self.rows = source, np.asarray(rows, dtype=np.int64)
        self.resolution, self.fit = resolution, fit
        self.reads, self.bad = 0, 0
        if mode is None or size is None:  # from the first row that decodes
            first = self._first_good()
            mode = mode or ("L" if first.shape[0] == 1 else "RGB")
            size = size or tuple(first.shape[1:])
        self.mode, self.size = mode, tuple(size)
        self.channels = 1 if mode == "L" else 3
        side = resolution or size[0]
        if resolution is None and size[0] != size[1]:
            raise CmkitError(f"images are {size[0]}x{size[1]}, not square: set --set data.resolution=N")
        self.item_shape = (self.channels, side, side)

    def _first_good(self) -> np.ndarray:
        for i in range(min(len(self.rows), 100)):
            try:
                return decode(self.source.read(int(self.rows[i])), None, self.source.keys[int(self.rows[i])])
            except BadSample:
                continue
        raise CmkitError(f"{self.source.name}: none of the first images decodes")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.rows), *self.item_shape))

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """Row i as (C, H, W) uint8, or the next good row's."""
        for step in range(len(self.rows)):
            row = int(self.rows[(i + step) % len(self.rows)])
            try:
                arr = decode(self.source.read(row), self.mode, self.source.keys[row])
                if arr.shape[0] != self.channels:
                    raise BadSample(f"{self.source.keys[row]} has {arr.shape[0]} channels, not {self.channels}")
                if self.resolution is None and tuple(arr.shape[1:]) != self.size:
                    raise BadSample(f"{self.source.keys[row]} is {arr.shape[2]}x{arr.shape[1]}, not "
                                    f"{self.size[1]}x{self.size[0]}")
                try:
                    image = fit_resolution(torch.from_numpy(np.require(arr, requirements="CW"))[None], self.resolution,
                                           self.fit)[0]
                except CmkitError as e:  # larger than data.resolution with data.fit=pad
                    raise BadSample(f"{self.source.keys[row]}: {e}") from None
                self.reads += 1
                return image
            except BadSample:
                self.bad += 1
        raise CmkitError(f"{self.source.name}: no image decodes")

    def read_row(self, i: int) -> tuple[torch.Tensor, int]:
        """(row i or its replacement, the replacements made for it): what `data.loader` reads."""
        bad = self.bad
        image = self.image(i)
        return image, self.bad - bad

    def labels(self) -> torch.Tensor | None:
        if self.source.labels is None:
            return None
        return torch.from_numpy(self.source.labels[self.rows])

    def __getitem__(self, index) -> torch.Tensor:
        index = torch.as_tensor(index).cpu()
        if index.ndim == 0:
            return self.image(int(index))
        return torch.stack([self.image(int(i)) for i in index]) if len(index) else torch.empty(
            (0, *self.item_shape), dtype=torch.uint8)

    def materialize(self) -> torch.Tensor:
        """Every row, decoded: the in-memory tensor."""
        return self[torch.arange(len(self.rows))]
