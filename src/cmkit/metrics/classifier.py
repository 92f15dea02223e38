"""The feature network of cmkit's ``fd`` and ``pr`` metrics: a small CNN trained by cmkit on
Fashion-MNIST (``cmkit train-classifier``). Its weights ship with the package as a safetensors file
whose SHA-256 is pinned here, so every cmkit reports distances in the same feature space.

Inception-v3 FID is the standard for natural images, but its features mean little on 28 px
greyscale clothes and it needs weights we may not download; this net is small, exact to
reproduce, and >= 90% accurate on Fashion-MNIST's test set (tests/test_image_metrics.py).
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CmkitError
from ..safe_io import file_sha256

WEIGHTS_NAME = "fmnist_classifier.safetensors"
WEIGHTS_SHA256 = "09ea81a9644efeae33b36d857553b801b854beea301ec069c4f8e7445783747d"
INPUT_SIZE = 28
FEATURE_DIM = 128


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class FeatureClassifier(nn.Module):
    """Three conv stages with batch norm (28 -> 14 -> 7 -> 3 px), a 128-d feature layer
    (pre-activation: the FD feature space) and a 10-way linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.convs = nn.Sequential(*_conv(1, 32), *_conv(32, 32), nn.MaxPool2d(2),
                                   *_conv(32, 64), *_conv(64, 64), nn.MaxPool2d(2),
                                   *_conv(64, 128), nn.MaxPool2d(2))
        self.feature = nn.Linear(128 * 3 * 3, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.convs(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(F.relu(self.features(x))))


def preprocess(images: torch.Tensor | np.ndarray, native_size: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, 1, 28, 28) in [-1, 1]: greyscale (ITU-R 601 luma), the
    centre ``native_size`` crop when the images were padded up from that size, then an antialiased
    bilinear resize to 28 px if needed. Real and generated images take the same path."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise CmkitError(f"feature extraction takes uint8 images (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}")
    x = x.float()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if native_size is not None and native_size < x.shape[2]:
        top = (x.shape[2] - native_size) // 2
        x = x[:, :, top:top + native_size, top:top + native_size]
    if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x / 127.5 - 1


def default_weights_path() -> Path:
    return Path(str(resources.files("cmkit.metrics").joinpath(WEIGHTS_NAME)))


def load_classifier(path: str | Path | None = None, *, check: bool = True) -> FeatureClassifier:
    """The packaged classifier (checksum verified), or one a user trained (``path``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path else default_weights_path()
    if not path.is_file():
        raise CmkitError(f"classifier weights not found: {path}")
    if check and path == default_weights_path() and file_sha256(path) != WEIGHTS_SHA256:
        raise CmkitError(f"{path} does not match its pinned SHA-256; reinstall cmkit or retrain it with "
                         "'cmkit train-classifier'")
    model = FeatureClassifier()
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CmkitError(f"{path} is not a cmkit classifier: {str(e).splitlines()[0]}") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def extract_features(model: FeatureClassifier, images, native_size: int | None = None,
                     batch_size: int = 1000) -> np.ndarray:
    """(N, 128) float64 features of uint8 images."""
    out = [model.features(preprocess(chunk, native_size)).double()
           for chunk in torch.as_tensor(images).split(batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict(model: FeatureClassifier, images, native_size: int | None = None, batch_size: int = 1000) -> torch.Tensor:
    """(N,) predicted Fashion-MNIST classes of uint8 images."""
    return torch.cat([model(preprocess(chunk, native_size)).argmax(1)
                      for chunk in torch.as_tensor(images).split(batch_size)])


def accuracy(model: FeatureClassifier, images, labels, native_size: int | None = None) -> float:
    return float((predict(model, images, native_size) == torch.as_tensor(labels)).float().mean())


def train_classifier(out: str | Path, *, root: str | None = None, epochs: int = 4, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train the feature classifier on Fashion-MNIST's 60k training images (Adam, cosine decay,
    random horizontal flips), write it to ``out`` atomically, and return its
    test accuracy and SHA-256."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..data.images import load_fashion_mnist

    train_x, train_y = load_fashion_mnist(root, "train")
    test_x, test_y = load_fashion_mnist(root, "test")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = preprocess(torch.from_numpy(train_x)[:, None])
    y = torch.from_numpy(train_y.astype(np.int64))
    model = FeatureClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    bar = tqdm(total=steps, disable=not progress, desc="train classifier")
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            batch = x[idx]
            flip = torch.rand(len(batch), generator=gen) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            loss = F.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(out)
    return {"test_accuracy": accuracy(model, torch.from_numpy(test_x)[:, None], test_y.astype(np.int64)),
            "sha256": file_sha256(out), "path": str(out)}
