"""A diffusers-trained DDPM as cmkit's teacher: the teacher's FD in diffusers and in cmkit, and
the FD of CD and ECT students distilled from it, side by side in one run.

    python bench/ddpm_teacher.py [--data digits] [--teacher-steps 3000] [--student-steps 1500] [--out bench/out/ddpm]
    python bench/ddpm_teacher.py --data fashion-mnist --resolution 32 --channels 64,128,128 --device cuda ...

1. Trains a UNet2DModel the way diffusers' train_unconditional.py does (DDPMScheduler.add_noise,
   epsilon MSE, 1000 linear betas, AdamW, an EMA of the weights) and saves it as a DDPMPipeline.
2. Scores it sampled by diffusers (its DDIMPipeline, 50 steps, eta 0, with and without its
   default x0 clipping; its HeunDiscreteScheduler on an 18-level Karras grid) and by cmkit's Heun
   on the converted denoiser (18 steps, 35 NFE).
3. Distils CD and LCM (--teacher FOLDER) and tunes ECT (--init FOLDER) from the folder with cmkit
   and scores them at 1, 2 and 4 steps (LCM at LCMScheduler's timesteps). Targets: the teacher's FD with the same sampler in diffusers and in
   cmkit within 5%; CD within 2x the teacher at 1 step and 1.5x at 2 steps.

FD is `cmkit eval`'s (the packaged classifier's features, n samples against n held-out images).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

import cmkit
from cmkit.data import ImageScaler, load_dataset
from cmkit.evaluate import ImageScorer


def train_diffusers_ddpm(images: torch.Tensor, out: Path, *, steps: int, batch: int, channels: list[int],
                         lr: float, device: str, seed: int) -> float:
    """diffusers' recipe on ``images`` (uint8 NCHW); writes a DDPMPipeline to ``out``; seconds."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    C, H = images.shape[1], images.shape[2]
    levels = len(channels)
    unet = UNet2DModel(sample_size=H, in_channels=C, out_channels=C, block_out_channels=channels, layers_per_block=2,
                       down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
                       up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
                       norm_num_groups=16, attention_head_dim=16).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-6)
    data = ImageScaler.to_model(images).to(device)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        x0 = data[torch.randint(len(data), (batch,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
    seconds = time.perf_counter() - start
    final = copy.deepcopy(unet)
    ema.copy_to(final.parameters())
    DDPMPipeline(unet=final.cpu(), scheduler=scheduler).save_pretrained(str(out), safe_serialization=True)
    return seconds


def diffusers_samples(folder: Path, n: int, seed: int, device: str, kind: str, batch: int = 500) -> np.ndarray:
    """The folder's UNet sampled by diffusers, uint8 NCHW. ``kind``: "ddim" (DDIMPipeline, 50 steps,
    eta 0, as its users call it: x0 clipped to [-1, 1] at every step), "ddim-noclip" (the same
    without clipping) or "heun" (HeunDiscreteScheduler on an 18-level Karras grid, 35 NFE: cmkit's
    sampler, in diffusers)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, HeunDiscreteScheduler

    ddpm = DDPMPipeline.from_pretrained(str(folder))
    unet, config = ddpm.unet.to(device), ddpm.scheduler.config
    gen = torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        if kind.startswith("ddim"):
            pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config, clip_sample=kind == "ddim"))
            pipe.set_progress_bar_config(disable=True)
            out = pipe(batch_size=size, generator=gen, num_inference_steps=50, eta=0.0, output_type="np").images
            chunks.append(np.round(out * 255).clip(0, 255).astype(np.uint8).transpose(0, 3, 1, 2))
            continue
        scheduler = HeunDiscreteScheduler.from_config(config, use_karras_sigmas=True, timestep_spacing="linspace")
        scheduler.set_timesteps(18, device=device)
        shape = (size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        x = torch.randn(shape, generator=gen, device=device) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
        chunks.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(chunks)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits")
    p.add_argument("--resolution", type=int, default=None, help="data.resolution (32 for Fashion-MNIST at 32 px)")
    p.add_argument("--channels", default="32,64", help="the diffusers UNet's block_out_channels")
    p.add_argument("--teacher-steps", type=int, default=3000)
    p.add_argument("--student-steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="the diffusers teacher's AdamW lr")
    p.add_argument("--n", type=int, default=1000, help="samples (and held-out images) per FD")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/out/ddpm")
    p.add_argument("--reuse-teacher", action="store_true", help="keep OUT/teacher if it is there")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_cfg = {"data.name": args.data, **({"data.resolution": args.resolution} if args.resolution else {})}
    data = load_dataset({**cmkit.default_config("edm")["data"], "name": args.data, "resolution": args.resolution})
    teacher = out / "teacher"
    seconds = {}
    if not (args.reuse_teacher and (teacher / "model_index.json").is_file()):
        print(f"training the diffusers teacher ({args.teacher_steps} steps, batch {args.batch}) ...", flush=True)
        seconds["teacher"] = train_diffusers_ddpm(data.train, teacher, steps=args.teacher_steps, batch=args.batch,
                                                  channels=[int(c) for c in args.channels.split(",")], lr=args.lr,
                                                  device=args.device, seed=args.seed)
    rng = np.random.default_rng([args.seed, 4])
    reference = data.holdout[torch.from_numpy(rng.permutation(len(data.holdout))[:args.n])]
    n = len(reference)
    scorer = ImageScorer(reference, ["fd"], data.native_size)
    train_part = data.train[torch.from_numpy(rng.permutation(len(data.train))[:n])]
    rows = [("real training images (floor)", "-", "-", scorer.score(train_part)["fd"])]
    for label, kind, sampler, nfe in (("diffusers DDIMPipeline", "ddim", "DDIM 50 steps, x0 clipped", 50),
                                      ("diffusers DDIM", "ddim-noclip", "DDIM 50 steps", 50),
                                      ("diffusers Heun", "heun", "Heun, 18-level Karras grid", 35)):
        rows.append((f"teacher, {label}", sampler, nfe,
                     scorer.score(diffusers_samples(teacher, n, args.seed, args.device, kind))["fd"]))
    run = cmkit.load_run(teacher, device=args.device)
    rows.append(("teacher, cmkit", "Heun 18 steps", 35, scorer.score(run.sample(n, steps=18, seed=args.seed))["fd"]))
    common = {**data_cfg, "train.steps": args.student_steps, "train.batch_size": args.batch,
              "train.device": args.device, "train.sample_every": 0}
    for method, source in (("cd", "teacher"), ("ect", "init"), ("lcm", "teacher")):
        print(f"{method} from the folder ({args.student_steps} steps) ...", flush=True)
        start = time.perf_counter()
        cmkit.train(cmkit.build_config(method, **{source: str(teacher)}, **common), out / method, force=True,
                    progress=False)
        seconds[method] = time.perf_counter() - start
        student = cmkit.load_run(out / method, device=args.device)
        for steps in (1, 2, 4):
            fd = scorer.score(student.sample(n, steps=steps, seed=args.seed))["fd"]
            rows.append((f"{method} student", f"{steps} step" + "s" * (steps > 1), steps, fd))

    heun = rows[4][3]
    print(f"\n{args.data}, {n} samples against {n} held-out images; training seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
    print("| model | sampler | NFE | FD | FD / teacher (Heun) |\n|---|---|---|---|---|")
    for name, sampler, nfe, fd in rows:
        print(f"| {name} | {sampler} | {nfe} | {fd:.2f} | {fd / heun:.2f} |")
    theirs, cd1, cd2 = rows[3][3], rows[5][3], rows[6][3]
    gap = abs(theirs - heun) / min(theirs, heun)
    print(f"\nteacher FDs (Heun, diffusers vs cmkit) within 5%: {gap <= 0.05} ({gap:.1%}); "
          f"CD 1 step within 2x: {cd1 <= 2 * heun}; CD 2 steps within 1.5x: {cd2 <= 1.5 * heun}")


if __name__ == "__main__":
    main()
