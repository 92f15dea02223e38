"""Benchmark: teacher vs CD vs CT on 2-D sets, and 1-step vs 35-NFE sampling speed.

    python bench/bench_vectors.py [--data moons,8gaussians,checkerboard] [--out bench/out]

Trains, per data set, an EDM teacher, a CD student of it and a CT model with the default
configs (``--reuse`` evaluates the runs already in --out instead), then prints a markdown table
of SW1 and energy distance against held-out data (with the data-vs-data floor), and the wall time of sampling 10,000 points in 1 step vs Heun 18 steps
(35 NFE), medians of repeated runs timed side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import cmkit
from cmkit.evaluate import evaluate_run


def train(method: str, data: str, out: Path, steps: int, reuse: bool, **extra) -> tuple[Path, str]:
    """(run directory, training wall time as text)."""
    run = out / f"{data}-{method}"
    if reuse and (run / "latest").is_file():
        return run, "reused"  # training is deterministic on CPU: a finished run equals a fresh one
    config = cmkit.build_config(method, **{"data.name": data, "train.steps": steps, **extra})
    start = time.perf_counter()
    cmkit.train(config, run, force=True, progress=False)
    return run, f"{time.perf_counter() - start:.0f}"


def sampling_times(teacher: Path, student: Path, n: int = 10_000, repeats: int = 7) -> dict:
    runs = {"35 NFE (Heun 18)": (cmkit.load_run(teacher), 18), "1 step": (cmkit.load_run(student), 1)}
    times = {name: [] for name in runs}
    for _ in range(repeats):  # interleaved, so both see the same machine state
        for name, (run, steps) in runs.items():
            start = time.perf_counter()
            run.sample(n, steps=steps, seed=0)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="moons,8gaussians,checkerboard")
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--teacher-steps", type=int, default=4000)
    parser.add_argument("--cd-steps", type=int, default=3000)
    parser.add_argument("--ct-steps", type=int, default=4000)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--reuse", action="store_true", help="evaluate existing runs in --out instead of training")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; n = {args.n} samples vs held-out data\n")
    print("| data | model | NFE | SW1 | energy | SW1 / teacher |")
    print("|---|---|---:|---:|---:|---:|")
    timing_rows = []
    for data in args.data.split(","):
        teacher, t_teacher = train("edm", data, out, args.teacher_steps, args.reuse)
        cd, t_cd = train("cd", data, out, args.cd_steps, args.reuse, teacher=str(teacher))
        ct, t_ct = train("ct", data, out, args.ct_steps, args.reuse)
        res_t = evaluate_run(str(teacher), steps=[18, 40], n=args.n)
        res_cd = evaluate_run(str(cd), steps=[1, 2], n=args.n)
        res_ct = evaluate_run(str(ct), steps=[1, 2], n=args.n)
        floor = res_t["floor"]
        ref = res_t["results"][0]["sw1"]
        rows = [("data vs data (floor)", "-", floor), ("EDM teacher, Heun 18", 35, res_t["results"][0]),
                ("EDM teacher, Heun 40", 79, res_t["results"][1])]
        rows += [(f"CD {r['steps']}-step", r["nfe"], r) for r in res_cd["results"]]
        rows += [(f"CT {r['steps']}-step", r["nfe"], r) for r in res_ct["results"]]
        for name, nfe, r in rows:
            print(f"| {data} | {name} | {nfe} | {r['sw1']:.4f} | {r['energy']:.5f} | {r['sw1'] / ref:.2f} |")
        times = sampling_times(teacher, cd)
        timing_rows.append((data, times, (t_teacher, t_cd, t_ct)))
    print("\nSampling 10,000 points (median of 7, interleaved), and training wall time:\n")
    print("| data | 35 NFE (s) | 1 step (s) | speed-up | train teacher / CD / CT (s) |")
    print("|---|---:|---:|---:|---|")
    for data, times, (tt, tcd, tct) in timing_rows:
        slow, fast = times["35 NFE (Heun 18)"], times["1 step"]
        print(f"| {data} | {slow:.4f} | {fast:.4f} | {slow / fast:.1f}x | {tt} / {tcd} / {tct} |")


if __name__ == "__main__":
    main()
