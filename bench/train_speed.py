"""Training-step cost of image methods against the raw UNet they train.

    python bench/train_speed.py                          # CPU: EDM, small preset, batch 128
    python bench/train_speed.py --device cuda --batch 256 --variants eager,bf16,bf16+compile,bf16+compile+channels_last
    python bench/train_speed.py --methods edm,cd,sct --variants eager,compile

For each method and variant it times cmkit's full ``Trainer.step`` (batch draw, noise,
preconditioning, the objective's network passes, loss, backward, clipping, optimizer, EMA) and,
as the floor, a bare forward + backward of the same ``UNet2DModel`` on the same batch size.
Methods that need a teacher (or start from one) get a one-step EDM run of the same UNet: timing
does not depend on the weights. Medians of --repeats timed steps after --warmup steps,
interleaved so that machine noise hits every variant alike.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cmkit
from cmkit.config import build_config
from cmkit.training import Trainer

# A variant is flags joined by "+": eager (nothing), or the settings each flag stands for.
FLAGS = {"bf16": {"train.bf16": True}, "compile": {"train.compile": True},
         "cudagraphs": {"train.compile": True, "train.compile_mode": "reduce-overhead"},
         "channels_last": {"train.channels_last": True}, "fused": {"train.fused_optimizer": True}}


def make_trainer(args, method: str, variant: str, teacher: Path | None) -> Trainer:
    sets = {"data.name": args.data, "data.resolution": args.resolution, "train.batch_size": args.batch,
            "train.device": args.device, "train.sample_every": 0, "train.optimizer": "adamw"}
    spec = cmkit.methods()[method]
    if spec.teacher:
        sets["teacher"] = str(teacher)
    elif spec.init:
        sets["init"] = str(teacher)
    else:
        sets.update({"model.preset": args.preset, "model.c_noise": "edm", "model.num_classes": 0})
    for flag in filter(None, variant.split("+")):
        if flag != "eager":
            sets.update(FLAGS[flag])
    return Trainer(build_config(method, **sets))


def one_step_teacher(args, folder: Path) -> Path:
    """An EDM run of the benchmark's UNet after one step, for the methods that start from one."""
    config = build_config("edm", **{"data.name": args.data, "data.resolution": args.resolution,
                                    "model.preset": args.preset, "model.c_noise": "edm", "model.num_classes": 0, "train.steps": 1,
                                    "train.batch_size": 8, "train.device": args.device, "train.sample_every": 0})
    return cmkit.train(config, folder / "teacher", progress=False)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_step(trainer: Trainer, batch: int, compiled: bool = False, bf16: bool = False):
    """Forward + backward of the bare UNet (no preconditioning, loss weighting, optimizer, EMA),
    eager or compiled (inductor's default mode) as cmkit's compiled step is."""
    unet = copy.deepcopy(trainer.net.backbone.unet)
    c, r = trainer.config["model"]["image_channels"], trainer.config["model"]["resolution"]
    x = torch.randn(batch, c, r, r, device=trainer.device)
    t = torch.randn(batch, device=trainer.device)
    device_type = torch.device(trainer.device).type

    def loss():
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return unet(x, t).sample.float().square().mean()
    loss = torch.compile(loss) if compiled else loss

    def step():
        loss().backward()
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
    p.add_argument("--methods", default="edm", help="comma list of methods (those needing a teacher get one)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.manual_seed(0)
    variants, methods = args.variants.split(","), args.methods.split(",")
    folder = Path(tempfile.mkdtemp(prefix="cmkit-train-speed-"))
    teacher = one_step_teacher(args, folder) if any(m != "edm" for m in methods) else None
    trainers = {(m, v): make_trainer(args, m, v, teacher) for m in methods for v in variants}
    first = next(iter(trainers.values()))
    steps = {f"raw UNet fwd+bwd ({variants[0]})": raw_step(first, args.batch)}
    for variant in variants:  # the bare UNet compiled too, to compare compiled steps with
        if "compile" in variant.split("+"):
            bf16 = "bf16" in variant.split("+")
            steps[f"raw UNet fwd+bwd ({'bf16+' if bf16 else ''}compile)"] = raw_step(first, args.batch, True, bf16)
    counters = {key: 0 for key in trainers}

    def trainer_step(key):
        def step():
            trainers[key].step(counters[key])
            counters[key] += 1
        return step
    steps.update({f"cmkit {m} step ({v})": trainer_step((m, v)) for m, v in trainers})
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
    compiled_raw = {name: statistics.median(ts) for name, ts in times.items() if name.startswith("raw") and "compile" in name}
    params = sum(p.numel() for p in first.net.parameters()) / 1e6
    print(f"{args.preset} UNet ({params:.1f}M parameters), {args.data} at {args.resolution}px, batch {args.batch}, "
          f"{args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'what':45} {'median s':>9} {'img/s':>8} {'x raw':>6} {'x raw compiled':>15}")
    for name, ts in times.items():
        med = statistics.median(ts)
        # Against the compiled bare UNet of the same precision, for the compiled rows.
        floor = next((t for raw, t in compiled_raw.items() if ("bf16" in raw) == ("bf16" in name)), None)
        compiled_row = "compile" in name or "cudagraphs" in name
        versus = f"{med / floor:15.2f}" if compiled_row and floor else " " * 15
        print(f"{name:45} {med:9.4f} {args.batch / med:8.1f} {med / base:6.2f} {versus}")


if __name__ == "__main__":
    main()
