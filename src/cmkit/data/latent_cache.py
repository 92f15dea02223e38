"""Latent data sets: an image source encoded once by a VAE (and its captions by a text encoder),
cached in a folder that training, sampling and eval read like any data source.

    cmkit data encode IMAGES --pipeline sd15 --out latents/     # VAE, tokenizer, text encoder
    cmkit train --method lcm --teacher sd15 --data latents/ ...

The folder holds ``latents.json`` (what was encoded, with what, and the source's fingerprint),
``latents.safetensors`` (train/held-out latents in model units, the held-out images for FD, labels,
caption indices and one embedding per distinct caption) and a copy of the components that made it
(``vae/``, and ``tokenizer/`` + ``text_encoder/`` for captions), so a run trained on it carries
the decoder and prompt encoder it needs. The train/held-out split is the source's own (the same
seed and fraction as training on the images); the first `MAX_HOLDOUT` held-out images are kept.
Encoding holds one batch of decoded images at a time; the latents themselves are one file, read
into memory by training (64 KB per 512x512 image: sharded caches are for later). Loading refuses a cache whose source changed since
(`LatentData.fingerprint` is recorded by runs, so a resume refuses a re-encoded cache too).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CmkitError
from ..latents import LatentCodec, LatentScaler
from ..safe_io import file_sha256, read_json
from ..text import PromptEncoder
from .captions import source_captions, template_captions
from .files import holdout_split
from .images import count_classes, holdout_fingerprint

INDEX, TENSORS = "latents.json", "latents.safetensors"
FORMAT = "cmkit-latents"
COMPONENTS = ("vae", "tokenizer", "text_encoder")
MAX_HOLDOUT = 10_000  # held-out latents and images kept for eval (its largest n)
COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt")  # what a component copy may hold (no pickles)


def is_latent_cache(name) -> bool:
    return bool(name) and (Path(name) / INDEX).is_file()


@dataclass
class LatentData:
    name: str  # the cache folder
    train: torch.Tensor  # (N, c, h, w) float32 latents, model units
    holdout: torch.Tensor
    holdout_images: torch.Tensor  # (M, C, H, W) uint8: what samples are compared with
    meta: dict  # latents.json
    train_labels: torch.Tensor | None = None
    holdout_labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    train_text_ids: torch.Tensor | None = None  # (N,) rows of text_table
    holdout_text_ids: torch.Tensor | None = None
    text_table: torch.Tensor | None = None  # (U, L, D): one embedding per distinct caption
    null_text: torch.Tensor | None = None  # (1, L, D): the empty prompt

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    @property
    def captions(self) -> list[str] | None:
        return self.meta.get("captions")

    num_classes = property(lambda self: count_classes(self.train_labels, self.holdout_labels))

    def fingerprint(self) -> dict:
        """The cache's identity: its source's fingerprint and its tensors' digest."""
        return {**(self.meta.get("source_fingerprint") or {}), "latents_sha256": self.meta["latents_sha256"]}

    def scaler_state(self) -> dict:
        return {"kind": "latent", "shape": list(self.shape), "image_shape": list(self.image_shape),
                "scaling_factor": self.meta["scaling_factor"], "shift_factor": self.meta["shift_factor"]}


