"""Image data: Fashion-MNIST (IDX files), scikit-learn's 8x8 digits, folders of PNG/JPEG files and
uint8 .npy/.npz arrays. A whole data set lives in memory as one uint8 tensor (N, C, H, W); batches
become floats in [-1, 1] only when drawn, so 60,000 images cost 60 MB, not 240.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..batch_rng import batch_rng
from ..errors import CmkitError, warn
from ..safe_io import READ_ERRORS, NpzArchive, load_npy, memory_bytes, npy_header, open_image
from .files import folder_classes, holdout_split, validate_labels
from .geometry import FITS, fit_resolution, to_nchw  # noqa: F401 (cmkit.data.images' names)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
FASHION_MNIST_ENV = "CMKIT_FASHION_MNIST"
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                         "ankle-boot")


def holdout_fingerprint(holdout_keys, total: int) -> dict:
    """A source's identity as runs record it: its image count and a digest of its held-out keys."""
    digest = hashlib.sha256("\n".join(str(k) for k in holdout_keys).encode()).hexdigest()
    return {"images": total, "holdout_sha256": digest}


@dataclass
class ImageData:
    name: str
    train: torch.Tensor  # (N, C, H, W) uint8
    holdout: torch.Tensor  # (M, C, H, W) uint8, never trained on
    train_labels: torch.Tensor | None = None  # (N,) int64
    holdout_labels: torch.Tensor | None = None
    native_size: int | None = None  # side before padding, when fit = pad grew the images
    class_names: list[str] | None = None
    holdout_keys: list[str] | None = None  # file/member names of the held-out images (user sources)
    total: int | None = None  # images in the source (user sources)

    def fingerprint(self) -> dict | None:
        """What a run records of its source so that a resume or an eval can tell the data changed
        (new or removed images would move the held-out split into the training set)."""
        if self.holdout_keys is None:
            return None
        return holdout_fingerprint(self.holdout_keys, self.total)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    num_classes = property(lambda self: count_classes(self.train_labels, self.holdout_labels))


