"""Hostile and broken input: every file cmkit reads and every option it parses fails with one line
("cmkit: error: ..."), exit status 2 and no traceback, executes nothing, allocates nothing a
header merely promises, and leaves existing files as they were."""

import errno
import gzip
import json
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import cmkit.checkpoint as ckpt
from cmkit.checkpoint import checkpoint_dir
from cmkit.data.images import read_idx
from cmkit.errors import CmkitError
from helpers import TINY, cli, tree_digest


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("cmkit: error: ") and "Traceback" not in err[0]
    return err[0]


def npy_with_header(shape: tuple, descr: str = "<f8", body: bytes = b"\0" * 64) -> bytes:
    """An .npy whose header declares ``shape`` whatever the body holds."""
    header = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape)
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + body


def png_declaring(width: int, height: int) -> bytes:
    """A 4x4 PNG whose header (with a valid CRC) claims width x height pixels."""
    import io
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


class Payload:
    """Unpickling this would create the file ``marker``: proof of whether anything was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _valid_npy(tmp_path) -> bytes:
    np.save(tmp_path / "valid.npy", np.random.default_rng(0).standard_normal((50, 2)))
    return (tmp_path / "valid.npy").read_bytes()


def _valid_npz(tmp_path) -> bytes:
    np.savez(tmp_path / "valid.npz", data=np.random.default_rng(0).standard_normal((50, 2)))
    return (tmp_path / "valid.npz").read_bytes()


DATA_FILES = {  # name: (bytes maker, expected words)
    "empty.npy": (lambda t: b"", "cannot read"),
    "empty.npz": (lambda t: b"", "not a zip file"),
    "empty.csv": (lambda t: b"", "need at least 2 rows"),
    "truncated.npy": (lambda t: _valid_npy(t)[:-9], "truncated or corrupt"),
    "truncated.npz": (lambda t: _valid_npz(t)[:-40], "cannot read"),
    "random.npy": (lambda t: np.random.default_rng(1).bytes(300), "cannot read"),
    "huge.npy": (lambda t: npy_with_header((10**12, 2)), "declares shape (1000000000000, 2)"),
    "huge_images.npy": (lambda t: npy_with_header((10**9, 28, 28), "|u1"), "declares shape"),
    "pickled.npy": (lambda t: npy_with_header((2,), "|O"), "Python objects"),
    "strings.npy": (lambda t: npy_with_header((2, 2), "<U1", b"\0" * 16), "numeric"),
    "vector.npy": (lambda t: npy_with_header((8,), "|u1", b"\0" * 8), "must have shape (N, D)"),
    "latin1.csv": (lambda t: "x,y\n1,2\n3,\xe9\n".encode("latin-1"), "cannot read"),
}


@pytest.mark.parametrize("name", list(DATA_FILES))
def test_broken_data_files(tmp_path, capsys, name):
    make, words = DATA_FILES[name]
    path = tmp_path / name
    path.write_bytes(make(tmp_path))
    assert cli("train", "--method", "edm", "--data", path, "--out", tmp_path / "run", "--quiet") == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_huge_npz_member_is_refused_before_reading(tmp_path, capsys):
    import zipfile
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("data.npy", npy_with_header((10**12, 2)))
    assert cli("train", "--method", "edm", "--data", tmp_path / "huge.npz", "--out", tmp_path / "run") == 2
    assert "declares shape (1000000000000, 2)" in one_error_line(capsys)


@pytest.mark.parametrize("content, words", [
    (b"", "cannot read image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "cannot read image"),
    (png_declaring(200_000, 200_000), "pixels"),  # a decompression bomb's header
])
def test_broken_images_in_a_folder(tmp_path, capsys, content, words):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "good.png")
    (folder / "bad.png").write_bytes(content)
    assert cli("train", "--method", "edm", "--data", folder, "--out", tmp_path / "run", "--quiet") == 2
    line = one_error_line(capsys)
    assert words in line and "bad.png" in line


def test_idx_headers_that_promise_too_much(tmp_path):
    (tmp_path / "huge-idx").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 10**5, 10**5, 10**5))
    with pytest.raises(CmkitError, match="more than this machine's memory"):
        read_idx(tmp_path / "huge-idx")
    with gzip.open(tmp_path / "long.gz", "wb") as g:  # 10 MB of data behind a 4-byte header
        g.write(b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\0" * 10**7)
    with pytest.raises(CmkitError, match="declares"):
        read_idx(tmp_path / "long.gz")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08 not gzip")
    with pytest.raises(CmkitError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("content, words", [
    (b'\xff\xfe{"train": {}}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
    (b'["a list"]', "must hold a JSON object"),
    (b'{"train": {"lr": 0.1, "stpes": 3}}', "did you mean 'train.steps'?"),
])
def test_broken_config_files(tmp_path, capsys, content, words):
    (tmp_path / "c.json").write_bytes(content)
    assert cli("train", "--method", "edm", "--data", "moons", "--config", tmp_path / "c.json",
               "--out", tmp_path / "run") == 2
    assert words in one_error_line(capsys)


def test_mistyped_options_and_keys_suggest_the_nearest_name(tmp_path, capsys):
    assert cli("train", "--method", "edm", "--data", "moons", "--stpes", 3, "--out", tmp_path / "r") == 2
    assert "did you mean --steps?" in one_error_line(capsys)
    assert cli("train", "--method", "edm", "--data", "moons", "--set", "model.widht=3", "--out", tmp_path / "r") == 2
    assert "did you mean 'model.width'?" in one_error_line(capsys)


@pytest.fixture
def run_copy(tiny_teacher, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_teacher, run)
    return run


def _replace_checkpoint_file(run, name: str, content: bytes) -> None:
    """Swap a file of the newest checkpoint, updating state.json as an attacker would."""
    folder = checkpoint_dir(run)
    (folder / name).write_bytes(content)
    state = json.loads((folder / "state.json").read_text())
    state["files"][name] = len(content)
    (folder / "state.json").write_text(json.dumps(state))


def test_a_pickle_as_checkpoint_weights_is_refused_without_running_it(run_copy, tmp_path, capsys):
    marker = tmp_path / "executed"
    _replace_checkpoint_file(run_copy, "ema.safetensors", pickle.dumps(Payload(marker)))
    _replace_checkpoint_file(run_copy, "model.safetensors", pickle.dumps(Payload(marker)))
    assert cli("sample", "--checkpoint", run_copy, "--n", 2, "--out", tmp_path / "x.npy") == 2
    assert "unreadable or corrupt" in one_error_line(capsys)
    assert cli("train", "--method", "edm", "--steps", 500, "--resume", "--out", run_copy, "--quiet") == 2
    assert "unreadable or corrupt" in one_error_line(capsys)
    assert not marker.exists() and not (tmp_path / "x.npy").exists()


def test_files_given_where_a_run_belongs(tmp_path, capsys):
    marker = tmp_path / "executed"
    (tmp_path / "model.pt").write_bytes(pickle.dumps(Payload(marker)))
    (tmp_path / "noise.bin").write_bytes(np.random.default_rng(0).bytes(1000))
    for path in (tmp_path / "model.pt", tmp_path / "noise.bin"):
        assert cli("sample", "--checkpoint", path, "--n", 2, "--out", tmp_path / "x.npy") == 2
        assert "not a cmkit run directory" in one_error_line(capsys)
        assert cli("train", "--method", "cd", "--data", "moons", "--teacher", path, "--out", tmp_path / "r") == 2
        assert "not a cmkit run directory" in one_error_line(capsys)
    assert not marker.exists()


def test_a_checkpoint_from_a_newer_cmkit_is_refused(run_copy, tmp_path, capsys):
    folder = checkpoint_dir(run_copy)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "format": ckpt.FORMAT + 1}))
    before = tree_digest(run_copy)
    assert cli("sample", "--checkpoint", run_copy, "--n", 2, "--out", tmp_path / "x.npy") == 2
    assert "newer than this cmkit reads" in one_error_line(capsys)
    assert cli("train", "--method", "edm", "--steps", 500, "--resume", "--out", run_copy, "--quiet") == 2
    assert "upgrade cmkit" in one_error_line(capsys)
    assert tree_digest(run_copy) == before


def test_unwritable_outputs(tmp_path, tiny_teacher, capsys):
    (tmp_path / "file").write_text("not a folder")
    before = tree_digest(tiny_teacher)
    assert cli("train", "--method", "edm", "--data", "moons", *TINY, "--out", tmp_path / "file" / "run") == 2
    one_error_line(capsys)
    assert cli("sample", "--checkpoint", tiny_teacher, "--n", 2, "--out", tmp_path / "file" / "x.npy") == 2
    one_error_line(capsys)
    assert (tmp_path / "file").read_text() == "not a folder" and tree_digest(tiny_teacher) == before


def test_disk_full_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["train", "--method", "edm", "--data", "moons", *TINY, "--set", "train.save_every=2", "--out", run]
    original, calls = ckpt.save_file, {"n": 0}

    def fills_the_disk(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] > 4:  # the first checkpoint (model, ema, optimizer, rng) fits; the next does not
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)  # a partial write, as a full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    assert cli(*args, "--steps", 6) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and "earlier checkpoints are intact" in line
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no partial folder left
    assert (run / "latest").read_text().strip() == "checkpoints/step-0000002"
    monkeypatch.undo()  # space freed: the run resumes from step 2 and matches an unbroken run
    assert cli("train", "--method", "edm", "--steps", 6, "--resume", "--quiet", "--out", run) == 0
    assert cli(*args[:-1], tmp_path / "straight", "--steps", 6) == 0
    assert tree_digest(checkpoint_dir(run)) == tree_digest(checkpoint_dir(tmp_path / "straight"))


# ---------------------------------------------------------------------------------------------
# One image reader: PNG and JPEG only, told by content


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n{ } loop\nshowpage\n"  # would never end in gs


def image_bytes(fmt: str) -> bytes:
    import io
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, format=fmt)
    return out.getvalue()


# Each saved under a .png name: Pillow sniffs content, so the name must not matter.
OTHER_FORMATS = {"eps": lambda: EPS, "tiff": lambda: image_bytes("TIFF"), "webp": lambda: image_bytes("WEBP"),
                 "gif": lambda: image_bytes("GIF")}


@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
def test_only_png_and_jpeg_are_decoded_in_folders(tmp_path, capsys, fmt, no_external_programs):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    (folder / "evil.png").write_bytes(OTHER_FORMATS[fmt]())
    assert cli("train", "--method", "edm", "--data", folder, "--out", tmp_path / "run", "--quiet") == 2
    line = one_error_line(capsys)
    assert "evil.png" in line and "cannot read image" in line and f"cmkit data check {folder}" in line, line
    # The streamed reader (what `data check` decodes with) lists it as unreadable.
    assert cli("data", "check", folder) == 1
    out = capsys.readouterr().out
    assert "2 images: 1 readable, 1 unreadable" in out and f"{folder / 'evil.png'}: not a PNG or JPEG image" in out


def test_edit_input_decodes_only_png_and_jpeg(tmp_path, capsys, no_external_programs):
    assert cli("train", "--method", "edm", "--data", "digits", "--steps", 2, "--out", tmp_path / "run", "--quiet",
               "--set", "model.preset=tiny", "--set", "train.batch_size=8", "--set", "train.sample_every=0") == 0
    capsys.readouterr()
    for fmt, make in OTHER_FORMATS.items():
        (tmp_path / f"{fmt}.png").write_bytes(make())
        assert cli("edit", "denoise", "--checkpoint", tmp_path / "run", "--input", tmp_path / f"{fmt}.png",
                   "--sigma", 0.2, "--out", tmp_path / f"{fmt}-out.png") == 2, fmt
        line = one_error_line(capsys)
        assert "cannot read image" in line and f"{fmt}.png" in line, line
    Image.new("L", (8, 8), 128).save(tmp_path / "fine.png")
    assert cli("edit", "denoise", "--checkpoint", tmp_path / "run", "--input", tmp_path / "fine.png",
               "--sigma", 0.2, "--class", 3, "--out", tmp_path / "fine-out.png") == 0


def test_an_image_larger_than_the_byte_cap_is_refused_unread(tmp_path, monkeypatch):
    from cmkit import safe_io
    monkeypatch.setattr(safe_io, "MAX_IMAGE_BYTES", 100)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")  # about 12 KB
    with pytest.raises(CmkitError, match="more than cmkit reads for an image"):
        safe_io.read_image(tmp_path / "big.png")
