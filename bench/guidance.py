"""Classifier-free guidance and guided distillation on labelled 2-D data, where the truth is known.

    python bench/guidance.py [--teacher-steps 3000] [--steps 2000] [--n 4000] [--out bench/out/guidance]

Data: two overlapping classes, N((-1, 0), I) and N((+1, 0), I); the Bayes classifier sign(x_1) is
84% right on the data. An EDM teacher is trained with label dropout 0.2; from it a conditional CD
student (no guidance), a guided CD student and a guided sCD student (w ~ U[0, 4] as an input). For each guidance scale w
the table gives the class accuracy of sign(x_1) on the samples (the guided teacher's ideal is
50% at w = 0 and 84% at w = 1) and how far each student is from the guided teacher at the same w
(SW1 between their samples; the teacher-vs-teacher value with another seed is the floor).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import cmkit
from cmkit.metrics import sliced_wasserstein

SCALES = (0.0, 1.0, 2.0, 3.0, 4.0)


def make_data(path: Path, n: int = 20000) -> None:
    g = torch.Generator().manual_seed(0)
    c = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x[:, 0] += 2.0 * c - 1.0
    np.savez(path, x=x.numpy(), labels=c.numpy())


def train(method: str, out: Path, steps: int, **sets) -> float:
    start = time.perf_counter()
    cmkit.train(cmkit.build_config(method, **{"train.steps": steps, **sets}), out, force=True, progress=False)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--steps", type=int, default=2000, help="training steps of each CD student")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--out", default="bench/out/guidance")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "two-classes.npz"
    make_data(data)
    common = {"data.name": str(data)}
    times = {"teacher": train("edm", out / "teacher", args.teacher_steps, **common, **{"train.label_dropout": 0.2})}
    times["cd"] = train("cd", out / "cd", args.steps, **common, teacher=str(out / "teacher"))
    for method in ("cd", "scd"):
        times[f"guided {method}"] = train(method, out / f"g{method}", args.steps, **common,
                                          teacher=str(out / "teacher"), **{"objective.guidance": [0.0, 4.0]})
    teacher, cd, gcd, gscd = (cmkit.load_run(out / name) for name in ("teacher", "cd", "gcd", "gscd"))
    labels = torch.arange(args.n) % 2

    def accuracy(x):
        return float(((x[:, 0] > 0) == labels.numpy().astype(bool)).mean())

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; teacher {args.teacher_steps} steps "
          f"(label dropout 0.2), students {args.steps} steps, batch 512; n = {args.n}; training s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    print("| w | teacher acc (35 NFE) | guided CD acc 1 step | 2 steps | guided sCD acc 1 step | CD acc 1 step | "
          "SW1 vs teacher: guided CD 1 step | guided sCD 1 step | guided sCD 2 steps | CD 1 step | teacher (floor) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for w in SCALES:
        ref = teacher.sample(args.n, steps=18, class_labels=labels, guidance=w, seed=1)
        ref2 = teacher.sample(args.n, steps=18, class_labels=labels, guidance=w, seed=2)
        g1 = gcd.sample(args.n, steps=1, class_labels=labels, guidance=w, seed=3)
        g2 = gcd.sample(args.n, steps=2, class_labels=labels, guidance=w, seed=3)
        s1 = gscd.sample(args.n, steps=1, class_labels=labels, guidance=w, seed=3)
        s2 = gscd.sample(args.n, steps=2, class_labels=labels, guidance=w, seed=3)
        row = [f"{w:g}", f"{accuracy(ref):.3f}", f"{accuracy(g1):.3f}", f"{accuracy(g2):.3f}", f"{accuracy(s1):.3f}"]
        plain = cd.sample(args.n, steps=1, class_labels=labels, seed=3) if w == 1.0 else None
        row.append("" if plain is None else f"{accuracy(plain):.3f}")
        row += [f"{sliced_wasserstein(x, ref):.4f}" for x in (g1, s1, s2)]
        row.append("" if plain is None else f"{sliced_wasserstein(plain, ref):.4f}")
        row.append(f"{sliced_wasserstein(ref2, ref):.4f}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
