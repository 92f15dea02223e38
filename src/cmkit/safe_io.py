"""Readers for files cmkit did not write: data arrays, images, JSON configs.

Every reader checks what a file declares before acting on it (an .npy header that promises a
terabyte, a PNG that decodes to 40 gigapixels, JSON nested 100,000 deep) and turns every way a
file can be broken into one CmkitError naming the file. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tokenize
import zipfile
from pathlib import Path

import numpy as np

from .errors import CmkitError

MAX_IMAGE_PIXELS = 2**26  # 8192 x 8192: far above any training image, far below a decompression bomb
MAX_JSON_BYTES = 16 * 2**20  # configs and run metadata are a few KB
# What a broken or hostile file makes numpy, zipfile, json or PIL raise.
READ_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, RuntimeError, zipfile.BadZipFile,
               zipfile.LargeZipFile, RecursionError, SyntaxError, NotImplementedError, MemoryError,
               tokenize.TokenError)  # numpy parses legacy .npy headers with tokenize


def memory_bytes() -> int:
    """This machine's physical memory (what no single array may exceed)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**40


def npy_header(fh) -> tuple[tuple, np.dtype]:
    """(shape, dtype) from the header at the start of an .npy stream (which is left after it)."""
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), dtype


def check_npy_header(fh, available: int, name: str, in_memory: bool = True) -> tuple[tuple, np.dtype]:
    """Read an .npy header from ``fh`` and refuse object arrays, shapes the bytes cannot hold and
    (``in_memory``: the array is to be loaded) more than this machine's memory; (shape, dtype)."""
    shape, dtype = npy_header(fh)
    if dtype.hasobject:
        raise CmkitError(f"{name} holds Python objects (a pickle); cmkit reads numeric arrays only")
    declared = math.prod(shape) * dtype.itemsize
    body = available - fh.tell()
    if declared != body:
        raise CmkitError(f"{name} declares shape {tuple(shape)} ({declared} bytes) but holds {body} bytes: "
                         "truncated or corrupt")
    if in_memory and declared > memory_bytes():
        raise CmkitError(f"{name} holds {declared / 2**30:.1f} GiB, more than this machine's memory")
    return shape, dtype


def load_npy(path: str | Path) -> np.ndarray:
    """An .npy array, its header checked against the file's size first."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            check_npy_header(fh, path.stat().st_size, path.name)
        return np.load(path, allow_pickle=False)
    except CmkitError:
        raise
    except READ_ERRORS as e:
        raise CmkitError(f"cannot read {path.name}: {_first_line(e)}") from None


class NpzArchive:
    """An .npz opened for reading: ``.files`` lists its arrays (names without .npy); ``archive[k]``
    checks the member's header against its size before loading it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
            members = self._zip.namelist()
        except READ_ERRORS as e:
            raise CmkitError(f"cannot read {self.path.name}: {_first_line(e)}") from None
        self.files = [m[:-4] for m in members if m.endswith(".npy")]

    def __getitem__(self, key: str) -> np.ndarray:
        member = f"{key}.npy"
        try:
            info = self._zip.getinfo(member)
            with self._zip.open(info) as fh:
                check_npy_header(fh, info.file_size, f"{self.path.name}[{key}]")
            with self._zip.open(info) as fh:
                return np.lib.format.read_array(fh, allow_pickle=False)
        except CmkitError:
            raise
        except READ_ERRORS as e:
            raise CmkitError(f"cannot read {key!r} in {self.path.name}: {_first_line(e)}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._zip.close()


IMAGE_FORMATS = ("PNG", "JPEG")  # the only formats cmkit decodes, told by content, not by file name
MAX_IMAGE_BYTES = 64 * 2**20  # an encoded training or edit image is far smaller
GREY_MODES = ("1", "L", "I", "I;16", "F")


def open_image(source, name: str | None = None, max_pixels: int = MAX_IMAGE_PIXELS):
    """A fully decoded PIL image from a path or a binary file object (``name`` labels the latter in
    errors), refusing one whose header declares more than ``max_pixels``. The caller closes it
    (``with open_image(p) as im``). Only PNG and JPEG are decoded, whatever the name says: Pillow
    sniffs content, and some of its readers run external programs (EPS runs Ghostscript)."""
    from PIL import Image

    label = str(source) if isinstance(source, (str, Path)) else (name or "upload")
    try:
        size = Path(source).stat().st_size if isinstance(source, (str, Path)) else _remaining(source)
        if size > MAX_IMAGE_BYTES:
            raise CmkitError(f"{label} is {size} bytes, more than cmkit reads for an image ({MAX_IMAGE_BYTES})")
        im = Image.open(source, formats=IMAGE_FORMATS)
        if im.width * im.height > max_pixels:
            im.close()
            raise CmkitError(f"{label} declares {im.width}x{im.height} pixels, more than cmkit reads "
                             f"({max_pixels} pixels)")
        im.load()
        return im
    except CmkitError:
        raise
    except Image.UnidentifiedImageError:
        raise CmkitError(f"cannot read image {label}: not a PNG or JPEG image") from None
    except (Image.DecompressionBombError, *READ_ERRORS) as e:
        raise CmkitError(f"cannot read image {label}: {_first_line(e)}") from None


def _remaining(fh) -> int:
    """Bytes from a binary file object's position to its end (its position unchanged)."""
    here = fh.tell()
    end = fh.seek(0, 2)
    fh.seek(here)
    return end - here


def read_image(source, name: str | None = None, mode: str | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 from a PNG/JPEG path or binary file object (`open_image`), in
    ``mode`` "L" or "RGB" (None: grey images stay grey, others become RGB). The one image reader
    of folders, edit inputs and uploads; every failure is a CmkitError."""
    label = str(source) if isinstance(source, (str, Path)) else (name or "upload")
    with open_image(source, name, max_pixels) as im:
        try:
            if mode is None:
                mode = "L" if im.mode in GREY_MODES else "RGB"
            return np.asarray(im.convert(mode))
        except READ_ERRORS as e:  # a decoded image whose mode does not convert
            raise CmkitError(f"cannot read image {label}: {_first_line(e)}") from None


def read_text(path: str | Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file (a byte-order mark allowed), refusing other encodings and huge files."""
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise CmkitError(f"{what} {path} is {path.stat().st_size} bytes; cmkit expects at most {max_bytes}")
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CmkitError(f"{what} {path} is not UTF-8 text (byte {e.start})") from None


def read_json(path: str | Path, what: str = "file", max_bytes: int = MAX_JSON_BYTES):
    """A JSON file's value; every way it can be malformed is one CmkitError."""
    text = read_text(path, what, max_bytes)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CmkitError(f"{what} {path} is not valid JSON: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    """An exception's first line for a user, without Python object reprs ("<_io.BytesIO object
    at 0x7f...>"): they name nothing the user knows."""
    text = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MB blocks (weights files are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
