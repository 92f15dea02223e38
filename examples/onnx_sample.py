"""Sample from a model exported by `cmkit export onnx`, with onnxruntime and numpy alone (no torch).

    python examples/onnx_sample.py cd.onnx --n 64 --out samples.npy            # 1 step
    python examples/onnx_sample.py cd.onnx --n 64 --steps 2 --out grid.png     # needs --with-f
    python examples/onnx_sample.py cd.onnx --n 64 --out grid.png --scale 4     # each pixel as 4x4
    python examples/onnx_sample.py cd.onnx --n 8 --class 3 --noise z.npy --out x.npy

Output: vectors in the data's units (.npy); images as uint8 NHWC (.npy) or a grid (.png, Pillow):
one grid pixel per sample pixel (an 8x8 sample is an 8x8 tile), tiles 2 pixels apart on black;
--scale N enlarges the grid N times (nearest neighbour).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

GRID_PADDING = 2  # black pixels between and around the tiles of a .png grid, as cmkit sample's grids


def fail(message: str) -> None:
    print(f"onnx_sample: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def session(path: Path):
    import onnxruntime as ort
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable models
        fail(f"cannot load {path}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}")


def to_model_units(x: np.ndarray, meta: dict) -> np.ndarray:
    """The generator returns data units; multistep needs model units again."""
    if meta["standardizer"].get("kind") == "image":
        return x / 127.5 - 1
    s = meta["standardizer"]
    return ((x - np.asarray(s["mean"])) / np.asarray(s["std"]) * s["sigma_data"]).astype(np.float32)


def to_data_units(x: np.ndarray, meta: dict) -> np.ndarray:
    if meta["standardizer"].get("kind") == "image":
        return np.clip((x + 1) * 127.5, 0, 255)
    s = meta["standardizer"]
    return x / s["sigma_data"] * np.asarray(s["std"]) + np.asarray(s["mean"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="the .onnx file cmkit export onnx wrote")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--class", dest="label", type=int, help="class index (conditional models; default random)")
    p.add_argument("--noise", type=Path, help=".npy of (n, *shape) standard-normal starting noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help=".npy or .png")
    p.add_argument("--scale", type=int, default=1, help=".png of images: enlarge the grid this many times, "
                   "nearest neighbour (default 1: one pixel per sample pixel)")
    args = p.parse_args()
    if args.scale < 1:
        fail(f"--scale must be a positive integer, got {args.scale}")

    meta_path = args.model.with_suffix(".json")
    if not args.model.is_file() or not meta_path.is_file():
        fail(f"need {args.model} and {meta_path} (both written by cmkit export onnx)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        fail(f"{meta_path} is not valid JSON: {e}")
    rng = np.random.default_rng(args.seed)
    shape = (args.n, *meta["shape"])
    noise = rng.standard_normal(shape).astype(np.float32)
    if args.noise is not None:
        noise = np.load(args.noise, allow_pickle=False).astype(np.float32)
        if noise.shape != shape:
            fail(f"--noise must have shape {shape}, got {noise.shape}")
    feeds = {"noise": noise}
    if meta["num_classes"]:
        labels = rng.integers(0, meta["num_classes"], args.n) if args.label is None else np.full(args.n, args.label)
        feeds["class_labels"] = labels.astype(np.int64)
    x = session(args.model).run(None, feeds)[0]
    if args.steps > 1:
        if not meta.get("consistency_function"):
            fail("multistep sampling needs the consistency function: export with --with-f")
        f = session(args.model.with_name(meta["consistency_function"]))
        sigmas = meta["multistep_sigmas"].get(str(args.steps))
        if sigmas is None:
            fail(f"--steps must be one of 1, {', '.join(meta['multistep_sigmas'])}")
        x = to_model_units(x, meta).astype(np.float32)
        for sigma in sigmas[1:]:
            z = rng.standard_normal(shape).astype(np.float32)
            xs = (x + math.sqrt(sigma**2 - meta["sigma_min"] ** 2) * z).astype(np.float32)
            inputs = {"x": xs, "sigma": np.full(args.n, sigma, np.float32)}
            if meta["num_classes"]:
                inputs["class_labels"] = feeds["class_labels"]
            x = f.run(None, inputs)[0]
        x = to_data_units(x, meta)
    image = meta["standardizer"].get("kind") == "image"
    if image:
        x = np.rint(x).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # NHWC
    if args.out.suffix not in (".npy", ".png"):
        fail(f"--out must end in .npy or .png, got {args.out.name!r}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    written = ""
    if args.out.suffix == ".png" and image:
        from PIL import Image
        cols = math.ceil(math.sqrt(args.n))
        rows = math.ceil(args.n / cols)
        h, w, c = x.shape[1:]
        pad = GRID_PADDING
        grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
        for i, img in enumerate(x):
            top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
            grid[top:top + h, left:left + w] = img
        grid = grid.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
        Image.fromarray(grid[..., 0] if c == 1 else grid).save(args.out)
        written = (f" ({rows} x {cols} tiles of {h * args.scale}x{w * args.scale} px"
                   + (f", {args.scale}x enlarged" if args.scale > 1 else "") + ")")
    elif args.out.suffix == ".png":  # vectors: a scatter plot of 2-D data
        if x.shape[1] != 2:
            fail(f"a .png of vector samples is a 2-D scatter plot; this model makes {x.shape[1]}-D vectors: use .npy")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{args.model.name}, {args.steps} step(s)")
        ax.set_aspect("equal")
        fig.savefig(args.out)
        plt.close(fig)
    else:
        np.save(args.out, x)
    print(f"wrote {args.n} samples to {args.out}{written}")


if __name__ == "__main__":
    main()
