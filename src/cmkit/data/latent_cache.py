"""Latent data sets: an image source encoded once by a VAE (and its captions by a text encoder),
cached in a folder that training, sampling and eval read like any data source.

    cmkit data encode IMAGES --pipeline sd15 --out latents/     # VAE, tokenizer, text encoder
    cmkit train --method lcm --teacher sd15 --data latents/ ...

The folder holds ``latents.json`` (what was encoded, with what, the source's fingerprint and
each file's SHA-256), the training latents (model units) in ``train-NNNNN.safetensors`` shards of
at most `SHARD_MB`, the held-out latents with their images (what FD compares with) in
``holdout-NNNNN.safetensors``, ``tables.safetensors`` (labels, caption indices, the empty
prompt's embedding and, when cached, one embedding per distinct caption) and a copy of the
components that made it (``vae/``, and ``tokenizer/`` + ``text_encoder/`` for captions), so a run
trained on it carries the decoder and prompt encoder it needs. The train/held-out split is the
source's own (the same seed and fraction as training on the images); the first `MAX_HOLDOUT`
held-out images are kept. Encoding holds one batch of images and one shard of latents at a time;
training reads small caches into memory and streams large ones from their shards (``data.stream``,
as for images). Loading refuses a cache whose files or source changed since
(`LatentData.fingerprint` is recorded by runs, so a resume refuses a re-encoded cache too).
"""

from __future__ import annotations

import hashlib
import json
import math
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
from .images import STREAM_ABOVE_MB, count_classes, holdout_fingerprint
from .row_shards import ShardedRows, ShardWriter, check_shards

INDEX, TABLES = "latents.json", "tables.safetensors"
FORMAT, VERSION = "cmkit-latents", 2
SHARD_MB = 256.0  # the most one shard of latents (and held-out images) holds
TEXT_EMBEDDINGS = ("auto", "cache", "encode")
TEXT_CACHE_AUTO_MB = 256.0  # "auto" caches the distinct captions' embeddings up to this size
MAX_INDEX_BYTES = 1 << 30  # latents.json lists every distinct caption
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
                  text_embeddings: str = "auto", shard_mb: float = SHARD_MB, force: bool = False) -> Path:
    """Encode ``source`` into a latent cache at ``out`` with ``pipeline``'s components (or a bare
    ``vae`` folder: latents without text). ``captions``: read the source's captions (default: when
    a text encoder is at hand); ``caption_template``: make them from class names instead;
    ``text_embeddings``: "cache" the distinct captions' embeddings, "encode" them in each training
    step with the frozen text encoder, or "auto": cache up to `TEXT_CACHE_AUTO_MB`."""
    from safetensors.torch import save_file

    from . import is_builtin, load_images

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (force and is_latent_cache(out)):
            raise CmkitError(f"{out} already exists" + (": pass --force to replace it" if is_latent_cache(out) else
                                                        " and is not a latent cache: choose another --out"))
    if (pipeline is None) == (vae is None):
        raise CmkitError("pass exactly one of --pipeline FOLDER (VAE and text encoder) and --vae FOLDER")
    if text_embeddings not in TEXT_EMBEDDINGS:
        raise CmkitError(f"--text-embeddings must be one of {', '.join(TEXT_EMBEDDINGS)}, got {text_embeddings!r}")
    if not (math.isfinite(shard_mb) and shard_mb > 0):
        raise CmkitError(f"--shard-mb must be positive, got {shard_mb}")
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
    texts = _read_captions(source, data, captions, caption_template, holdout_fraction, seed)
    kept = min(len(data.holdout), MAX_HOLDOUT)  # what eval compares with; training never reads them
    tables = _tables(data, kept, texts, encoder, text_embeddings)
    meta = {"format": FORMAT, "version": VERSION, "source": source if not Path(source).exists() else
            str(Path(source).resolve()), "source_fingerprint": data.fingerprint(),
            "resolution": resolution, "fit": fit, "holdout_fraction": holdout_fraction, "seed": seed,
            "image_shape": list(data.shape), "shape": list(latent_shape), "native_size": data.native_size,
            "scaling_factor": codec.scaling_factor, "shift_factor": codec.shift_factor,
            "vae_sha256": LatentCodec.fingerprint(vae_dir), "class_names": data.class_names,
            "captions": tables.pop("captions", None), "caption_template": caption_template,
            "text_embeddings": None if texts is None else ("cached" if "text_table" in tables else "encoded"),
            "text_encoder_sha256": file_sha256(folder / "text_encoder" / "model.safetensors") if encoder else None}
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        row_bytes = 4 * math.prod(latent_shape)
        meta["train_shards"] = _encode_rows(codec, data.train, ShardWriter(tmp, "train", row_bytes, shard_mb),
                                            batch_size, progress=True)
        holdout = data.holdout[torch.arange(kept)] if kept else data.holdout
        meta["holdout_shards"] = _encode_rows(codec, holdout, ShardWriter(
            tmp, "holdout", row_bytes + math.prod(data.shape), shard_mb), batch_size, keep_images=True)
        bad = getattr(data.train, "bad", 0) + getattr(data.holdout, "bad", 0)
        if bad:  # a streamed source skips what does not decode: captions and labels would shift
            raise CmkitError(f"{source}: {bad} image(s) do not decode (cmkit data check {source} lists them); fix "
                             "or remove them, then encode again")
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp / TABLES))
        meta["tables_sha256"] = file_sha256(tmp / TABLES)
        meta["latents_sha256"] = _digest(meta)
        _copy_component(vae_dir, tmp / "vae")
        if encoder is not None:
            copy_components(folder, tmp)
        (tmp / INDEX).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # a cache is whole or absent
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _read_captions(source: str, data, captions: bool, caption_template: str | None, holdout_fraction: float,
                   seed: int) -> tuple[list[str], list[str]] | None:
    """(the training rows' captions, the kept held-out rows'), or None for latents without text."""
    from .streams import is_stream_source, open_source

    if caption_template:
        return (template_captions(caption_template, data.train_labels, data.class_names),
                template_captions(caption_template, data.holdout_labels[:MAX_HOLDOUT], data.class_names))
    if not captions:
        return None
    if not (is_stream_source(source) or Path(source).is_dir()):
        raise CmkitError(f"{source} has no captions: use a folder or tar shards with captions, or "
                         "--caption-template for labelled data")
    opened = open_source(source)
    every = source_captions(opened)
    train_rows, holdout_rows = holdout_split(len(opened), holdout_fraction, seed, source, "images")
    return [every[i] for i in train_rows], [every[i] for i in holdout_rows[:MAX_HOLDOUT]]


