"""Streamed image data against what training needs: start-up, loader rate, memory.

    python bench/data_speed.py                       # 100,000 64x64 RGB PNGs (generated once)
    python bench/data_speed.py --n 20000 --folder /tmp/cmkit-data

Generates (once, into --folder) a synthetic set of smooth 64x64 RGB PNGs with 10 classes as a
folder, then packs it into tar shards (`cmkit data pack`) and an EDM-layout zip. For each format
it prints:
- start-up: seconds to open the source and split it (its tar index already built), in a fresh
  process;
- loader rate: images/s that the training loader (PlannedBatches, --workers worker processes)
  delivers for the trainer's own batch plan, batch --batch;
- training: the tiny UNet's training-step images/s on the streamed set (batch --train-batch), and the
  peak RSS of that training process, for the whole set and for a tenth of it (the difference is
  what the set's size costs in memory);
and, side by side, the in-memory path against the streamed one on a set small enough to load.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np


def generate(folder: Path, n: int, size: int) -> Path:
    """Smooth images (a gradient and a few blobs, some noise): they compress like photos, not noise."""
    from PIL import Image
    images = folder / "images"
    done = images / ".complete"
    if done.is_file() and int(done.read_text()) == n:
        return images
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = rng.uniform(0, 1, (3, 3))
        base = c[:, 0, None, None] * xx + c[:, 1, None, None] * yy + c[:, 2, None, None]
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r**2)
        img = (base + blob * rng.uniform(-1, 1, (3, 1, 1))) * 100 + 60 + rng.normal(0, 4, (3, size, size))
        arr = np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        path = images / f"class{i % 10}" / f"{i:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)
    done.write_text(str(n))
    return images


def pack(folder: Path, images: Path) -> dict:
    shards, archive = folder / "shards", folder / "set.zip"
    if not shards.is_dir():
        subprocess.run([sys.executable, "-m", "cmkit", "data", "pack", str(images), str(shards), "--shard-size", "10000"],
                       check=True)
    if not archive.is_file():
        files = sorted(images.rglob("*.png"))
        classes = sorted({p.parent.name for p in files})
        with zipfile.ZipFile(archive.with_suffix(".tmp"), "w") as z:
            labels = []
            for i, p in enumerate(files):
                name = f"{i // 1000:05d}/img{i:08d}.png"
                z.write(p, name)
                labels.append([name, classes.index(p.parent.name)])
            z.writestr("dataset.json", json.dumps({"labels": labels}))
        archive.with_suffix(".tmp").rename(archive)
    return {"folder": images, "tar shards": shards, "zip": archive}


def run_python(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def startup(source: Path) -> float:
    return run_python(f"""
        import json, time
        t = time.perf_counter()
        from cmkit.data.images import load_images
        images = load_images({str(source)!r}, stream="always")
        print(json.dumps(time.perf_counter() - t))""")


def loader_rate(source: Path, batch: int, workers: int, batches: int) -> float:
    return run_python(f"""
        import json, time, torch
        from cmkit.batch_rng import BatchRNG, step_seed
        from cmkit.data.images import load_images
        from cmkit.data.loader import PlannedBatches
        images = load_images({str(source)!r}, stream="always").train
        def plan(step):
            yield BatchRNG(torch.Generator().manual_seed(step_seed(0, step)), total={batch}).randint(len(images), {batch})
        loader = PlannedBatches(images, plan, 0, {batches} + 2, workers={workers})
        for step in range(2):
            loader.take(next(plan(step)))
        t = time.perf_counter()
        for step in range(2, {batches} + 2):
            loader.take(next(plan(step)))
        print(json.dumps({batch} * {batches} / (time.perf_counter() - t)))""")


def train(source: Path, out: Path, batch: int, steps: int, stream: str, workers: int) -> dict:
    return run_python(f"""
        import json, resource, statistics, cmkit
        from cmkit.config import build_config
        config = build_config("edm", **{{"data.name": {str(source)!r}, "data.stream": {stream!r}, "data.workers": {workers},
                                         "model.preset": "tiny", "train.batch_size": {batch}, "train.steps": {steps},
                                         "train.sample_every": 0, "train.log_every": 1, "train.device": "cpu"}})
        cmkit.train(config, {str(out)!r}, force=True, progress=False)
        rates = [json.loads(l)["images_per_s"] for l in open({str(out / "metrics.jsonl")!r})][2:]
        print(json.dumps({{"images_per_s": statistics.median(rates),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))""")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "cmkit-data-speed"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=30, help="batches timed for the loader rate")
    p.add_argument("--steps", type=int, default=6, help="training steps per training measurement")
    p.add_argument("--train-batch", type=int, default=32, help="batch of the training measurements (default 32)")
    args = p.parse_args()
    folder = Path(args.folder) / f"{args.n}-{args.size}"
    t = time.perf_counter()
    images = generate(folder, args.n, args.size)
    sources = pack(folder, images)
    print(f"{args.n} {args.size}x{args.size} RGB PNGs in {folder} (generated/packed in {time.perf_counter() - t:.0f} s; "
          f"{sum(f.stat().st_size for f in images.rglob('*.png')) / 2**20:.0f} MB)")
    for source in sources.values():  # build the tar index (and warm the page cache) before timing
        startup(source)
    print(f"\n{'format':12} {'start-up s':>10} {'loader img/s':>13} {'train img/s':>12} {'peak RSS MB':>12}")
    for name, source in sources.items():
        starts = [startup(source) for _ in range(3)]
        rate = loader_rate(source, args.batch, args.workers, args.batches)
        trained = train(source, folder / f"run-{name.replace(' ', '-')}", args.train_batch, args.steps, "always",
                        args.workers)
        print(f"{name:12} {statistics.median(starts):10.2f} {rate:13.0f} {trained['images_per_s']:12.0f} "
              f"{trained['peak_rss_mb']:12.0f}")

    # Memory against the set's size: the same training on a tenth of the images (a sub-folder per class).
    tenth = folder / "tenth"
    if not tenth.is_dir():
        for path in sorted(images.rglob("*.png"))[: args.n // 10]:
            (tenth / path.parent.name).mkdir(parents=True, exist_ok=True)
            (tenth / path.parent.name / path.name).symlink_to(path)
    small = train(tenth, folder / "run-tenth", args.train_batch, args.steps, "always", args.workers)
    big = train(images, folder / "run-whole", args.train_batch, args.steps, "always", args.workers)
    print(f"\npeak RSS streaming the folder: {args.n // 10} images {small['peak_rss_mb']:.0f} MB, {args.n} images "
          f"{big['peak_rss_mb']:.0f} MB")

    # In memory against streamed, on the tenth (small enough to load), side by side.
    rows = []
    for _ in range(2):
        for stream in ("never", "always"):
            rows.append((stream, train(tenth, folder / f"run-{stream}", args.train_batch, args.steps, stream, args.workers)))
    print(f"\ntenth ({args.n // 10} images), tiny UNet, batch {args.train_batch}: training img/s, two runs each")
    for stream in ("never", "always"):
        rates = [r["images_per_s"] for s, r in rows if s == stream]
        rss = [r["peak_rss_mb"] for s, r in rows if s == stream]
        label = "in memory" if stream == "never" else "streamed"
        print(f"  {label:10} {' '.join(f'{x:.0f}' for x in rates)}   peak RSS {max(rss):.0f} MB")


if __name__ == "__main__":
    main()
