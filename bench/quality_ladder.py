"""The quality ladder: one-step and two-step generators against their teacher on Fashion-MNIST at
28x28, with enough samples to tell 1.2x from 1.4x and error bars over training seeds.

One EDM teacher (18 Heun steps, 35 NFE); from it, for each training seed, CD (distilled), ECT and
sCT (started from its weights), ECT trained longer, and TCM continuing the shorter ECT run so that
ECT + TCM and the longer ECT have seen the same training images. Each model is scored at 1 and 2
steps on N generated images (default 5,000) against all 10,000 Fashion-MNIST test images: FD of
cmkit's classifier features and precision/recall (k = 3), beside the real-vs-real floor at the
same N (training images against the test images). The same noise for every model.

    python bench/quality_ladder.py [--out bench/out/ladder] [--seeds 0,1,2] [--n 5000] [--device cuda --resolution 32]
        [--teacher-steps 2000 --steps 600 --tcm-steps 300 --batch 64 --preset tiny]
        [--curve ect,tcm]        # FD at 1 step over training images seen (seed 0), from checkpoints
        [--lever NAME=METHOD:key=value,...]  # more rows: METHOD with --set overrides (--lever-seeds)
        [--tune ect,tcm]         # 2-step FD at the level tune-sigmas picks (seed 0)

Work is cached in OUT (runs and results.json): a second call trains and scores only what is
missing, so an interrupted ladder continues. The table is printed after every score.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import cmkit  # noqa: E402
from cmkit.checkpoint import CHECKPOINTS  # noqa: E402
from cmkit.data import load_dataset  # noqa: E402
from cmkit.evaluate import ImageScorer  # noqa: E402

DATA = ["--data", "fashion-mnist"]
STEPS = (1, 2)
TEACHER_STEPS = 18  # Heun: 35 network evaluations


def cmkit_cli(*args) -> None:
    subprocess.run([sys.executable, "-m", "cmkit", *map(str, args)], check=True)


class Ladder:
    def __init__(self, args):
        self.args, self.out = args, args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.common = [*DATA, "--batch-size", args.batch, "--quiet", "--set", "train.sample_every=0",
                       "--set", f"train.device={args.device}"]
        if args.resolution:
            self.common += ["--set", f"data.resolution={args.resolution}"]
        if args.device != "cpu":  # the GPU run's settings (docs/benchmarks.md, "GPU")
            self.common += ["--set", "train.bf16=true", "--set", "train.channels_last=true"]
        self._scorer = None

    # Training -----------------------------------------------------------------------------------
    def train(self, name: str, method: str, steps: int, seed: int, *sources_and_sets) -> Path:
        out = self.out / name
        if (out / "latest").exists():
            return out
        curve = name.split("-s")[0] in self.args.curve.split(",") and seed == 0
        keep = ["--set", f"train.save_every={max(1, steps // 4)}", "--set", "train.keep_checkpoints=8"] if curve else []
        start = time.time()
        cmkit_cli("train", "--method", method, *self.common, *sources_and_sets, *keep, "--steps", steps,
                  "--seed", seed, "--out", out, "--force")
        self.results.setdefault("train_seconds", {})[name] = round(time.time() - start, 1)
        self.save()
        return out

    def teacher(self) -> Path:
        a = self.args
        return self.train("teacher", "edm", a.teacher_steps, 0, "--set", f"model.preset={a.preset}",
                          "--set", "model.c_noise=edm", "--set", "train.optimizer=adamw", "--lr", a.teacher_lr)

    # Scoring ------------------------------------------------------------------------------------
    def scorer(self) -> ImageScorer:
        if self._scorer is None:
            images = load_dataset({**cmkit.build_config("edm", **{"data.name": "fashion-mnist",
                                                                   "data.resolution": self.args.resolution})["data"]})
            self.images = images
            self._scorer = ImageScorer(np.asarray(images.holdout), ["fd", "pr"], images.native_size)
            if "floor" not in self.results:
                rng = np.random.default_rng(0)
                train = np.asarray(images.train[torch.from_numpy(rng.permutation(len(images.train))[:self.args.n])])
                self.results["floor"] = self._scorer.score(train)
                self.results["reference_n"] = len(images.holdout)
                self.save()
        return self._scorer

    def score(self, name: str, path: Path, diffusion: bool = False) -> None:
        done = self.results.setdefault("scores", {}).setdefault(name, {})
        run = None
        for steps in ([TEACHER_STEPS] if diffusion else STEPS):
            if str(steps) in done:
                continue
            run = run or cmkit.load_run(path, device=self.args.device)
            scorer = self.scorer()
            start = time.time()
            x = run.sample(self.args.n, steps=steps, seed=self.args.sample_seed)
            done[str(steps)] = {**scorer.score(x), "sample_seconds": round(time.time() - start, 1)}
            self.save()
            print(self.table(), flush=True)

    def tuned(self, name: str, path: Path) -> None:
        """2-step FD at the intermediate level `cmkit tune-sigmas` picks (FD on 2,000 test images,
        other noise and subset than the ladder's: seed 1)."""
        from cmkit.tune import tune_sigmas
        done = self.results.setdefault("scores", {}).setdefault(name, {})
        if "2" in done:
            return
        run = cmkit.load_run(path, device=self.args.device)
        tuned = tune_sigmas(run, 2, n=2000, seed=1, write=False)
        x = run.sample(self.args.n, sigmas=tuned["sigmas"], seed=self.args.sample_seed)
        done["2"] = {**self.scorer().score(x), "sigmas": tuned["sigmas"]}
        self.save()
        print(self.table(), flush=True)

    def curve(self, name: str, path: Path, images_per_step: int, images_before: int = 0) -> None:
        """FD at 1 step of each kept checkpoint's EMA weights, against the training images seen
        (``images_before``: those of the run it continues)."""
        from safetensors.torch import load_file
        points = self.results.setdefault("curves", {}).setdefault(name, {})
        run = None
        for folder in sorted((path / CHECKPOINTS).glob("step-*")):
            step = int(folder.name.split("-")[1])
            if str(step) in points:
                continue
            run = run or cmkit.load_run(path, device=self.args.device)
            run.model.load_state_dict(load_file(str(folder / "ema.safetensors")))
            x = run.sample(self.args.n, steps=1, seed=self.args.sample_seed)
            points[str(step)] = {"images": images_before + step * images_per_step, "fd": self.scorer().score(x)["fd"]}
            self.save()

    def save(self) -> None:
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.results_path)

    # The table ----------------------------------------------------------------------------------
    def table(self) -> str:
        scores, floor = self.results.get("scores", {}), self.results.get("floor")
        teacher = scores.get("teacher", {}).get(str(TEACHER_STEPS), {}).get("fd")
        lines = [f"n = {self.args.n} generated against {self.results.get('reference_n', '?')} test images",
                 "| model | steps | FD mean ± sd (seeds) | FD / teacher | precision | recall | per seed |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        if floor:
            lines.append(f"| real train vs test (floor) | | {floor['fd']:.2f} | | {floor['precision']:.3f} | "
                         f"{floor['recall']:.3f} | |")
        groups: dict[str, list[str]] = {}
        for name in scores:
            groups.setdefault(name.split("-s")[0] if name != "teacher" else name, []).append(name)
        for group, names in groups.items():
            for steps in sorted({int(s) for n in names for s in scores[n]}):
                rows = [scores[n][str(steps)] for n in names if str(steps) in scores[n]]
                fds = [r["fd"] for r in rows]
                mean = statistics.fmean(fds)
                sd = statistics.stdev(fds) if len(fds) > 1 else float("nan")
                ratio = f"{mean / teacher:.3f}" if teacher else ""
                prec = statistics.fmean(r["precision"] for r in rows)
                rec = statistics.fmean(r["recall"] for r in rows)
                lines.append(f"| {group} | {steps} | {mean:.2f} ± {sd:.2f} ({len(fds)}) | {ratio} | {prec:.3f} | "
                             f"{rec:.3f} | {', '.join(f'{f:.1f}' for f in fds)} |")
        for name, points in self.results.get("curves", {}).items():
            pts = sorted(points.values(), key=lambda p: p["images"])
            lines.append(f"curve {name}: " + ", ".join(f"{p['images'] / 1000:g}k: {p['fd']:.1f}" for p in pts))
        return "\n".join(lines)


def parse_levers(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    levers = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        method, _, sets = rest.partition(":")
        if not name or not method or "-s" in name:
            raise SystemExit(f"--lever NAME=METHOD:key=value,... (a name without '-s'), got {spec!r}")
        levers[name] = (method, [x for kv in sets.split(",") if kv for x in ("--set", kv)])
    return levers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "ladder")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, help="default: Fashion-MNIST's own 28; 32 for the GPU ladder")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (bf16, channels_last)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=600, help="CD, ECT and sCT steps")
    p.add_argument("--tcm-steps", type=int, default=300, help="TCM steps after ECT (ECT-long: steps + these)")
    p.add_argument("--methods", default="cd,ect,sct,tcm")
    p.add_argument("--curve", default="", help="comma list of groups whose seed-0 run is scored over training")
    p.add_argument("--lever", action="append", default=[])
    p.add_argument("--lever-seeds", default="0", help="the seeds levers train (default: 0 only)")
    p.add_argument("--tune", default="", help="comma list of groups whose seed-0 run is also scored at 2 steps "
                   "with the level tune-sigmas picks")
    p.add_argument("--sample-seed", type=int, default=0)
    args = p.parse_args()
    ladder = Ladder(args)
    levers = parse_levers(args.lever)
    lever_seeds = set(map(int, args.lever_seeds.split(",")))
    methods = args.methods.split(",")
    teacher = ladder.teacher()
    ladder.score("teacher", teacher, diffusion=True)
    for seed in map(int, args.seeds.split(",")):
        runs = {}
        for method in methods:
            if method == "cd":
                runs["cd"] = ladder.train(f"cd-s{seed}", "cd", args.steps, seed, "--teacher", teacher)
            elif method in ("ect", "sct"):
                runs[method] = ladder.train(f"{method}-s{seed}", method, args.steps, seed, "--init", teacher)
            elif method == "tcm":
                stage1 = runs.get("ect") or ladder.train(f"ect-s{seed}", "ect", args.steps, seed, "--init", teacher)
                runs["tcm"] = ladder.train(f"tcm-s{seed}", "tcm", args.tcm_steps, seed, "--init", stage1)
                runs["ect_long"] = ladder.train(f"ect_long-s{seed}", "ect", args.steps + args.tcm_steps, seed,
                                                "--init", teacher)
            else:
                raise SystemExit(f"unknown method {method!r}: cd, ect, sct, tcm")
        for name, (method, sets) in levers.items():
            if seed not in lever_seeds:
                continue
            steps = args.tcm_steps if method == "tcm" else args.steps
            if method == "tcm":  # TCM variants continue this seed's ECT run
                source = ["--init", ladder.train(f"ect-s{seed}", "ect", args.steps, seed, "--init", teacher)]
            elif cmkit.objectives.get_method(method).teacher:
                source = ["--teacher", teacher]
            else:
                source = ["--init", teacher]
            runs[name] = ladder.train(f"{name}-s{seed}", method, steps, seed, *source, *sets)
        for group, path in runs.items():
            ladder.score(f"{group}-s{seed}", path)
            if seed == 0 and group in args.curve.split(","):
                ladder.curve(group, path, args.batch, args.steps * args.batch if group == "tcm" else 0)
            if seed == 0 and group in args.tune.split(","):
                ladder.tuned(f"{group}_tuned-s{seed}", path)
    print(ladder.table())
    seconds = ladder.results.get("train_seconds", {})
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