def _tables(data, kept: int, texts, encoder: PromptEncoder | None, text_embeddings: str) -> dict:
    """The small per-row tensors (labels, caption indices) and the caption table: the embeddings
    of each distinct caption (when cached) and of the empty prompt; "captions": the distinct ones."""
    tables: dict = {}
    if data.train_labels is not None:
        tables.update(train_labels=data.train_labels, holdout_labels=data.holdout_labels[:kept])
    if texts is None:
        return tables
    distinct = sorted(set(texts[0]) | set(texts[1]))
    row = {text: i for i, text in enumerate(distinct)}
    tables["train_text_ids"] = torch.tensor([row[t] for t in texts[0]], dtype=torch.long)
    tables["holdout_text_ids"] = torch.tensor([row[t] for t in texts[1]], dtype=torch.long)
    tables["null_text"] = encoder.null()
    if _cache_text(text_embeddings, len(distinct), encoder):
        tables["text_table"] = encoder(distinct)
    else:  # training encodes each batch's captions: checked here once (a truncation is warned of now)
        encoder.token_ids(distinct)
    tables["captions"] = distinct
    return tables


def _cache_text(choice: str, captions: int, encoder: PromptEncoder) -> bool:
    if choice == "auto":
        length, width = encoder.shape
        return captions * length * width * 4 <= TEXT_CACHE_AUTO_MB * 2**20
    return choice == "cache"


def _encode_rows(codec: LatentCodec, images, writer: ShardWriter, batch_size: int, *, progress: bool = False,
                 keep_images: bool = False) -> list[dict]:
    """``images`` encoded into ``writer``'s shards one batch at a time (with the images themselves
    when ``keep_images``): memory holds a batch of images and a shard of latents."""
    for batch, latents in codec.encode_batches(images, batch_size, progress):
        writer.add(latents=latents, **({"images": batch.contiguous()} if keep_images else {}))
    return writer.close()


def _digest(meta: dict) -> str:
    """The cache's content identity: the SHA-256 of its files' SHA-256s."""
    shas = [s["sha256"] for s in (*meta["train_shards"], *meta["holdout_shards"])] + [meta["tables_sha256"]]
    return hashlib.sha256(json.dumps(shas).encode()).hexdigest()


def load_latent_cache(name: str | Path, stream: str = "auto", stream_above_mb: float = STREAM_ABOVE_MB) -> LatentData:
    """A latent cache, refused if its source or its files changed since it was encoded. Its
    training latents are read into memory unless ``stream`` says otherwise ("always", or "auto"
    above ``stream_above_mb``): then they stay in their shards and batches read the rows they need.
    Held-out latents and images are read when eval asks for them."""
    from safetensors.torch import load_file

    folder = Path(name)
    meta = read_json(folder / INDEX, "latent cache index", max_bytes=MAX_INDEX_BYTES)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CmkitError(f"{folder / INDEX} is not a cmkit latent cache index")
    if meta.get("version") != VERSION:
        raise CmkitError(f"{folder} is a latent cache of format version {meta.get('version')}; this cmkit reads "
                         f"version {VERSION}: encode the source again (cmkit data encode ... --force)")
    try:
        check_shards(folder, [*meta["train_shards"], *meta["holdout_shards"],
                              {"file": TABLES, "sha256": meta["tables_sha256"]}])
        edited = _digest(meta) != meta["latents_sha256"]
    except (KeyError, TypeError):
        edited = True
    if edited:
        raise CmkitError(f"{folder / INDEX} was edited since it was written: encode the source again")
    if meta.get("source_fingerprint"):
        _check_source(meta)
    try:
        t = load_file(str(folder / TABLES))
    except (OSError, ValueError, RuntimeError) as e:
        raise CmkitError(f"cannot read {folder / TABLES}: {str(e).splitlines()[0]}") from None
    train = ShardedRows(folder, meta["train_shards"], "latents")
    if stream == "never" or (stream == "auto" and train.nbytes <= stream_above_mb * 2**20):
        train = train.materialize()
    if meta["holdout_shards"]:
        holdout = ShardedRows(folder, meta["holdout_shards"], "latents")
        holdout_images = ShardedRows(folder, meta["holdout_shards"], "images")
    else:
        holdout = torch.zeros((0, *meta["shape"]))
        holdout_images = torch.zeros((0, *meta["image_shape"]), dtype=torch.uint8)
    return LatentData(str(folder.resolve()), train, holdout, holdout_images, meta,
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
