"""How long `cmkit --help` takes against importing torch, measured side by side (alternating runs,
medians), as a ratio: the summary parser must not import torch.

    python bench/cli_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "cmkit --help": [sys.executable, "-m", "cmkit", "--help"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "cmkit train --help": [sys.executable, "-m", "cmkit", "train", "--help"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    times = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["python -c 'import torch'"]
    print(f"| command | median s ({args.repeats} runs) | / import torch |")
    print("|---|---|---|")
    for name, value in medians.items():
        print(f"| `{name}` | {value:.3f} | {value / base:.2f} |")


if __name__ == "__main__":
    main()
