"""One-step inference speed, side by side in one process on one UNet and one batch:

    python bench/inference.py                       # CPU: small preset, 32 px, batch 16
    python bench/inference.py --device cuda --batch 256 --repeats 50

rows (medians of --repeats interleaved runs after a warm-up):
  raw UNet2DModel forward     the floor: the backbone alone on a prepared input
  cmkit 1 step                Run.sample's path: noise, preconditioning, labels, one call
  diffusers pipeline 1 step   ConsistencyModelPipeline on the `cmkit export diffusers` folder
  onnxruntime 1 step          the `cmkit export onnx` generator (CPU only)
  teacher, 18 Heun steps      35 network calls (one repeat after the others: it is long)

The weights come from 1-step runs: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cmkit.cli import main as cmkit_main
from cmkit.run import default_levels, generate, load_run


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--data", args.data, "--steps", "1", "--batch-size", "2", "--quiet", "--set", "train.sample_every=0",
                  "--set", f"data.resolution={args.resolution}"]
        assert cmkit_main(["train", "--method", "edm", *common, "--set", f"model.preset={args.preset}",
                           "--set", "model.num_classes=0",
                           "--out", str(tmp / "edm")]) == 0
        assert cmkit_main(["train", "--method", "cd", *common, "--teacher", str(tmp / "edm"), "--out", str(tmp / "cd")]) == 0
        assert cmkit_main(["export", "diffusers", "--checkpoint", str(tmp / "cd"), "--out", str(tmp / "pipe"), "--quiet"]) == 0
        run, teacher = load_run(tmp / "cd", device=args.device), load_run(tmp / "edm", device=args.device)
        from diffusers import ConsistencyModelPipeline
        pipe = ConsistencyModelPipeline.from_pretrained(str(tmp / "pipe"), low_cpu_mem_usage=False).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        unet = run.model.backbone.unet
        b, shape = args.batch, run.shape
        x = torch.randn(b, *shape, device=args.device)
        t = torch.full((b,), 250 * torch.log(torch.tensor(run.noise_range.sigma_max)).item(), device=args.device)
        levels = default_levels(False, run.noise_range, 1)

        def raw():
            with torch.inference_mode():
                unet(x, t).sample

        def cmkit_one_step():
            generate(run.model, shape, levels, is_diffusion=False, n=b, seed=0, sigma_min=run.noise_range.sigma_min,
                     batch_size=b)

        def diffusers_one_step():
            with torch.inference_mode():
                pipe(batch_size=b, num_inference_steps=1, generator=torch.Generator().manual_seed(0), output_type="pt")

        rows = {"raw UNet2DModel forward": raw, "cmkit 1 step": cmkit_one_step,
                "diffusers pipeline 1 step": diffusers_one_step}
        if args.device == "cpu":
            assert cmkit_main(["export", "onnx", "--checkpoint", str(tmp / "cd"), "--out", str(tmp / "m.onnx"),
                               "--quiet", "--no-check"]) == 0
            import onnxruntime as ort
            session = ort.InferenceSession(str(tmp / "m.onnx"), providers=["CPUExecutionProvider"])
            noise = x.cpu().numpy()
            rows["onnxruntime 1 step"] = lambda: session.run(None, {"noise": noise})
        for fn in rows.values():  # warm-up
            fn()
        times = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, fn in rows.items():
                times[name].append(timed(fn, sync))
        teacher_levels = default_levels(True, teacher.noise_range, 18)
        teacher_s = timed(lambda: generate(teacher.model, shape, teacher_levels, is_diffusion=True, n=b, seed=0,
                                           batch_size=b), sync)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    raw_s, ours = med["raw UNet2DModel forward"], med["cmkit 1 step"]
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"{args.data} {args.resolution} px, preset {args.preset} ({params:.1f}M parameters), batch {b}, "
          f"{args.device}, torch {torch.__version__}; medians of {args.repeats}")
    print("| what | median s | images/s | vs cmkit 1 step |")
    print("|---|---|---|---|")
    for name, s in [*med.items(), ("teacher, 18 Heun steps (35 NFE)", teacher_s)]:
        print(f"| {name} | {s:.4f} | {b / s:.1f} | {s / ours:.2f}x |")
    print(f"\ncmkit overhead over the raw forward: {100 * (ours / raw_s - 1):+.1f}%; "
          f"one step is {teacher_s / ours:.1f}x faster than the teacher's 35 NFE")


if __name__ == "__main__":
    main()
