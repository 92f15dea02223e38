"""Memory of LCM and LCM-LoRA training: on paper at Stable Diffusion 1.5's size, measured at a small size.

    python bench/latent_memory.py [--steps 3] [--batch 8]

1. On paper: SD-1.5's UNet, text encoder and VAE are built from their public configs on PyTorch's
   ``meta`` device (no weights, no download) to count parameters, and LoRA's with the reference's
   rank 64 and target modules. The table multiplies them out: float32 weights, gradients, Adam's two
   moments, the sampling EMA, LCM's EMA target and the teacher, as cmkit holds them (LoRA: the
   adapters train; the EMA and the teacher share the base UNet). Activations are not on paper:
   they depend on batch, resolution and kernels; the measured rows show them.
2. Measured: a small UNet2DConditionModel (about 19M parameters, 16x16x4 latents) as a
   StableDiffusionPipeline folder; each method trains ``--steps`` steps in its own process and the
   table reports the process's peak resident memory (metrics.jsonl's max_memory_mb) and the bytes
   of model state the trainer holds (parameters, buffers, optimizer state; a tensor shared by two
   modules counted once).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

LORA_TARGETS = json.loads((ROOT / "src/cmkit/configs/lcm-lora.json").read_text())["objective"]["lora_target_modules"]
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=512)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77)
GB = 1e9


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_paper() -> list[str]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cmkit.nets.diffusers_text_unet import add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        n_unet, n_vae = count(unet), count(AutoencoderKL(**SD15_VAE))
        n_text = count(CLIPTextModel(CLIPTextConfig(**SD15_TEXT)))
        add_lora(unet, rank=64, alpha=64, dropout=0.0, target_modules=LORA_TARGETS)
        n_lora = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    b = 4  # float32
    full = {"student weights": n_unet * b, "gradients": n_unet * b, "Adam moments": 2 * n_unet * b,
            "sampling EMA": n_unet * b, "EMA target": n_unet * b, "teacher": n_unet * b}
    lora = {"student weights": (n_unet + n_lora) * b, "gradients": n_lora * b, "Adam moments": 2 * n_lora * b,
            "sampling EMA": n_lora * b, "EMA target": 0, "teacher": 0}
    lines = [f"SD-1.5 parameters: UNet {n_unet / 1e6:.1f}M, text encoder {n_text / 1e6:.1f}M, VAE {n_vae / 1e6:.1f}M, "
             f"LoRA (rank 64) {n_lora / 1e6:.1f}M", "",
             "| float32 state, GB | lcm (whole UNet) | lcm-lora (rank 64) |", "| --- | ---: | ---: |"]
    for key in full:
        lines.append(f"| {key} | {full[key] / GB:.2f} | {lora[key] / GB:.2f} |")
    lines.append(f"| **total before activations** | **{sum(full.values()) / GB:.1f}** | **{sum(lora.values()) / GB:.1f}** |")
    lines.append(f"| text encoder + VAE (sampling and `data encode` only; cached latents in training) | "
                 f"{(n_text + n_vae) * b / GB:.2f} | {(n_text + n_vae) * b / GB:.2f} |")
    return lines


def small_pipeline(folder: Path) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tiny_sd import components

    parts = components(folder.parent / "parts")
    torch.manual_seed(0)
    parts["unet"] = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                         block_out_channels=(128, 256, 512),
                                         down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                         cross_attention_dim=16, attention_head_dim=8, norm_num_groups=32)
    parts["vae"] = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                 latent_channels=4, norm_num_groups=8, sample_size=32)
    parts["scheduler"] = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       clip_sample=False, steps_offset=1)
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(str(folder), safe_serialization=True)


def state_bytes(trainer) -> int:
    """Parameters, buffers and optimizer state the trainer holds (shared tensors once)."""
    seen, total = set(), 0
    tensors = [t for m in trainer.modules.values() for t in (*m.parameters(), *m.buffers())]
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    teacher = getattr(trainer.objective, "teacher", None)
    if teacher is not None:
        tensors += list(teacher.parameters())
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measured(work: Path, steps: int, batch: int) -> list[str]:
    from cmkit.config import build_config
    from cmkit.training import Trainer
    from tiny_sd import captioned_folder

    small_pipeline(work / "sd")
    images = captioned_folder(work / "images", n=64)
    # 8x8 digits padded to 32x32: 16x16x4 latents.
    subprocess.run([sys.executable, "-m", "cmkit", "data", "encode", str(images), "--pipeline", str(work / "sd"),
                    "--out", str(work / "latents"), "--resolution", "32"], check=True, capture_output=True)
    variants = [("lcm", "lcm", []), ("lcm, gradient checkpointing", "lcm", ["train.gradient_checkpointing=true"]),
                ("lcm-lora", "lcm-lora", []),
                ("lcm-lora, gradient checkpointing", "lcm-lora", ["train.gradient_checkpointing=true"])]
    lines = ["| method (small UNet, batch %d) | model state MB | peak RSS MB |" % batch, "| --- | ---: | ---: |"]
    for label, method, sets in variants:
        overrides = {"data.name": str(work / "latents"), "objective.guidance": [2.0, 8.0], "train.batch_size": batch}
        overrides.update({s.split("=")[0]: s.split("=")[1] == "true" for s in sets})
        state = state_bytes(Trainer(build_config(method, teacher=str(work / "sd"), **overrides)))
        out = work / label.replace(" ", "_").replace(",", "")
        args = [sys.executable, "-m", "cmkit", "train", "--method", method, "--teacher", str(work / "sd"), "--data",
                str(work / "latents"), "--guidance", "2,8", "--batch-size", str(batch), "--steps", str(steps),
                "--out", str(out), "--quiet", "--set", "train.log_every=1"]
        for s in sets:
            args += ["--set", s]
        subprocess.run(args, check=True, capture_output=True)
        peak = max(json.loads(line)["max_memory_mb"] for line in (out / "metrics.jsonl").read_text().splitlines())
        lines.append(f"| {label} | {state / 2**20:.0f} | {peak:.0f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print("\n".join(on_paper()))
    print()
    with tempfile.TemporaryDirectory() as tmp:
        print("\n".join(measured(Path(tmp), args.steps, args.batch)))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
