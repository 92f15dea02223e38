"""A diffusers-trained DDPM as cmkit's teacher: the teacher's FD in diffusers and in cmkit, and
the FD of CD, ECT and LCM students distilled from it, side by side in one run.

    python bench/ddpm_teacher.py [--data digits] [--teacher-steps 3000] [--student-steps 1500] [--out bench/out/ddpm]
    python bench/ddpm_teacher.py --teacher-only      # the teacher's rows only (no students)
    python bench/ddpm_teacher.py --data fashion-mnist --resolution 32 --channels 64,128,128 --device cuda ...

1. Trains a UNet2DModel the way diffusers' train_unconditional.py does (DDPMScheduler.add_noise,
   epsilon MSE, 1000 linear betas, AdamW, an EMA of the weights) and saves it as a DDPMPipeline.
2. Scores it sampled by diffusers (its DDIMPipeline, 50 steps, eta 0; its HeunDiscreteScheduler
   on an 18-level Karras grid; each with and without clipping x0 to [-1, 1] at every step) and by
   cmkit's Heun on the converted denoiser (18 steps, 35 NFE; it does not clip). The folder's
   DDPMScheduler says clip_sample=True and a scheduler made from its config inherits it, so every
   diffusers row sets clip_sample itself: only the unclipped Heun row is cmkit's sampler, and it
   starts from the same noise as cmkit's, so their pixels are compared too.
3. Distils CD and LCM (--teacher FOLDER) and tunes ECT (--init FOLDER) from the folder with cmkit
   and scores them at 1, 2 and 4 steps (LCM at LCMScheduler's timesteps, its EMA and its online
   weights, which the reference scripts save); --teacher-only skips
   this. Targets: the teacher's FD with the same sampler in diffusers and in cmkit within 5%; CD
   within 2x the teacher at 1 step and 1.5x at 2 steps.

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


def diffusers_samples(folder: Path, n: int, seed: int, device: str, kind: str, clip: bool,
                      noise: torch.Tensor | None = None, batch: int = 500) -> np.ndarray:
    """The folder's UNet sampled by diffusers, uint8 NCHW. ``kind``: "ddim" (DDIMPipeline, 50 steps,
    eta 0) or "heun" (HeunDiscreteScheduler on an 18-level Karras grid, 35 NFE: cmkit's sampler, in
    diffusers, from ``noise`` (n, C, H, W) standard normal when given). ``clip``: x0 clipped to
    [-1, 1] at every step (clip_sample; set here, as the folder's config says True)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, HeunDiscreteScheduler

    ddpm = DDPMPipeline.from_pretrained(str(folder))
    unet, config = ddpm.unet.to(device), ddpm.scheduler.config
    gen = torch.Generator(device).manual_seed(seed)
    chunks = []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        if kind == "ddim":
            pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(config, clip_sample=clip))
            pipe.set_progress_bar_config(disable=True)
            out = pipe(batch_size=size, generator=gen, num_inference_steps=50, eta=0.0, output_type="np").images
            chunks.append(np.round(out * 255).clip(0, 255).astype(np.uint8).transpose(0, 3, 1, 2))
            continue
        scheduler = HeunDiscreteScheduler.from_config(config, use_karras_sigmas=True, timestep_spacing="linspace",
                                                      clip_sample=clip)
        scheduler.set_timesteps(18, device=device)
        shape = (size, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        x = (torch.randn(shape, generator=gen, device=device) if noise is None
             else noise[start:start + size].to(device)) * scheduler.init_noise_sigma
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
    p.add_argument("--teacher-only", action="store_true", help="score the teacher's rows only (no students)")
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
    rows = [("real training images (floor)", "-", "-", "-", scorer.score(train_part)["fd"])]
    run = cmkit.load_run(teacher, device=args.device)
    # cmkit's seed draws this noise for n <= 256; passed to both, so the two Heuns start alike.
    noise = torch.randn((n, *run.shape), generator=torch.Generator().manual_seed(args.seed))
    heuns = {}
    for label, kind, sampler, nfe, clip in (
            ("diffusers DDIMPipeline", "ddim", "DDIM 50 steps", 50, True),
            ("diffusers DDIM", "ddim", "DDIM 50 steps", 50, False),
            ("diffusers Heun", "heun", "Heun, 18-level Karras grid", 35, True),
            ("diffusers Heun", "heun", "Heun, 18-level Karras grid", 35, False)):
        images = diffusers_samples(teacher, n, args.seed, args.device, kind, clip, noise=noise)
        if kind == "heun" and not clip:
            heuns["diffusers"] = images
        rows.append((f"teacher, {label}", sampler, "to [-1, 1] each step" if clip else "none", nfe,
                     scorer.score(images)["fd"]))
    heuns["cmkit"] = run.sample(n, steps=18, seed=args.seed, noise=noise)
    rows.append(("teacher, cmkit", "Heun 18 steps", "none", 35, scorer.score(heuns["cmkit"])["fd"]))
    heun, theirs = rows[-1][4], rows[-2][4]
    pixels = np.abs(heuns["diffusers"].astype(np.int16) - heuns["cmkit"].astype(np.int16))
    common = {**data_cfg, "train.steps": args.student_steps, "train.batch_size": args.batch,
              "train.device": args.device, "train.sample_every": 0}
    for method, source in () if args.teacher_only else (("cd", "teacher"), ("ect", "init"), ("lcm", "teacher")):
        print(f"{method} from the folder ({args.student_steps} steps) ...", flush=True)
        start = time.perf_counter()
        cmkit.train(cmkit.build_config(method, **{source: str(teacher)}, **common), out / method, force=True,
                    progress=False)
        seconds[method] = time.perf_counter() - start
        # LCM's reference scripts sample the online network; cmkit samples its EMA (train.ema_rate).
        for weights in ("ema", "model") if method == "lcm" else ("ema",):
            student = cmkit.load_run(out / method, weights=weights, device=args.device)
            name = f"{method} student" + (", online weights (the reference's)" if weights == "model" else "")
            for steps in (1, 2, 4):
                fd = scorer.score(student.sample(n, steps=steps, seed=args.seed))["fd"]
                rows.append((name, f"{steps} step" + "s" * (steps > 1), "none", steps, fd))

    print(f"\n{args.data}, {n} samples against {n} held-out images; training seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n")
    print("| model | sampler | x0 clipping | NFE | FD | FD / teacher (cmkit Heun) |\n|---|---|---|---|---|---|")
    for name, sampler, clipping, nfe, fd in rows:
        print(f"| {name} | {sampler} | {clipping} | {nfe} | {fd:.2f} | {fd / heun:.2f} |")
    gap = abs(theirs - heun) / min(theirs, heun)
    print(f"\nteacher FDs (unclipped Heun, diffusers vs cmkit) within 5%: {gap <= 0.05} ({gap:.1%}); the same "
          f"noise's images differ by {pixels.max()} grey levels at most, {pixels.mean():.3f} on average "
          f"({(pixels > 1).mean():.2%} of pixels by more than 1)")
    if not args.teacher_only:
        cd1, cd2 = (fd for name, _, _, steps, fd in rows if name == "cd student" and steps in (1, 2))
        print(f"CD 1 step within 2x: {cd1 <= 2 * heun}; CD 2 steps within 1.5x: {cd2 <= 1.5 * heun}")


if __name__ == "__main__":
    main()
