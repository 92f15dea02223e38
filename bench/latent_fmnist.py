"""Text-to-image latent consistency on Fashion-MNIST, CPU-sized, side by side in one run.

    python bench/latent_fmnist.py [--out bench/out/latent-fmnist] [--vae-steps 1500] [--teacher-steps 4000]
                                  [--student-steps 800] [--batch 32] [--n 1000] [--guidance 2.0] [--reuse]

1. Trains a small AutoencoderKL on Fashion-MNIST (32x32, padded; 8x8x4 latents; MSE plus a small KL
   term), sets its scaling_factor to 1 / the latents' std (as Stable Diffusion's 0.18215 was
   chosen), and reports its reconstruction FD (held-out images through the VAE, against themselves).
2. Builds a tiny CLIP text encoder (random weights, 2 layers) with a local vocabulary of the
   class-name captions ("a photo of a sneaker"), and encodes the data once with
   `cmkit data encode --caption-template`.
3. Trains a text-conditioned latent teacher the way diffusers' train_text_to_image.py does
   (UNet2DConditionModel, DDPMScheduler.add_noise, epsilon MSE, 10% caption dropout, AdamW, an EMA)
   and saves it as a StableDiffusionPipeline folder. (LCM distils discrete-time teachers, so the
   teacher is a DDPM, not a cmkit EDM run.)
4. Distils `--method lcm` (guidance scales drawn in [1, 2 W - 1]) and `--method lcm-lora` (the
   teacher guided at W; rank 16) with cmkit, and `lcm` once more with the w projection randomly
   initialised as the reference scripts leave it (cmkit starts it at zero).
5. `cmkit eval`: FD of decoded samples against held-out images, and prompt agreement (cmkit's
   Fashion-MNIST classifier on each image generated for a held-out image's caption, against that
   image's class), for the teacher (Heun, 25 steps, guidance W) and the students at 1, 2 and 4
   steps (guidance W). Targets: LCM's 4-step FD within 1.5x the teacher's, its agreement at least
   0.9 of the teacher's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cmkit.data import FASHION_MNIST_CLASSES, load_images, load_latent_cache  # noqa: E402
from cmkit.evaluate import ImageScorer, evaluate_run  # noqa: E402

WORDS = ["a", "photo", "of", "-", *sorted({w for name in FASHION_MNIST_CLASSES for w in name.split("-")})]
TEMPLATE = "a photo of a {class}"


def cmkit_cli(*args, reference_w_init: bool = False) -> None:
    """``cmkit ARGS`` in a subprocess (with ``reference_w_init``: the w projection randomly
    initialised, as the reference scripts leave it, instead of cmkit's zero)."""
    code = "import sys, cmkit.cli, cmkit.nets.diffusers_text_unet as u; "
    code += "u.ZERO_W_INIT = False; " if reference_w_init else ""
    code += "sys.exit(cmkit.cli.main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, *map(str, args)], check=True)


def train_vae(images: torch.Tensor, steps: int, batch: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)].float() / 127.5 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        sample = images[:2000].float() / 127.5 - 1
        std = torch.cat([vae.encode(sample[i:i + 500]).latent_dist.mean for i in range(0, 2000, 500)]).std()
    vae.register_to_config(scaling_factor=float(1 / std))
    return vae


def text_parts(folder: Path, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel
    from tiny_sd import clip_tokenizer

    tokenizer = clip_tokenizer(folder / "vocab", max_length=12, words=WORDS)
    V = len(tokenizer.get_vocab())
    torch.manual_seed(seed)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=12, bos_token_id=V - 2,
                                           eos_token_id=V - 1, pad_token_id=V - 1))
    return tokenizer, encoder


