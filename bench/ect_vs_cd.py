"""Does ECT reach CD's 2-step quality in half of CD's training steps? (ECT paper's claim, 2-D sets.)

    python bench/ect_vs_cd.py [--data moons] [--steps 250,500,1000,2000] [--teacher-steps 3000] [--n 5000]

One EDM teacher per data set; CD distils it and ECT fine-tunes it, each for every step count in
--steps (separate runs: each schedule spans its own run, as a user would train). Evaluation: SW1
against held-out data at 1 and 2 steps, beside the teacher at 35 NFE. The last table says, for each
CD run, the fewest ECT steps on the grid whose 2-step SW1 is at least as good, and its ratio.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from compare_methods import train  # bench/ is on the path when this script runs

from cmkit.evaluate import evaluate_run


def sw1(run: Path, steps: list[int], n: int) -> list[float]:
    return [r["sw1"] for r in evaluate_run(str(run), steps=steps, n=n)["results"]]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="moons")
    p.add_argument("--steps", default="250,500,1000,2000")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--out", default="bench/out/ect-vs-cd")
    args = p.parse_args()
    grid = sorted(int(s) for s in args.steps.split(","))
    out = Path(args.out)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SW1 on n = {args.n} vs held-out\n")
    for data in args.data.split(","):
        teacher, _ = train("edm", data, out, args.teacher_steps, False)
        ref = sw1(teacher, [18], args.n)[0]
        scores = {}
        print(f"{data}: teacher (35 NFE) SW1 {ref:.4f}\n")
        print("| method | steps | SW1 1 step | SW1 2 steps | 2 steps / teacher | train s |")
        print("|---|---:|---:|---:|---:|---:|")
        for steps in grid:
            for method, source in (("cd", "teacher"), ("ect", "init")):
                run, seconds = train(method, data, out / f"steps-{steps}", steps, False, **{source: str(teacher)})
                one, two = sw1(run, [1, 2], args.n)
                scores[method, steps] = two
                print(f"| {method} | {steps} | {one:.4f} | {two:.4f} | {two / ref:.2f} | {seconds:.0f} |", flush=True)
        print("\n| CD steps | CD 2-step SW1 | fewest ECT steps at least as good | ECT / CD steps |")
        print("|---:|---:|---:|---:|")
        for steps in grid:
            target = scores["cd", steps]
            match = next((s for s in grid if scores["ect", s] <= target), None)
            ratio = f"{match / steps:.2f}" if match else "-"
            print(f"| {steps} | {target:.4f} | {match or 'none on the grid'} | {ratio} |")
        print()


if __name__ == "__main__":
    main()
