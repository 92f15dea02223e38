"""Every method on equal footing on 2-D sets: EDM (35 NFE), CD, CT, iCT, ECT, sCT, sCD, MeanFlow.

    python bench/compare_methods.py [--data moons,checkerboard] [--steps 3000] [--out bench/out/compare] [--reuse]

Same backbone (the default residual MLP), same batch size and number of training steps (hence the
same number of training points) for every consistency method; the teacher trains for --teacher-steps
and ECT/sCT/sCD start from it, CD and sCD distil it. Evaluation: SW1 against held-out data at 1 and
2 steps (n samples), beside the teacher at 35 NFE and the data-vs-data floor. Prints a markdown
table with training wall times and writes quality-vs-NFE plots to --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cmkit
from cmkit.evaluate import evaluate_run

CONSISTENCY_METHODS = [name for name, spec in cmkit.methods().items() if not spec.diffusion]


def sources(method: str) -> tuple[str, ...]:
    """The teacher-derived sources a method takes (from the registry): a teacher it needs, or the
    teacher's weights to start from."""
    spec = cmkit.methods()[method]
    return ("teacher",) if spec.teacher else ("init",) if spec.init else ()


def train(method, data, out: Path, steps: int, reuse: bool, **extra):
    run = out / f"{data}-{method}"
    if reuse and (run / "latest").is_file():
        return run, None
    config = cmkit.build_config(method, **{"data.name": data, "train.steps": steps, **extra})
    start = time.perf_counter()
    cmkit.train(config, run, force=True, progress=False)
    return run, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="moons,checkerboard")
    p.add_argument("--methods", default=",".join(CONSISTENCY_METHODS))
    p.add_argument("--steps", type=int, default=3000, help="training steps of every consistency method")
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--out", default="bench/out/compare")
    p.add_argument("--reuse", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps per method, "
          f"batch 512; SW1 on n = {args.n} vs held-out\n")
    print("| data | method | SW1 1 step | SW1 2 steps | 1 step / teacher | 2 steps / teacher | train s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    results = {}
    for data in args.data.split(","):
        teacher, t_teacher = train("edm", data, out, args.teacher_steps, args.reuse)
        ev = evaluate_run(str(teacher), steps=[18], n=args.n)
        ref = ev["results"][0]["sw1"]
        rows = {"floor": (ev["floor"]["sw1"], None), "edm (35 NFE)": (ref, None)}
        print(f"| {data} | data vs data (floor) | {ev['floor']['sw1']:.4f} | | | | |")
        print(f"| {data} | EDM teacher, 35 NFE | {ref:.4f} | | 1.00 | | "
              f"{'reused' if t_teacher is None else f'{t_teacher:.0f}'} |")
        for method in args.methods.split(","):
            extra = {key: str(teacher) for key in sources(method)}
            run, seconds = train(method, data, out, args.steps, args.reuse, **extra)
            r = evaluate_run(str(run), steps=[1, 2], n=args.n)["results"]
            one, two = r[0]["sw1"], r[1]["sw1"]
            rows[method] = (one, two)
            print(f"| {data} | {method} | {one:.4f} | {two:.4f} | {one / ref:.2f} | {two / ref:.2f} | "
                  f"{'reused' if seconds is None else f'{seconds:.0f}'} |", flush=True)
        results[data] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "quality_vs_nfe.png")
    print(f"\nplot: {out / 'quality_vs_nfe.png'}")


def plot(results: dict, path: Path) -> None:
    from cmkit.plotting import pyplot
    plt = pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
    for ax, (data, rows) in zip(axes[0], results.items()):
        for name, (one, two) in rows.items():
            if name == "floor":
                ax.axhline(one, color="grey", ls=":", label="data vs data")
            elif two is None:
                ax.scatter([35], [one], marker="*", s=120, color="black", label=name)
            else:
                ax.plot([1, 2], [one, two], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([1, 2, 35], ["1", "2", "35"])
        ax.set_xlabel("NFE")
        ax.set_ylabel("SW1 vs held-out (lower is better)")
        ax.set_title(data)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
