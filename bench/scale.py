"""Data-parallel throughput (1 vs N processes under torchrun) and the cost of checkpoints.

    python bench/scale.py                                  # CPU: gloo, small preset, batch 32
    python bench/scale.py --device cuda --runs 1x1,2x1,4x1 --batch 256 --steps 30   # GPUs: NCCL

Part 1 trains the EDM teacher for --steps steps with the same global batch under torchrun, once
per entry of --runs (PROCESSES x THREADS each; default on a 2-core CPU: 1x2, 1x1, 2x1), and
reports the median images/s that metrics.jsonl records after --warmup steps (each step's own
time, checkpoints excluded). 1x2 against 2x1 compares at equal hardware; 1x1 against 2x1 shows
how well a second process adds a second core's worth.

Part 2 times `Trainer.save` (model, EMA, optimizer; written, fsynced and renamed) and gives its
share of a run that saves every --save-every steps at the measured step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cmkit.config import build_config
from cmkit.training import Trainer


def train_args(args, out: Path) -> list[str]:
    return ["train", "--method", "edm", "--data", args.data, "--steps", str(args.steps), "--out", str(out),
            "--batch-size", str(args.batch), "--quiet", "--set", f"model.preset={args.preset}",
            "--set", "train.log_every=1", "--set", f"train.save_every={args.steps}",
            "--set", "train.sample_every=0", "--set", f"train.device={args.device}"]


def throughput(args, nproc: int, threads: int, work: Path) -> tuple[float, float]:
    """(median images/s, median seconds per step) of a torchrun run with ``nproc`` processes."""
    out = work / f"run-{nproc}x{threads}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cmkit", *train_args(args, out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"torchrun with {nproc} processes failed:\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in records[args.warmup:]]
    rate = statistics.median(rates)
    return rate, args.batch / rate


def checkpoint_cost(args, work: Path) -> tuple[float, int]:
    """(median seconds per checkpoint, bytes per checkpoint)."""
    config = build_config("edm", **{"data.name": args.data, "model.preset": args.preset,
                                    "train.batch_size": args.batch, "train.device": args.device,
                                    "train.sample_every": 0})
    trainer = Trainer(config)
    trainer.step(0)  # optimizer state exists, as in a real checkpoint
    out = work / "saves"
    out.mkdir()
    times = []
    for i in range(args.saves):
        start = time.perf_counter()
        trainer.save(out, i + 1)
        times.append(time.perf_counter() - start)
    folder = out / "checkpoints" / f"step-{args.saves:07d}"
    return statistics.median(times), sum(f.stat().st_size for f in folder.iterdir())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32, help="global batch size")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    cores = os.cpu_count() or 1
    p.add_argument("--runs", default=f"1x{cores},1x{max(1, cores // 2)},2x{max(1, cores // 2)}",
                   help="comma list of PROCESSESxTHREADS")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per process)")
    p.add_argument("--saves", type=int, default=5, help="checkpoints to time")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint interval for the share of a run")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = [tuple(map(int, run.split("x"))) for run in args.runs.split(",")]
        rows = [(n, t, *throughput(args, n, t, work)) for n, t in runs]
        seconds, size = checkpoint_cost(args, work)

    base = rows[0][2]
    print(f"data {args.data}, preset {args.preset}, global batch {args.batch}, device {args.device}, "
          f"{os.cpu_count()} cores, median of steps {args.warmup + 1}-{args.steps}")
    print("| processes x threads | images/s | s/step | vs first row |")
    print("|---|---|---|---|")
    for n, t, rate, step_s in rows:
        print(f"| {n} x {t} | {rate:.1f} | {step_s:.3f} | {rate / base:.2f}x |")
    step_s = rows[0][3]
    share = seconds / (seconds + args.save_every * step_s)
    print()
    print("| checkpoint | size | median s | share of a run saving every %d steps |" % args.save_every)
    print("|---|---|---|---|")
    print(f"| model + EMA + optimizer | {size / 2**20:.1f} MiB | {seconds:.3f} | {100 * share:.3f}% |")


if __name__ == "__main__":
    main()
