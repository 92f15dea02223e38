"""The table (and optionally the quality-vs-NFE plot) of an image comparison run by
bench/compare_images.sh: every eval-NAME.json in OUT whose NAME has a line in OUT/times.txt.

    python bench/image_table.py OUT [--title TEXT] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(out: Path) -> list[tuple]:
    times = dict(line.split() for line in (out / "times.txt").read_text().splitlines() if line.strip())
    rows = []
    for name, seconds in times.items():
        path = out / f"eval-{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        for r in result["results"]:
            rows.append(dict(name=name, steps=r["steps"], nfe=r["nfe"], fd=r["fd"], floor=result["floor"]["fd"],
                             precision=r["precision"], recall=r["recall"], seconds=seconds, n=result["n"]))
    return rows


def print_table(rows: list[dict], title: str) -> None:
    teacher_fd = rows[0]["fd"]  # the teacher is evaluated first
    print(f"\n{title}, n = {rows[0]['n']} samples vs held-out (classifier features)")
    print(f"{'model':8} {'steps':>5} {'NFE':>4} {'FD':>8} {'floor':>7} {'FD/teacher':>10} {'prec':>5} {'rec':>5} "
          f"{'train s':>7}")
    for r in rows:
        print(f"{r['name']:8} {r['steps']:5d} {r['nfe']:4d} {r['fd']:8.3f} {r['floor']:7.3f} "
              f"{r['fd'] / teacher_fd:10.2f} {r['precision']:5.3f} {r['recall']:5.3f} {r['seconds']:>7}")


def plot(rows: list[dict], path: Path, title: str) -> None:
    from cmkit.plotting import pyplot
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.axhline(rows[0]["floor"], color="grey", ls=":", label="real vs real")
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        if len(mine) == 1:
            ax.scatter([mine[0]["nfe"]], [mine[0]["fd"]], marker="*", s=120, color="black", label=name)
        else:
            ax.plot([r["nfe"] for r in mine], [r["fd"] for r in mine], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    nfes = sorted({r["nfe"] for r in rows})
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlabel("NFE")
    ax.set_ylabel("FD vs held-out (lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--title", default="images")
    p.add_argument("--plot")
    args = p.parse_args()
    rows = load(Path(args.out))
    if rows:
        print_table(rows, args.title)
        if args.plot:
            plot(rows, Path(args.plot), args.title)


if __name__ == "__main__":
    main()
