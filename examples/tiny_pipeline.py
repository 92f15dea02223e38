"""A tiny Stable Diffusion folder of random weights and captioned images, to try cmkit's latent
path (encode, LCM and LCM-LoRA, sample, export, serve) in minutes without downloading anything:

    python examples/tiny_pipeline.py --out runs/tiny-sd --images runs/tiny-images

The folder is a real ``StableDiffusionPipeline`` (diffusers writes it): a CLIP tokenizer whose
vocabulary spells the captions' words, a 1-layer CLIPTextModel, a 1-channel AutoencoderKL (8x8 grey
images -> 4x4x4 latents), a UNet2DConditionModel and Stable Diffusion's DDPMScheduler. Its weights
are random, so what it and its students draw is noise: the point is to see every command run. The
images are scikit-learn's 8x8 digits 0-3, each with a caption "a photo of a digit two" in a .txt
beside it. cmkit's tests build the same components (tests/tiny_sd.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["a", "photo", "of", "zero", "one", "two", "three", "digit", "sneaker", "bag"]


def clip_tokenizer(folder: Path, max_length: int = 8, words=WORDS):
    """A CLIPTokenizer whose BPE vocabulary spells exactly ``words`` (other text: unknown tokens)."""
    from transformers import CLIPTokenizer
    vocab, merges = {}, []
    for c in sorted(set("".join(words))):
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def components(tmp: Path, seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tokenizer = clip_tokenizer(tmp / "vocab")
    V = len(tokenizer.get_vocab())
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, max_position_embeddings=8, bos_token_id=V - 2,
                                                eos_token_id=V - 1, pad_token_id=V - 1))
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=8)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
                              prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def save_sd(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline folder of tiny random components."""
    import tempfile
    from diffusers import StableDiffusionPipeline
    with tempfile.TemporaryDirectory() as vocabulary:  # the tokenizer's files, until the pipeline copies them
        parts = components(Path(vocabulary), seed, prediction_type)
        StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                requires_safety_checker=False).save_pretrained(str(folder), safe_serialization=True)
    return folder


NAMES = ["zero", "one", "two", "three"]


def captioned_folder(folder: Path, n: int = 40, layout: str = "txt") -> Path:
    """``n`` 8x8 grey digit images (classes 0-3) with captions "a photo of a digit NAME", beside
    each image (``txt``) or in metadata.jsonl (``jsonl``)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    keep = np.flatnonzero(digits.target < 4)[:n]
    folder.mkdir(parents=True)
    rows = []
    for i in keep:
        name = f"{i:05d}.png"
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).save(folder / name)
        caption = f"a photo of a digit {NAMES[digits.target[i]]}"
        if layout == "txt":
            (folder / name).with_suffix(".txt").write_text(caption)
        rows.append({"file_name": name, "text": caption})
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="the StableDiffusionPipeline folder to write (new)")
    p.add_argument("--images", help="also write captioned digit images to this folder (new)")
    p.add_argument("--n", type=int, default=400, help="how many images (at most 720; default 400)")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (default 0)")
    args = p.parse_args(argv)
    for folder in filter(None, (args.out, args.images)):
        if Path(folder).exists():
            print(f"tiny_pipeline: {folder} already exists; choose another path or remove it", file=sys.stderr)
            return 2
    save_sd(Path(args.out), seed=args.seed)
    print(f"wrote a StableDiffusionPipeline of random weights to {args.out}")
    if args.images:
        captioned_folder(Path(args.images), n=args.n)
        print(f"wrote {args.n} captioned 8x8 images to {args.images}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