def train_teacher(latents: Path, steps: int, batch: int, seed: int):
    """diffusers' text-to-image recipe on the cached latents and caption embeddings: (EMA UNet, scheduler)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    cache = load_latent_cache(latents, stream="never")
    x, ids, table, null = cache.train, cache.train_text_ids, cache.text_table, cache.null_text
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 128), cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1)
    ema = EMAModel(unet.parameters(), decay=0.999)
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(x), (batch,), generator=gen)
        text = table[ids[rows]]
        drop = torch.rand(batch, generator=gen) < 0.1
        text = torch.where(drop[:, None, None], null, text)
        noise = torch.randn(x[rows].shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(x[rows], noise, t), t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
    ema.copy_to(unet.parameters())
    return unet.eval(), scheduler


def reconstruction_fd(vae, latents: Path) -> float:
    images = load_latent_cache(latents).holdout_images[:2000]
    with torch.no_grad():
        mean = torch.cat([vae.encode(images[i:i + 500].float() / 127.5 - 1).latent_dist.mean
                          for i in range(0, len(images), 500)])
        recon = torch.cat([vae.decode(mean[i:i + 500]).sample for i in range(0, len(mean), 500)])
    recon = ((recon + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    scorer = ImageScorer(images, ["fd"], 28, None, "cpu")
    return scorer.score(recon.numpy())["fd"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/latent-fmnist")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--teacher-steps", type=int, default=4000)
    parser.add_argument("--student-steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", action="store_true", help="keep what --out already holds")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    W, timings = args.guidance, {}
    from diffusers import StableDiffusionPipeline

    teacher, latents = out / "teacher", out / "latents"
    if not (args.reuse and (teacher / "model_index.json").is_file()):
        start = time.perf_counter()
        data = load_images("fashion-mnist", resolution=32)
        vae = train_vae(data.train, args.vae_steps, args.batch, args.seed)
        tokenizer, encoder = text_parts(out, args.seed)
        skeleton = out / "components"
        vae.save_pretrained(str(skeleton / "vae"), safe_serialization=True)
        tokenizer.save_pretrained(str(skeleton / "tokenizer"))
        encoder.save_pretrained(str(skeleton / "text_encoder"), safe_serialization=True)
        timings["vae"] = time.perf_counter() - start
        cmkit_cli("data", "encode", "fashion-mnist", "--pipeline", skeleton, "--caption-template", TEMPLATE,
                  "--resolution", 32, "--out", latents, *(["--force"] if latents.exists() else []))
        start = time.perf_counter()
        unet, scheduler = train_teacher(latents, args.teacher_steps, args.batch, args.seed)
        timings["teacher"] = time.perf_counter() - start
        StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=encoder, tokenizer=tokenizer, scheduler=scheduler,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False
                                ).save_pretrained(str(teacher), safe_serialization=True)
    from diffusers import AutoencoderKL
    recon = reconstruction_fd(AutoencoderKL.from_pretrained(str(teacher / "vae")), latents)
    students = {"lcm": ["--guidance", f"1,{2 * W - 1:g}"],
                "lcm-random-w": ["--guidance", f"1,{2 * W - 1:g}"],
                "lcm-lora": ["--guidance", f"{W:g},{W:g}", "--set", "objective.lora_rank=16", "--set",
                             "objective.lora_alpha=16", "--set", "train.lr=1e-3"]}
    for method, extra in students.items():
        run = out / method
        if args.reuse and (run / "config.json").is_file():
            continue
        start = time.perf_counter()
        cmkit_cli("train", "--method", method.removesuffix("-random-w"), "--teacher", teacher, "--data", latents,
                  "--steps", args.student_steps, "--batch-size", args.batch, "--seed", args.seed, "--out", run,
                  "--force", "--quiet", *extra,
                  reference_w_init=method.endswith("-random-w"))
        timings[method] = time.perf_counter() - start
    rows = []
    evals = [("teacher (Heun, guided)", teacher, [25], W), ("lcm", out / "lcm", [1, 2, 4], W),
             ("lcm, the reference's random w init", out / "lcm-random-w", [1, 2, 4], W),
             ("lcm-lora", out / "lcm-lora", [1, 2, 4], None)]
    for label, path, steps, guidance in evals:
        result = evaluate_run(str(path), data=str(latents), steps=steps, n=args.n, seed=args.seed,
                              guidance=guidance)
        floor = result["floor"]["fd"]
        for row in result["results"]:
            rows.append((label, row["steps"], row["nfe"], row["fd"], row.get("class_accuracy")))
    teacher_fd, teacher_acc = rows[0][3], rows[0][4]
    print(f"VAE reconstruction FD (held-out, n=2000): {recon:.2f}; data floor through the decoder: {floor:.2f}")
    print(f"guidance {W:g}; n = {args.n}; timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print("| model | steps | NFE | FD | FD / teacher | prompt agreement | agreement / teacher |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, steps, nfe, fd, acc in rows:
        print(f"| {label} | {steps} | {nfe} | {fd:.2f} | {fd / teacher_fd:.2f} | {acc:.3f} | {acc / teacher_acc:.2f} |")
    lcm4 = next(r for r in rows if r[0] == "lcm" and r[1] == 4)
    print(f"targets: LCM 4-step FD <= 1.5x teacher: {'met' if lcm4[3] <= 1.5 * teacher_fd else 'missed'} "
          f"({lcm4[3] / teacher_fd:.2f}x); agreement >= 0.9 of teacher's: "
          f"{'met' if lcm4[4] >= 0.9 * teacher_acc else 'missed'} ({lcm4[4] / teacher_acc:.2f})")
    (out / "results.json").write_text(json.dumps({"rows": rows, "recon_fd": recon, "floor": floor,
                                                  "timings": timings}, indent=2))


if __name__ == "__main__":
    main()
