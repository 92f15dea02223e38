"""One figure per editing task, from a grey model (Fashion-MNIST) and an RGB model (32x32 patches of
scikit-learn's two sample photographs), for docs/editing.md.

    python bench/editing_gallery.py [--out docs/img] [--grey RUN] [--rgb RUN] [--teacher-steps 1500] [--cd-steps 600]

Without --grey/--rgb it trains them first (an EDM teacher, then CD from it; tiny UNet, CPU-sized)
under --work. Each figure: rows are inputs; columns are the input as the task sees it, then
--n edits. Every edit goes through the same functions as `cmkit edit`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import cmkit
from cmkit import editing
from cmkit.data.images import load_fashion_mnist
from cmkit.plotting import save_edit_grid, save_image_grid


def rgb_patches(path: Path, size: int = 32, n: int = 6000, seed: int = 0) -> Path:
    """Random size x size crops of scikit-learn's china.jpg and flower.jpg (shipped, no download)."""
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    photos = load_sample_images().images
    crops = []
    for k in range(n):
        photo = photos[k % len(photos)]
        i, j = rng.integers(0, photo.shape[0] - size), rng.integers(0, photo.shape[1] - size)
        crops.append(photo[i:i + size, j:j + size])
    np.save(path, np.stack(crops).astype(np.uint8))
    return path


def train_pair(work: Path, name: str, data: str, teacher_steps: int, cd_steps: int, batch: int,
               resolution=None) -> Path:
    # Unconditional models (the gallery shows editing, not class control).
    sets = {"data.name": data, "model.preset": "tiny", "model.num_classes": 0, "train.batch_size": batch,
            "train.sample_every": 0}
    if resolution:
        sets["data.resolution"] = resolution
    teacher = work / f"{name}-teacher"
    start = time.perf_counter()
    cmkit.train(cmkit.build_config("edm", **sets, **{"train.steps": teacher_steps}), teacher, force=True, progress=False)
    cd = work / f"{name}-cd"
    sets.pop("model.preset"), sets.pop("model.num_classes")
    cmkit.train(cmkit.build_config("cd", **sets, teacher=str(teacher), **{"train.steps": cd_steps}), cd, force=True,
                progress=False)
    print(f"trained {name}: {time.perf_counter() - start:.0f} s")
    return cd


def figure(path: Path, inputs: np.ndarray, edits: np.ndarray, n: int) -> None:
    save_edit_grid(inputs, edits, n, path, scale=3)
    print(f"wrote {path}")


def gallery(run, real: np.ndarray, tag: str, out: Path, n: int, seed: int) -> None:
    c, h, w = run.shape
    k = len(real)
    # inpainting: a centred box
    mask = np.zeros((h, w), bool)
    mask[h // 4:3 * h // 4, w // 4:3 * w // 4] = True
    shown = real.copy()
    shown[..., mask] = 128
    figure(out / f"edit-{tag}-inpaint.png", shown, editing.inpaint(run, real, mask, n=n, seed=seed), n)
    # super-resolution x4 from patch means
    low = real.reshape(k, c, h // 4, 4, w // 4, 4).mean((3, 5)).round().astype(np.uint8)
    figure(out / f"edit-{tag}-superres.png", np.repeat(np.repeat(low, 4, 2), 4, 3),
           editing.superres(run, low, 4, n=n, seed=seed), n)
    # stroke painting: a coarse block painting (blocks of h/4 pixels) with 4 grey/colour levels
    b = h // 4
    blocks = real.reshape(k, c, h // b, b, w // b, b).mean((3, 5))
    strokes = np.repeat(np.repeat((np.round(blocks / 85) * 85).astype(np.uint8), b, 2), b, 3)
    figure(out / f"edit-{tag}-stroke.png", strokes, editing.stroke(run, strokes, n=n, seed=seed), n)
    # denoising at sigma 0.4 (about 51 grey levels)
    rng = np.random.default_rng(seed)
    noisy = np.clip(real + rng.normal(0, 0.4 * 127.5, real.shape), 0, 255).astype(np.uint8)
    figure(out / f"edit-{tag}-denoise.png", noisy, editing.denoise(run, noisy, 0.4), 1)
    # interpolation between pairs of seeds
    strips = np.concatenate([editing.interpolate(run, 2 * i, 2 * i + 1, 8) for i in range(4)])
    save_image_grid(strips, out / f"edit-{tag}-interpolate.png", nrow=8, scale=3)
    print(f"wrote {out / f'edit-{tag}-interpolate.png'}")
    if c == 3:
        grey = np.einsum("c,nchw->nhw", np.array(editing.LUMA), real.astype(np.float64)).round().astype(np.uint8)
        figure(out / f"edit-{tag}-colorize.png", grey[:, None], editing.colorize(run, grey[:, None], n=n, seed=seed), n)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/img")
    p.add_argument("--work", default="bench/out/editing")
    p.add_argument("--grey", help="an image run on Fashion-MNIST (default: train one)")
    p.add_argument("--rgb", help="an RGB image run (default: train one on photo patches)")
    p.add_argument("--teacher-steps", type=int, default=1500)
    p.add_argument("--cd-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rgb-size", type=int, default=16, help="photo patch size (default 16)")
    p.add_argument("--inputs", type=int, default=4)
    p.add_argument("--n", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    grey = args.grey or train_pair(work, "fmnist", "fashion-mnist", args.teacher_steps, args.cd_steps, args.batch,
                                   resolution=32)
    patches = rgb_patches(work / "photo-patches.npy", size=args.rgb_size)
    rgb = args.rgb or train_pair(work, "photos", str(patches), args.teacher_steps, args.cd_steps, args.batch)
    test = load_fashion_mnist(split="test")[0][:args.inputs]
    test = np.pad(test, ((0, 0), (2, 2), (2, 2)))[:, None]  # 28 -> 32, as training padded
    gallery(cmkit.load_run(grey), test, "fmnist", out, args.n, args.seed)
    held_out = np.load(rgb_patches(work / "photo-test.npy", size=args.rgb_size, n=args.inputs, seed=1))
    held_out = held_out.transpose(0, 3, 1, 2)
    gallery(cmkit.load_run(rgb), np.ascontiguousarray(held_out), "photos", out, args.n, args.seed)


if __name__ == "__main__":
    main()
