"""MeanFlow's (t, r) sampler against its one-step quality on 2-D Gaussian data (exact moments).

    python bench/meanflow_samplers.py [--steps 2000]

Each row trains MeanFlow (the default MLP, batch 256, the adaptive weight off unless the row sets
it) and prints the covariance of 20,000 one- and two-step samples beside the truth's.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

import cmkit
from cmkit.data import TOY_TRUTH

V1 = {"objective.p_mean": -0.6, "objective.p_std": 1.6, "objective.r_p_mean": -4.0, "objective.r_p_std": 1.6,
      "objective.flow_fraction": 0.25}
ROWS = {
    "paper ImageNet: (-0.4, 1.0), r = t for 75%": {"objective.p_mean": -0.4, "objective.p_std": 1.0,
                                                   "objective.r_p_mean": None, "objective.r_p_std": None,
                                                   "objective.flow_fraction": 0.75},
    "paper CIFAR-10: (-2.0, 2.0), r = t for 25%": {"objective.p_mean": -2.0, "objective.p_std": 2.0,
                                                   "objective.r_p_mean": None, "objective.r_p_std": None,
                                                   "objective.flow_fraction": 0.25},
    "authors' v1: t (-0.6, 1.6), r (-4.0, 1.6)": V1,
    "authors' v1, adaptive p = 0.75": {**V1, "objective.adaptive_p": 0.75},
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    args = p.parse_args()
    truth = TOY_TRUTH["gaussian"].cov().numpy()
    print(f"truth covariance {np.round(truth, 3).tolist()}; {args.steps} steps each\n")
    print("| sampler | 1-step cov | 2-step cov | train s |")
    print("|---|---|---|---:|")
    for name, sets in ROWS.items():
        config = cmkit.build_config("meanflow", **{"data.name": "gaussian", "train.steps": args.steps,
                                                   "data.n": 20000, "train.batch_size": 256, "train.log_every": 1000,
                                                   "objective.adaptive_p": 0.0, **sets})
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            run = cmkit.load_run(cmkit.train(config, f"{tmp}/run", progress=False))
            seconds = time.perf_counter() - start
            covs = [np.round(np.cov(run.sample(20000, steps=k, seed=1).T), 3).tolist() for k in (1, 2)]
        print(f"| {name} | {covs[0]} | {covs[1]} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
