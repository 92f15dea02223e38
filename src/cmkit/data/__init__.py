"""Vector data sets: built-in 2-D sets and (N, D) user files, with a train/held-out split and
the standardisation that maps data units to model units (std sigma_data per dimension)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CmkitError
from .latent_cache import LatentData, is_latent_cache, load_latent_cache
from .files import SUFFIXES, holdout_split, load_array, load_labelled_array, validate_array
from .images import (FASHION_MNIST_CLASSES, IMAGE_SETS, STREAM_ABOVE_MB, ImageData, ImageScaler, check_stream_settings,
                     count_classes, is_image_source, load_images, random_hflip, read_idx)
from .toys import TOY_SETS, TOY_TRUTH


@dataclass
class VectorData:
    name: str
    train: np.ndarray  # (N, D) float64, data units
    holdout: np.ndarray  # (M, D) float64, data units, never trained on
    train_labels: torch.Tensor | None = None  # (N,) int64 class labels, when the file has them
    holdout_labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    train_conditions: dict = field(default_factory=dict)  # other condition kinds: {kind: (N, ...) tensor}
    holdout_conditions: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    num_classes = property(lambda self: count_classes(self.train_labels, self.holdout_labels))


def is_builtin(name: str) -> bool:
    return name in TOY_SETS or name in IMAGE_SETS


def load_dataset(d: dict, name: str | None = None) -> VectorData | ImageData | LatentData:
    """The data a run's ``data`` config section names (or ``name`` with that section's settings)."""
    name = name or d["name"]
    if not name:  # an imported model (a diffusers folder) records no training data
        raise CmkitError("this model has no data on record: pass --data (e.g. fashion-mnist, a folder of images)")
    if is_latent_cache(name):
        if d["hflip"]:
            raise CmkitError("data.hflip cannot flip latents: flip the images before cmkit data encode")
        return load_latent_cache(name, stream=d.get("stream", "auto"),
                                 stream_above_mb=d.get("stream_above_mb", STREAM_ABOVE_MB))
    if is_image_source(name):
        # Runs from before streaming have no stream keys: "auto" with the default threshold.
        return load_images(name, resolution=d["resolution"], fit=d["fit"], root=d["root"],
                           holdout_fraction=d["holdout_fraction"], seed=d["seed"], stream=d.get("stream", "auto"),
                           stream_above_mb=d.get("stream_above_mb", STREAM_ABOVE_MB))
    if d["resolution"] is not None or d["hflip"]:
        raise CmkitError(f"data.resolution and data.hflip apply to images; {name!r} is vector data")
    return load_vectors(name, n=d["n"], n_holdout=d["n_holdout"], holdout_fraction=d["holdout_fraction"],
                        seed=d["seed"])


def scaler_from_state(state: dict):
    """The data <-> model map a run's config stores: an ImageScaler or a Standardizer."""
    if state.get("kind") == "image":
        return ImageScaler(state["shape"])
    return Standardizer.from_state(state)


def load_vectors(name_or_path: str, *, n: int = 20000, n_holdout: int = 10000,
                 holdout_fraction: float = 0.1, seed: int = 0) -> VectorData:
    """A built-in set (``n`` training and ``n_holdout`` held-out points, fixed by ``seed``) or a
    file, split by a seeded permutation into train and a held-out ``holdout_fraction``."""
    if is_builtin(name_or_path):
        rng = np.random.default_rng([seed, 0])
        holdout_rng = np.random.default_rng([seed, 1])
        sample = TOY_SETS[name_or_path]
        return VectorData(name_or_path, sample(n, rng), sample(n_holdout, holdout_rng))
    if not any(name_or_path.lower().endswith(s) for s in SUFFIXES):
        import difflib
        names = [*sorted(TOY_SETS), *IMAGE_SETS]
        close = difflib.get_close_matches(name_or_path, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise CmkitError(f"unknown data {name_or_path!r}{hint}: use a 2-D set ({', '.join(sorted(TOY_SETS))}), an "
                         f"image set ({', '.join(IMAGE_SETS)}), a .npy/.npz/.csv file, a folder of images, an "
                         "image .zip or .tar shards; a path must exist")
    arr, labels, conditions = load_labelled_array(name_or_path)
    train, held = holdout_split(len(arr), holdout_fraction, seed, name_or_path)
    part = lambda rows: {k: torch.from_numpy(v[rows]) for k, v in conditions.items()}  # noqa: E731
    if labels is None:
        return VectorData(name_or_path, arr[train], arr[held], train_conditions=part(train),
                          holdout_conditions=part(held))
    return VectorData(name_or_path, arr[train], arr[held], torch.from_numpy(labels[train]),
                      torch.from_numpy(labels[held]), train_conditions=part(train), holdout_conditions=part(held))


class Standardizer:
    """Per-dimension affine map: model = (data - mean) / std * sigma_data, and back.

    Stored in the run's config so samples come back in the data's units."""

    def __init__(self, mean, std, sigma_data: float = 0.5):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.sigma_data = sigma_data

    @classmethod
    def fit(cls, data: np.ndarray, sigma_data: float = 0.5) -> "Standardizer":
        std = data.std(0)
        std[std == 0] = 1.0  # a constant column stays constant
        return cls(data.mean(0), std, sigma_data)

    def to_model(self, data: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((data - self.mean) / self.std * self.sigma_data).float()

    def to_data(self, x: torch.Tensor) -> np.ndarray:
        return x.detach().cpu().double().numpy() / self.sigma_data * self.std + self.mean

    def to_data_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """`to_data` in torch, in ``x``'s precision (traceable: the ONNX export uses it)."""
        scale = torch.as_tensor(self.std / self.sigma_data, dtype=x.dtype, device=x.device)
        return x * scale + torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "sigma_data": self.sigma_data}

    @classmethod
    def from_state(cls, state: dict) -> "Standardizer":
        return cls(state["mean"], state["std"], state["sigma_data"])


__all__ = ["FASHION_MNIST_CLASSES", "IMAGE_SETS", "ImageData", "ImageScaler", "LatentData", "is_latent_cache", "Standardizer", "check_stream_settings", "TOY_SETS", "TOY_TRUTH", "VectorData",
           "is_builtin", "is_image_source", "load_array", "load_dataset", "load_images", "load_latent_cache", "load_vectors",
           "random_hflip", "read_idx", "scaler_from_state", "validate_array"]
