"""Training-step cost of an image teacher (EDM) against the raw UNet it trains.

    python bench/train_speed.py                          # CPU: small preset, batch 128
    python bench/train_speed.py --device cuda --batch 256 --variants eager,bf16,bf16+compile,bf16+compile+channels_last

For each variant it times cmkit's full ``Trainer.step`` (batch draw, noise, preconditioning, loss,
backward, clipping, optimizer, EMA) and, as the floor, a bare forward + backward of the same
``UNet2DModel`` on the same batch size. Medians of --repeats timed steps after --warmup steps,
interleaved so that machine noise hits every variant alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cmkit.config import build_config
from cmkit.train import Trainer

FLAGS = {"bf16": "train.bf16", "compile": "train.compile", "channels_last": "train.channels_last",
         "fused": "train.fused_optimizer"}


def make_trainer(args, variant: str) -> Trainer:
    sets = {"data.name": args.data, "data.resolution": args.resolution, "model.preset": args.preset,
            "train.batch_size": args.batch, "train.device": args.device, "train.sample_every": 0,
            "train.optimizer": "adamw"}
    for flag in filter(None, variant.split("+")):
        if flag != "eager":
            sets[FLAGS[flag]] = True
    return Trainer(build_config("edm", **sets))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_step(trainer: Trainer, batch: int):
    """Forward + backward of the bare UNet (no preconditioning, loss weighting, optimizer, EMA)."""
    unet = trainer.net.backbone.unet
    c, r = trainer.config["model"]["image_channels"], trainer.config["model"]["resolution"]
    x = torch.randn(batch, c, r, r, device=trainer.device)
    t = torch.randn(batch, device=trainer.device)

    def step():
        out = unet(x, t).sample
        out.square().mean().backward()
        unet.zero_grad(set_to_none=True)
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="eager")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    variants = args.variants.split(",")
    trainers = {v: make_trainer(args, v) for v in variants}
    steps = {f"raw UNet fwd+bwd ({variants[0]})": raw_step(trainers[variants[0]], args.batch)}
    counters = {v: 0 for v in variants}

    def trainer_step(v):
        def step():
            trainers[v].step(counters[v])
            counters[v] += 1
        return step
    steps.update({f"cmkit teacher step ({v})": trainer_step(v) for v in variants})
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync(args.device)
            start = time.perf_counter()
            step()
            sync(args.device)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times[next(iter(times))])
    params = sum(p.numel() for p in trainers[variants[0]].net.parameters()) / 1e6
    print(f"{args.preset} UNet ({params:.1f}M parameters), {args.data} at {args.resolution}px, batch {args.batch}, "
          f"{args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'what':45} {'median s':>9} {'img/s':>8} {'x raw':>6}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:45} {med:9.4f} {args.batch / med:8.1f} {med / base:6.2f}")


if __name__ == "__main__":
    main()