def _copy_component(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and path.suffix in COMPONENT_SUFFIXES:
            shutil.copy2(path, dst / path.name)


def copy_components(src: Path, dst: Path) -> None:
    """The VAE, tokenizer and text encoder folders of ``src`` that exist, copied into ``dst``
    (their JSON, text and safetensors files only)."""
    for name in COMPONENTS:
        if (src / name).is_dir() and not (dst / name).exists():
            _copy_component(src / name, dst / name)


def encode_source(source: str, out: str | Path, *, pipeline: str | Path | None = None, vae: str | Path | None = None,
                  captions: bool | None = None, caption_template: str | None = None, resolution: int | None = None,
                  fit: str = "pad", holdout_fraction: float = 0.1, seed: int = 0, batch_size: int = 64,
                  force: bool = False) -> Path:
    """Encode ``source`` into a latent cache at ``out`` with ``pipeline``'s components (or a bare
    ``vae`` folder: latents without text). ``captions``: read the source's captions (default: when
    a text encoder is at hand); ``caption_template``: make them from class names instead."""
    from . import is_builtin, load_images
    from .streams import is_stream_source, open_source

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (force and is_latent_cache(out)):
            raise CmkitError(f"{out} already exists" + (": pass --force to replace it" if is_latent_cache(out) else
                                                        " and is not a latent cache: choose another --out"))
    if (pipeline is None) == (vae is None):
        raise CmkitError("pass exactly one of --pipeline FOLDER (VAE and text encoder) and --vae FOLDER")
    folder = Path(pipeline) if pipeline is not None else None
    vae_dir = folder / "vae" if folder is not None else Path(vae)
    has_text = folder is not None and (folder / "text_encoder").is_dir()
    if captions is None:
        captions = has_text
    if (captions or caption_template) and not has_text:
        raise CmkitError("captions need a text encoder: pass --pipeline FOLDER with tokenizer/ and text_encoder/")
    # Built-in sets are in memory already; a user's source is decoded one batch at a time.
    data = load_images(source, resolution=resolution, fit=fit, holdout_fraction=holdout_fraction, seed=seed,
                       stream="never" if is_builtin(source) else "always")
    codec = LatentCodec.from_folder(vae_dir, image_channels=data.shape[0])
    latent_shape = codec.latent_shape(data.shape)
    encoder = PromptEncoder.from_folder(folder) if captions or caption_template else None
    texts = None
    if caption_template:
        texts = (template_captions(caption_template, data.train_labels, data.class_names),
                 template_captions(caption_template, data.holdout_labels[:MAX_HOLDOUT], data.class_names))
    elif captions:
        if not (is_stream_source(source) or Path(source).is_dir()):
            raise CmkitError(f"{source} has no captions: use a folder or tar shards with captions, or "
                             "--caption-template for labelled data")
        opened = open_source(source)
        all_captions = source_captions(opened)
        train_rows, holdout_rows = holdout_split(len(opened), holdout_fraction, seed, source, "images")
        texts = ([all_captions[i] for i in train_rows], [all_captions[i] for i in holdout_rows[:MAX_HOLDOUT]])
    kept = min(len(data.holdout), MAX_HOLDOUT)  # what eval compares with; training never reads them
    holdout = data.holdout[torch.arange(kept)]
    tensors = {"train": codec.encode(data.train, batch_size, progress=True), "holdout": codec.encode(holdout, batch_size),
               "holdout_images": holdout.contiguous()}
    bad = getattr(data.train, "bad", 0) + getattr(data.holdout, "bad", 0)
    if bad:  # a streamed source skips what does not decode: captions and labels would shift
        raise CmkitError(f"{source}: {bad} image(s) do not decode (cmkit data check {source} lists them); fix or "
                         "remove them, then encode again")
    if data.train_labels is not None:
        tensors.update(train_labels=data.train_labels, holdout_labels=data.holdout_labels[:kept])
    distinct = None
    if texts is not None:
        distinct = sorted(set(texts[0]) | set(texts[1]))
        row = {text: i for i, text in enumerate(distinct)}
        tensors["train_text_ids"] = torch.tensor([row[t] for t in texts[0]], dtype=torch.long)
        tensors["holdout_text_ids"] = torch.tensor([row[t] for t in texts[1]], dtype=torch.long)
        tensors["text_table"] = encoder(distinct)
        tensors["null_text"] = encoder.null()
    meta = {"format": FORMAT, "version": 1, "source": source if not Path(source).exists() else
            str(Path(source).resolve()), "source_fingerprint": data.fingerprint(),
            "resolution": resolution, "fit": fit, "holdout_fraction": holdout_fraction, "seed": seed,
            "image_shape": list(data.shape), "shape": list(latent_shape), "native_size": data.native_size,
            "scaling_factor": codec.scaling_factor, "shift_factor": codec.shift_factor,
            "vae_sha256": LatentCodec.fingerprint(vae_dir), "class_names": data.class_names,
            "captions": distinct, "caption_template": caption_template,
            "text_encoder_sha256": file_sha256(folder / "text_encoder" / "model.safetensors") if encoder else None}
    return _write(out, tensors, meta, folder if encoder else None, vae_dir)


def _write(out: Path, tensors: dict, meta: dict, text_folder: Path | None, vae_dir: Path) -> Path:
    """The cache, written beside ``out`` and renamed into place: a cache is whole or absent."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        meta["latents_sha256"] = file_sha256(tmp / TENSORS)
        _copy_component(vae_dir, tmp / "vae")
        if text_folder is not None:
            copy_components(text_folder, tmp)
        (tmp / INDEX).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_latent_cache(name: str | Path) -> LatentData:
    """A latent cache, refused if its source changed since it was encoded."""
    from safetensors.torch import load_file

    folder = Path(name)
    meta = read_json(folder / INDEX, "latent cache index")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CmkitError(f"{folder / INDEX} is not a cmkit latent cache index")
    if file_sha256(folder / TENSORS) != meta.get("latents_sha256"):
        raise CmkitError(f"{folder / TENSORS} changed since it was written: encode the source again")
    if meta.get("source_fingerprint"):
        _check_source(meta)
    try:
        t = load_file(str(folder / TENSORS))
    except (OSError, ValueError, RuntimeError) as e:
        raise CmkitError(f"cannot read {folder / TENSORS}: {str(e).splitlines()[0]}") from None
    return LatentData(str(folder.resolve()), t["train"], t["holdout"], t["holdout_images"], meta,
                      t.get("train_labels"), t.get("holdout_labels"), meta.get("class_names"),
                      t.get("train_text_ids"), t.get("holdout_text_ids"), t.get("text_table"), t.get("null_text"))


def _check_source(meta: dict) -> None:
    """The source's fingerprint now against the recorded one (a source no longer at hand passes:
    the cache is what trains)."""
    from .streams import open_source

    source = meta["source"]
    if not Path(source).exists():
        return
    opened = open_source(source)
    rows = holdout_split(len(opened), meta["holdout_fraction"], meta["seed"], source, "images")[1]
    if holdout_fingerprint([opened.keys[r] for r in rows], len(opened)) != meta["source_fingerprint"]:
        raise CmkitError(f"{source} changed since this latent cache was encoded ({meta['source_fingerprint']['images']} "
                         f"images then, {len(opened)} now, or other held-out images): encode it again")


def latent_scaler(state: dict, components: str | Path) -> LatentScaler:
    """A latent run's scaler, decoding through ``components``/vae."""
    return LatentScaler(state, LatentCodec.from_folder(Path(components) / "vae", image_channels=state["image_shape"][0]))


__all__ = ["LatentData", "encode_source", "is_latent_cache", "latent_scaler", "load_latent_cache"]