class ImageScaler:
    """uint8 images <-> model units: x = u / 127.5 - 1 (std about sigma_data = 0.5)."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    @staticmethod
    def to_model(images: torch.Tensor) -> torch.Tensor:
        return images.float() / 127.5 - 1

    @staticmethod
    def to_data_tensor(x: torch.Tensor) -> torch.Tensor:
        """Grey levels 0..255 as floats, unrounded (traceable: the ONNX export uses it)."""
        return ((x + 1) * 127.5).clamp(0, 255)

    @classmethod
    def to_data(cls, x: torch.Tensor) -> np.ndarray:
        """(N, C, H, W) uint8, rounded and clipped."""
        return cls.to_data_tensor(x.detach().float()).round().to(torch.uint8).cpu().numpy()

    def state(self) -> dict:
        return {"kind": "image", "shape": list(self.shape)}


# ---------------------------------------------------------------------------------------------
# Readers


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzipped) of unsigned bytes, as LeCun's MNIST format defines it:
    two zero bytes, type code 0x08, the number of dimensions, then big-endian int32 sizes."""
    path = Path(path)
    try:  # streamed, so a header (or a gzip stream) that promises terabytes is refused before reading them
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
            magic = fh.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0:
                raise CmkitError(f"{path.name} is not an IDX file (bad magic number)")
            if magic[2] != 0x08:
                raise CmkitError(f"{path.name}: only unsigned-byte IDX files are supported (type code {magic[2]:#04x})")
            ndim = magic[3]
            sizes = fh.read(4 * ndim)
            if ndim == 0 or len(sizes) < 4 * ndim:
                raise CmkitError(f"{path.name}: truncated IDX header")
            dims = tuple(int.from_bytes(sizes[4 * i:4 * i + 4], "big") for i in range(ndim))
            if 0 in dims:
                raise CmkitError(f"{path.name}: IDX header declares an empty dimension {dims}")
            body = math.prod(dims)
            if body > memory_bytes():
                raise CmkitError(f"{path.name}: IDX header declares {dims} ({body} bytes), more than this "
                                 "machine's memory")
            chunks, got = [], 0
            while got <= body:  # read in chunks: a short file stops early, a long one at body + 1
                chunk = fh.read(min(2**24, body + 1 - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            raw = b"".join(chunks)
    except CmkitError:
        raise
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise CmkitError(f"cannot read {path}: {e}") from None
    if len(raw) != body:
        raise CmkitError(f"{path.name}: IDX header declares {dims} ({4 + 4 * ndim + body} bytes) but the file has "
                         f"{4 + 4 * ndim + len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims).copy()  # writable


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise CmkitError(f"Fashion-MNIST not found: no {stem}[.gz] in {root}. Install it with "
                     f"'apt-get install dataset-fashion-mnist', or point --set data.root=DIR (or "
                     f"${FASHION_MNIST_ENV}) at a folder holding the four IDX files")


def load_fashion_mnist(root: str | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the train (60k) or test (10k) split."""
    root = Path(root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    image_stem, label_stem = FASHION_MNIST_FILES[split]
    images, labels = read_idx(_find(root, image_stem)), read_idx(_find(root, label_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CmkitError(f"{root}: Fashion-MNIST {split} files disagree: images {images.shape}, labels {labels.shape}")
    return images, labels


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to 0..255."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CmkitError("--data digits needs scikit-learn: pip install 'cmkit[digits]'") from None
    digits = load_digits()
    return np.round(digits.images * (255 / 16)).astype(np.uint8), digits.target.astype(np.int64)


def load_image_folder(root: str | Path) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """Every PNG/JPEG below ``root`` (recursive, sorted). If every image sits in a first-level
    sub-folder, those folders are the classes (sorted names -> labels 0..K-1). All images must
    share one size; they load as grayscale if all are grey, else as RGB."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise CmkitError(f"no .png/.jpg/.jpeg images found under {root}")
    images, modes = [], set()
    for path in files:
        try:
            with open_image(path) as im:
                modes.add("L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB")
                images.append((path, im.convert("RGB") if im.mode not in ("1", "L", "I", "I;16", "F") else im.convert("L")))
        except CmkitError as e:
            raise CmkitError(f"{e} (cmkit data check {root} lists every unreadable image)") from None
        except READ_ERRORS as e:  # converting a decoded image can still fail
            raise CmkitError(f"cannot read image {path}: {e} (cmkit data check {root} lists every unreadable "
                             "image)") from None
    sizes = {im.size for _, im in images}
    if len(sizes) > 1:
        (p0, a), odd = images[0], next((p, im) for p, im in images if im.size != images[0][1].size)
        raise CmkitError(f"images differ in size: {p0.name} is {a.size[0]}x{a.size[1]}, {odd[0]} is "
                         f"{odd[1].size[0]}x{odd[1].size[1]}; resize them to one size first")
    mode = "L" if modes == {"L"} else "RGB"
    arr = np.stack([np.asarray(im.convert(mode)) for _, im in images])
    classes, labels, _ = folder_classes([p.relative_to(root).as_posix() for p in files], str(root))
    return arr, labels, classes  # (load_images warns of a mixed layout, through FolderSource)


def load_image_array(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A uint8 .npy/.npz of images: (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}.
    An .npz's images are under ``images``, ``x``, ``data`` or ``arr_0``; labels under ``labels``."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            arr, labels = load_npy(path), None
        else:
            with NpzArchive(path) as archive:
                key = next((k for k in ("images", "x", "data", "arr_0") if k in archive.files), None)
                if key is None:
                    raise CmkitError(f"{path.name} has no images, x, data or arr_0 array (has: "
                                     f"{', '.join(archive.files) or 'nothing'})")
                arr = archive[key]
                labels = archive["labels"] if "labels" in archive.files else None
    except CmkitError:
        raise
    except READ_ERRORS as e:
        raise CmkitError(f"cannot read {path.name}: {str(e).splitlines()[0]}") from None
    return to_nchw(arr, path.name), validate_labels(labels, len(arr), path.name)


def is_image_array(path: str | Path) -> bool:
    """Whether an .npy/.npz holds images (3 or more dimensions) rather than (N, D) vectors."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() not in (".npy", ".npz"):
        return False
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as fh:
                return len(npy_header(fh)[0]) >= 3
        with NpzArchive(path) as archive:
            key = next((k for k in ("images", "x", "data", "arr_0") if k in archive.files), None)
            return key is not None and archive[key].ndim >= 3
    except (CmkitError, *READ_ERRORS):
        return False  # the vector reader reports the problem


# ---------------------------------------------------------------------------------------------
# Geometry


def random_hflip(batch: torch.Tensor, generator) -> torch.Tensor:
    """Each image mirrored with probability 1/2 (``generator``: a torch.Generator or a BatchRNG)."""
    flip = batch_rng(generator).rand(len(batch)) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(batch.device), batch.flip(-1), batch)


# ---------------------------------------------------------------------------------------------
# Entry point

IMAGE_SETS = ("fashion-mnist", "digits")


def is_image_source(name: str | None) -> bool:
    from .streams import is_stream_source
    return bool(name) and (name in IMAGE_SETS or Path(name).is_dir() or is_image_array(name)
                           or is_stream_source(name))


def count_classes(train_labels, holdout_labels) -> int | None:
    """K = the largest label + 1 (None without labels)."""
    if train_labels is None:
        return None
    return int(max(train_labels.max(), holdout_labels.max() if len(holdout_labels) else 0)) + 1


STREAM_CHOICES = ("auto", "always", "never")
STREAM_ABOVE_MB = 1024.0  # "auto" streams sets whose decoded size is larger (configs/base.json: the same)


def _check_stream(stream) -> None:
    if stream not in STREAM_CHOICES:
        raise CmkitError(f"data.stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")


def check_stream_settings(d: dict) -> None:
    """The data section's streaming keys (`load_images`, the trainer's loader)."""
    _check_stream(d["stream"])
    if not d["stream_above_mb"] >= 0:
        raise CmkitError(f"data.stream_above_mb must be >= 0, got {d['stream_above_mb']!r}")
    if d["workers"] is not None and d["workers"] < 0:
        raise CmkitError(f"data.workers must be >= 0 (null: from the cores), got {d['workers']!r}")
    if not 0 <= d["max_bad_fraction"] < 1:
        raise CmkitError(f"data.max_bad_fraction must be in [0, 1), got {d['max_bad_fraction']!r}")


def load_images(name: str, *, resolution: int | None = None, fit: str = "pad", root: str | None = None,
                holdout_fraction: float = 0.1, seed: int = 0, stream="auto",
                stream_above_mb: float = STREAM_ABOVE_MB) -> ImageData:
    """Load an image source with its train/held-out split. Fashion-MNIST holds out its own 10k
    test set; other sources hold out a seeded ``holdout_fraction``. Folders, .zip, .tar shards and
    .npy are streamed (`cmkit.data.streams`) with ``stream`` "always", or with "auto" when the decoded
    set would take more than ``stream_above_mb``; .zip and .tar sources below it are decoded into
    memory by the same code."""
    _check_stream(stream)
    source = None
    if name not in IMAGE_SETS and Path(name).suffix.lower() != ".npz":
        streamed, source = _load_streamed(name, resolution, fit, holdout_fraction, seed, stream, stream_above_mb)
        if streamed is not None:
            return streamed
    holdout_keys = total = None
    if name == "fashion-mnist":
        train, train_labels = load_fashion_mnist(root, "train")
        test, test_labels = load_fashion_mnist(root, "test")
        parts = [(train[:, None], train_labels.astype(np.int64)), (test[:, None], test_labels.astype(np.int64))]
        names = list(FASHION_MNIST_CLASSES)
    else:
        names = None
        if name == "digits":
            images, labels = load_digits_images()
            images, names = images[:, None], [str(i) for i in range(10)]
        elif Path(name).is_dir():
            images, labels, names = load_image_folder(name)
            images = to_nchw(images, name)
        else:
            images, labels = load_image_array(name)
        split = holdout_split(len(images), holdout_fraction, seed, name, "images")
        parts = [(images[i], None if labels is None else labels[i]) for i in split]
        if Path(name).is_dir():  # the keys a streamed read of the folder has too
            holdout_keys, total = [source.keys[i] for i in split[1]], len(source)
    native = parts[0][0].shape[2]
    (train, train_labels), (holdout, holdout_labels) = [
        (fit_resolution(torch.from_numpy(np.ascontiguousarray(x)), resolution, fit),
         None if y is None else torch.from_numpy(y)) for x, y in parts]
    padded = fit == "pad" and train.shape[2] != native
    return ImageData(name, train, holdout, train_labels, holdout_labels, native if padded else None, names,
                     holdout_keys, total)


def _load_streamed(name: str, resolution, fit: str, holdout_fraction: float, seed: int, stream,
                   stream_above_mb: float) -> tuple[ImageData | None, object]:
    """(the source streamed, or below the threshold decoded into memory by the same code; the
    source). The data are None for a folder or .npy small enough for the in-memory readers."""
    from .streams import StreamedImages, is_stream_source, open_source
    if fit not in FITS:
        raise CmkitError(f"data.fit must be one of {', '.join(FITS)}, got {fit!r}")
    source = open_source(name)
    if getattr(source, "unlabelled_why", None):
        warn(source.unlabelled_why)
    train_rows, holdout_rows = holdout_split(len(source), holdout_fraction, seed, name, "images")
    train = StreamedImages(source, train_rows, resolution=resolution, fit=fit)
    holdout = StreamedImages(source, holdout_rows, resolution=resolution, fit=fit, mode=train.mode, size=train.size)
    decoded_mb = len(source) * math.prod(train.item_shape) / 2**20
    if stream == "never" or (stream == "auto" and decoded_mb <= stream_above_mb):
        if not is_stream_source(name):
            return None, source  # a small folder or .npy: the in-memory readers, as before
        train_x, holdout_x = train.materialize(), holdout.materialize()
        if train.bad or holdout.bad:
            raise CmkitError(f"{name}: {train.bad + holdout.bad} image(s) do not decode (cmkit data check {name} "
                             "lists them)")
    else:
        train_x, holdout_x = train, holdout
    native = train.size[0]
    padded = fit == "pad" and train.item_shape[1] != native
    return ImageData(name, train_x, holdout_x, train.labels(), holdout.labels(), native if padded else None,
                     source.class_names, [str(source.keys[r]) for r in holdout_rows], len(source)), source
