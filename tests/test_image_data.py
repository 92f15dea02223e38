"""Image readers against hand-made files: IDX, folders, uint8 arrays, geometry, flips."""

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.data import is_image_source, load_dataset, load_images, random_hflip, read_idx
from cmkit.data.images import fit_resolution, load_fashion_mnist, load_image_folder, to_nchw
from cmkit.errors import CmkitError


def write_idx(path, arr: np.ndarray, compress=False):
    raw = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_idx_parsing_matches_hand_made_file(tmp_path, compress):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    out = read_idx(write_idx(tmp_path / ("a.gz" if compress else "a"), arr, compress))
    np.testing.assert_array_equal(out, arr)
    out[0, 0, 0] = 7  # writable, so torch can wrap it without copying warnings


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b"\x01" + b[1:], "bad magic"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "unsigned-byte"),
    (lambda b: b[:-1], "declares"),
    (lambda b: b + b"\x00", "declares"),
    (lambda b: b[:6], "truncated"),
])
def test_idx_errors(tmp_path, mutate, message):
    path = write_idx(tmp_path / "a", np.zeros((2, 4), np.uint8))
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(CmkitError, match=message):
        read_idx(path)


def test_fashion_mnist_reader_and_missing_message(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), True)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10)
    data = load_images("fashion-mnist", root=str(tmp_path))
    assert data.train.shape == (6, 1, 28, 28) and data.holdout.shape == (4, 1, 28, 28)
    assert data.train_labels.tolist() == [0, 1, 2, 3, 4, 5] and data.native_size is None
    padded = load_images("fashion-mnist", root=str(tmp_path), resolution=32)
    assert padded.shape == (1, 32, 32) and padded.native_size == 28
    monkeypatch.setenv("CMKIT_FASHION_MNIST", str(tmp_path))
    assert load_fashion_mnist(None, "test")[0].shape == (4, 28, 28)
    with pytest.raises(CmkitError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_folder_with_class_subfolders_is_labelled(tmp_path):
    rng = np.random.default_rng(1)
    images = {}
    for cls in ("cat", "ant"):
        for i in range(3):
            images[(cls, i)] = rng.integers(0, 256, (6, 6), dtype=np.uint8)
            _png(tmp_path / cls / f"{i}.png", images[(cls, i)])
    arr, labels, classes = load_image_folder(tmp_path)
    assert classes == ["ant", "cat"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(arr[3], images[("cat", 0)])  # sorted: ant/0..2, cat/0..2
    assert arr.shape == (6, 6, 6)  # all grey: one channel


def test_folder_recursive_rgb_unlabelled(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "deep" / "er" / "b.jpg", np.full((4, 4, 3), 200, np.uint8))
    arr, labels, _ = load_image_folder(tmp_path)
    assert arr.shape == (2, 4, 4, 3) and labels is None  # one colour image makes the set RGB


def test_folder_corrupt_file_is_named(tmp_path):
    _png(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CmkitError, match="broken.png"):
        load_image_folder(tmp_path)


def test_folder_size_mismatch_and_empty(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    _png(tmp_path / "b.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(CmkitError, match="differ in size"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CmkitError, match="no .png"):
        load_image_folder(tmp_path / "empty")


def test_nhwc_and_nchw_give_the_same_images(tmp_path):
    nchw = np.random.default_rng(2).integers(0, 256, (5, 3, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "nchw.npy", nchw)
    np.savez(tmp_path / "nhwc.npz", images=nchw.transpose(0, 2, 3, 1), labels=np.arange(5))
    np.save(tmp_path / "grey.npy", nchw[:, 0])
    settings = {"resolution": None, "fit": "pad", "root": None, "holdout_fraction": 0.4, "seed": 0,
                "hflip": False, "n": 0, "n_holdout": 0}
    a = load_dataset(settings, str(tmp_path / "nchw.npy"))
    b = load_dataset(settings, str(tmp_path / "nhwc.npz"))
    torch.testing.assert_close(a.train, b.train)
    torch.testing.assert_close(a.holdout, b.holdout)
    assert a.train_labels is None and sorted(b.train_labels.tolist() + b.holdout_labels.tolist()) == [0, 1, 2, 3, 4]
    # labels follow their images through the split
    for img, label in zip(b.train, b.train_labels):
        torch.testing.assert_close(img, torch.from_numpy(nchw[label]))
    assert load_dataset(settings, str(tmp_path / "grey.npy")).shape == (1, 8, 8)


def test_array_errors(tmp_path):
    with pytest.raises(CmkitError, match="uint8"):
        to_nchw(np.zeros((2, 8, 8, 3), np.float32), "x")
    with pytest.raises(CmkitError, match="alpha"):
        to_nchw(np.zeros((2, 8, 8, 4), np.uint8), "x")
    np.savez(tmp_path / "bad.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 1]))
    with pytest.raises(CmkitError, match="labels"):
        load_images(str(tmp_path / "bad.npz"))


def test_vectors_are_not_images(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((10, 2)))
    np.save(tmp_path / "i.npy", np.zeros((10, 4, 4), np.uint8))
    assert not is_image_source(str(tmp_path / "v.npy")) and not is_image_source("moons")
    assert is_image_source(str(tmp_path / "i.npy")) and is_image_source("digits")


def test_digits():
    data = load_images("digits", holdout_fraction=0.1)
    assert data.shape == (1, 8, 8) and len(data.train) + len(data.holdout) == 1797
    assert data.train.dtype == torch.uint8 and int(data.train.max()) == 255
    assert data.num_classes == 10


def test_pad_centres_and_resize_keeps_constant_images():
    img = torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)
    padded = fit_resolution(img, 32, "pad")
    assert padded.shape == (1, 1, 32, 32) and int(padded.sum()) == 255 * 28 * 28
    assert padded[0, 0, 2:30, 2:30].eq(255).all() and padded[0, 0, :2].eq(0).all()
    resized = fit_resolution(torch.full((2, 3, 10, 14), 77, dtype=torch.uint8), 7, "resize")
    assert resized.shape == (2, 3, 7, 7) and resized.eq(77).all()
    with pytest.raises(CmkitError, match="data.fit=resize"):
        fit_resolution(img, 16, "pad")
    with pytest.raises(CmkitError, match="not square"):
        fit_resolution(torch.zeros(1, 1, 4, 6, dtype=torch.uint8), None)


def test_hflip_flips_exactly_the_drawn_half():
    batch = torch.arange(64 * 4, dtype=torch.uint8).view(16, 1, 4, 4)
    out = random_hflip(batch, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, b.flip(-1))) for o, b in zip(out, batch)]
    kept = [bool(torch.equal(o, b)) for o, b in zip(out, batch)]
    assert all(f != k for f, k in zip(flipped, kept)) and 2 <= sum(flipped) <= 14
