"""Streamed image data: one set as a folder, an EDM zip, tar shards and an .npy trains to the same
weights, loaded or streamed; processes read disjoint rows of each global batch and resume where
they stopped; a streamed run decodes only the images it draws; undecodable images are skipped and
counted; held-out images never reach training; bad sources are one-line errors."""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmkit.checkpoint import checkpoint_dir, read_run_config
from cmkit.config import build_config
from cmkit.data.images import load_images
from cmkit.data.streams import StreamedImages, TarSource, expand_braces, open_source
from cmkit.distributed import World
from cmkit.training import Trainer

from helpers import cli, tree_digest

STEPS = 20
TRAIN = ["--set", "model.preset=tiny", "--set", "train.batch_size=8", "--set", "train.sample_every=0",
         "--set", "train.log_every=1", "--set", "data.workers=1", "--quiet"]


def _pixels(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png(arr: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def make_sources(root: Path, n: int = 48, classes: bool = False) -> dict:
    """The same images as a folder, tar shards (cmkit data pack), an EDM zip and (unlabelled) an .npy."""
    pixels = _pixels(n)
    folder = root / "folder"
    names = [f"c{i % 3}/img{i:04d}.png" if classes else f"img{i:04d}.png" for i in range(n)]
    for name, arr in zip(names, pixels):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_png(arr))
    assert cli("data", "pack", folder, root / "shards", "--shard-size", 20) == 0
    order = sorted(range(n), key=lambda i: names[i])  # the folder's (sorted) order
    with zipfile.ZipFile(root / "set.zip", "w") as archive:
        labels = []
        for position, i in enumerate(order):
            member = f"{position // 1000:05d}/img{position:08d}.png"
            archive.writestr(member, (folder / names[i]).read_bytes())
            labels.append([member, i % 3])
        archive.writestr("dataset.json", json.dumps({"labels": labels if classes else None}))
    last = (n - 1) // 20
    sources = {"folder": folder, "shards": root / "shards",
               "pattern": str(root / "shards" / f"train-{{000000..{last:06d}}}.tar"), "zip": root / "set.zip"}
    if not classes:
        np.save(root / "set.npy", pixels[order])
        sources["npy"] = root / "set.npy"
    return sources


def _train(data, out: Path, *extra) -> str:
    assert cli("train", "--method", "edm", "--data", data, "--steps", STEPS, "--out", out, *TRAIN, *extra) == 0
    return tree_digest(checkpoint_dir(out))["model.safetensors"]


@pytest.mark.slow
def test_every_source_trains_to_the_same_weights_loaded_or_streamed(tmp_path):
    sources = make_sources(tmp_path)
    digests = {(name, mode): _train(path, tmp_path / f"{name}-{mode}", "--set", f"data.stream={mode}")
               for name, path in sources.items() for mode in ("never", "always")}
    assert len(set(digests.values())) == 1, digests
    config = read_run_config(tmp_path / "shards-always")
    assert config["data_fingerprint"]["images"] == 48


def test_labelled_sources_agree_on_labels_and_class_names(tmp_path):
    sources = make_sources(tmp_path, n=30, classes=True)
    loaded = {name: load_images(str(path), stream="always") for name, path in sources.items()}
    reference = loaded["folder"]
    assert reference.class_names == ["c0", "c1", "c2"]
    for name, images in loaded.items():
        assert torch.equal(images.train_labels, reference.train_labels), name
        assert torch.equal(images.train[torch.arange(len(images.train))], reference.train[torch.arange(len(reference.train))]), name
    assert loaded["shards"].class_names == ["c0", "c1", "c2"]  # classes.json from cmkit data pack
    assert loaded["zip"].class_names is None  # EDM's dataset.json has labels, not names


def _rows(world: World, config: dict, step: int) -> list[int]:
    trainer = Trainer.__new__(Trainer)  # only what the plan reads
    trainer.world, trainer.train_cfg = world, config["train"]
    trainer.x_train = range(40)
    return torch.cat(list(trainer._planned_rows(step))).tolist()


def test_each_process_reads_its_share_of_every_global_batch():
    config = build_config("edm", **{"data.name": "digits", "train.batch_size": 8, "train.grad_accum": 2})
    for step in (0, 7, 19):
        whole = _rows(World(0, 1), config, step)
        shares = [_rows(World(rank, 2), config, step) for rank in (0, 1)]
        assert shares[0] + shares[1] == whole and len(shares[0]) == 4


@pytest.mark.slow
def test_two_processes_and_a_resume_on_another_count_read_what_one_does(tmp_path):
    from test_distributed import assert_same_weights, torchrun
    shards = make_sources(tmp_path)["shards"]
    args = ["train", "--method", "edm", "--data", shards, *TRAIN, "--set", "data.stream=always"]
    assert cli(*args, "--steps", STEPS, "--out", tmp_path / "one") == 0
    torchrun(*args, "--steps", STEPS, "--out", tmp_path / "two")
    assert_same_weights(tmp_path / "one", tmp_path / "two", ["model", "ema"])
    # 10 steps on one process, the rest on two: the same samples, so the same model.
    assert cli(*args, "--steps", STEPS // 2, "--out", tmp_path / "moved") == 0
    torchrun("train", "--method", "edm", "--resume", "--steps", STEPS, "--out", tmp_path / "moved", "--quiet")
    assert_same_weights(tmp_path / "one", tmp_path / "moved", ["model", "ema"])


def test_a_resume_continues_at_the_same_sample(tmp_path):
    """With gradient accumulation too: the loader restarts at the step, micro-batch 0."""
    shards = make_sources(tmp_path)["shards"]
    args = ["train", "--method", "edm", "--data", shards, *TRAIN, "--set", "data.stream=always",
            "--set", "train.grad_accum=2"]
    assert cli(*args, "--steps", STEPS, "--out", tmp_path / "straight") == 0
    assert cli(*args, "--steps", STEPS // 2, "--out", tmp_path / "split") == 0
    assert cli("train", "--method", "edm", "--resume", "--steps", STEPS, "--out", tmp_path / "split", "--quiet") == 0
    assert tree_digest(checkpoint_dir(tmp_path / "straight")) == tree_digest(checkpoint_dir(tmp_path / "split"))


def _tar_of_pngs(path: Path, n: int, corrupt: dict[int, bytes] | None = None) -> None:
    """n small PNGs (corrupt: index -> bytes to store instead)."""
    pixels = _pixels(n, size=4)
    with tarfile.open(path, "w") as archive:
        for i in range(n):
            data = (corrupt or {}).get(i) or _png(pixels[i])
            info = tarfile.TarInfo(f"{i:08d}.png")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_a_streamed_run_decodes_only_what_it_draws(tmp_path):
    """20,000 images in tar shards: building the trainer and 5 steps decode a few batches' worth,
    never the set (decodes counted in this process: no worker processes)."""
    _tar_of_pngs(tmp_path / "big.tar", 20_000)
    config = build_config("edm", **{"data.name": str(tmp_path / "big.tar"), "data.stream": "always",
                                    "data.workers": 0, "model.preset": "tiny", "train.batch_size": 16,
                                    "train.sample_every": 0})
    trainer = Trainer(config)
    images = trainer.x_train
    assert isinstance(images, StreamedImages) and len(images) == 18_000
    for step in range(5):
        trainer.step(step)
    assert images.reads <= 5 * 16 + 1  # the batches, and one image to learn the size and colour


def test_undecodable_members_are_skipped_and_counted(tmp_path, capsys):
    good = _png(_pixels(1, size=4)[0])
    corrupt = {3: b"not a png at all", 7: good[:len(good) // 2], 11: b"\x89PNG\r\n\x1a\n" + b"\0" * 40}
    _tar_of_pngs(tmp_path / "bad.tar", 60, corrupt)
    assert cli("data", "check", tmp_path / "bad.tar") == 1  # problems found
    out = capsys.readouterr().out
    assert "60 images: 57 readable, 3 unreadable" in out
    assert all(f"bad.tar:{i:08d}: " in out for i in corrupt)
    images = load_images(str(tmp_path / "bad.tar"), stream="always")
    keys = [images.train.source.keys[r] for r in images.train.rows]
    batch = images.train[torch.arange(len(images.train))]
    bad_rows = [i for i, key in enumerate(keys) if int(key) in corrupt]
    assert images.train.bad == len(bad_rows) and bad_rows
    for i in bad_rows:  # replaced by the next good row
        assert torch.equal(batch[i], batch[(i + 1) % len(batch)]) or (i + 1) in bad_rows
    # Training logs the count; loading the set into memory refuses it.
    assert cli("train", "--method", "edm", "--data", tmp_path / "bad.tar", "--steps", 30, "--out", tmp_path / "run",
               *TRAIN, "--set", "data.stream=always", "--set", "train.batch_size=32", "--set", "data.workers=0") == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["bad_images"] > 0
    assert cli("train", "--method", "edm", "--data", tmp_path / "bad.tar", "--steps", 2, "--out", tmp_path / "mem",
               *TRAIN) == 2
    assert "do not decode" in capsys.readouterr().err


def test_check_and_pack_name_each_bad_file_by_its_path(tmp_path, capsys):
    """A truncated PNG and a text file named .png: one count of each, both named by path, no
    object reprs; check exits 1; pack refuses naming both, and with --skip-bad names and skips them."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, arr in enumerate(_pixels(6)):
        (folder / f"img{i}.png").write_bytes(_png(arr))
    good = _png(_pixels(1, seed=1)[0])
    (folder / "cut.png").write_bytes(good[:len(good) // 2])
    (folder / "notes.png").write_text("not an image\n")
    assert cli("data", "check", folder) == 1
    out, err = capsys.readouterr()
    assert "8 images: 6 readable, 2 unreadable" in out and "decoded" not in out
    assert f"{folder / 'cut.png'}: " in out and f"{folder / 'notes.png'}: not a PNG or JPEG image" in out
    assert "0x" not in out + err
    assert cli("data", "pack", folder, tmp_path / "shards") == 2
    err = capsys.readouterr().err
    assert "2 image(s)" in err and str(folder / "cut.png") in err and str(folder / "notes.png") in err
    assert not (tmp_path / "shards").exists()  # refused: nothing written
    assert cli("data", "pack", folder, tmp_path / "shards", "--skip-bad") == 0
    out, err = capsys.readouterr()
    assert f"skipped {folder / 'cut.png'}" in err and f"skipped {folder / 'notes.png'}" in err
    assert len(open_source(str(tmp_path / "shards"))) == 6
    assert cli("data", "check", tmp_path / "shards") == 0


def test_a_folder_mixing_class_folders_and_loose_images_says_why_it_is_unlabelled(tmp_path, capsys):
    folder = tmp_path / "mixed"
    for i, arr in enumerate(_pixels(4)):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 2}" / f"{i}.png").write_bytes(_png(arr))
    (folder / "loose.png").write_bytes(_png(_pixels(1, seed=2)[0]))
    assert cli("data", "check", folder) == 0
    out = capsys.readouterr().out
    assert "classes: none (unlabelled: 1 of 5 images (e.g. loose.png) sit directly in" in out
    assert "c0, c1" in out
    images = load_images(str(folder))
    assert images.train_labels is None
    assert "cmkit: warning: unlabelled: 1 of 5 images" in capsys.readouterr().err
    (folder / "loose.png").unlink()
    assert load_images(str(folder)).class_names == ["c0", "c1"]


def test_too_many_bad_images_stop_the_run(tmp_path, capsys):
    corrupt = {i: b"junk" for i in range(0, 60, 2)}
    _tar_of_pngs(tmp_path / "half.tar", 60, corrupt)
    assert cli("train", "--method", "edm", "--data", tmp_path / "half.tar", "--steps", 40, "--out", tmp_path / "run",
               *TRAIN, "--set", "data.stream=always", "--set", "train.batch_size=32", "--set", "data.workers=0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not decode (more than data.max_bad_fraction = 0.01)" in err[0]


def test_held_out_images_never_reach_a_training_batch(tmp_path, monkeypatch):
    sources = make_sources(tmp_path, n=60)
    config = build_config("edm", **{"data.name": str(sources["zip"]), "data.stream": "always", "data.workers": 0,
                                    "model.preset": "tiny", "train.batch_size": 16, "train.sample_every": 0})
    trainer = Trainer(config)
    images, read = trainer.x_train, []
    original = StreamedImages.image
    monkeypatch.setattr(StreamedImages, "image", lambda self, i: read.append(int(self.rows[i])) or original(self, i))
    for step in range(30):  # 480 draws with replacement: every one of the 54 training images, almost surely
        trainer.step(step)
    holdout = set(load_images(str(sources["zip"]), stream="always").holdout.rows.tolist())
    assert set(read) == set(images.rows.tolist()) and not set(read) & holdout


@pytest.mark.parametrize("make, words", [
    (lambda root: str(root / "shards" / "train-{000000..000005}.tar"), "missing tar shard"),
    (lambda root: _zip_without_images(root), "holds no .png/.jpg/.jpeg images"),
])
def test_bad_sources_are_one_line_errors(tmp_path, capsys, make, words):
    make_sources(tmp_path, n=12)
    data = make(tmp_path)
    assert cli("train", "--method", "edm", "--data", data, "--steps", 1, "--out", tmp_path / "run", *TRAIN) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0]
    assert not (tmp_path / "run").exists()


def _zip_without_images(root: Path) -> str:
    with zipfile.ZipFile(root / "empty.zip", "w") as archive:
        archive.writestr("dataset.json", json.dumps({"labels": None}))
    return str(root / "empty.zip")


def test_the_tar_index_is_cached_and_rebuilt_when_a_shard_changes(tmp_path):
    _tar_of_pngs(tmp_path / "a.tar", 10)
    first = TarSource([tmp_path / "a.tar"], "a")
    assert (tmp_path / ".cmkit-index.json").is_file() and len(first) == 10
    _tar_of_pngs(tmp_path / "a.tar", 14)  # rewritten: another size
    assert len(open_source(str(tmp_path / "a.tar"))) == 14


def test_the_streaming_threshold_has_one_default():
    from cmkit.config import default_config
    from cmkit.data import STREAM_ABOVE_MB
    assert default_config("edm")["data"]["stream_above_mb"] == STREAM_ABOVE_MB


def test_shard_patterns_expand_like_webdataset():
    assert expand_braces("s-{000008..000011}.tar") == ["s-000008.tar", "s-000009.tar", "s-000010.tar", "s-000011.tar"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]


def test_a_run_refuses_to_resume_on_changed_data(tmp_path, capsys):
    folder = make_sources(tmp_path, n=24)["folder"]
    assert cli("train", "--method", "edm", "--data", folder, "--steps", 2, "--out", tmp_path / "run", *TRAIN) == 0
    (folder / "img9999.png").write_bytes((folder / "img0000.png").read_bytes())
    assert cli("train", "--method", "edm", "--resume", "--steps", 4, "--out", tmp_path / "run", "--quiet") == 2
    assert "changed since this run started (24 images then, 25 now" in capsys.readouterr().err
    assert cli("eval", "--checkpoint", tmp_path / "run", "--n", 8, "--steps", 1) == 2
