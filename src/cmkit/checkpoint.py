"""Run directories and checkpoints, written atomically and read without unpickling.

    RUN/config.json                     the complete config (rebuilds the model)
    RUN/metrics.jsonl                   one JSON object per logged step
    RUN/checkpoints/step-0000400/       a complete checkpoint (the newest train.keep_checkpoints kept):
        model.safetensors               online weights
        ema.safetensors                 EMA weights (what gets sampled)
        target.safetensors              target network (consistency methods)
        optimizer.safetensors           optimizer tensors; optimizer.json the rest
        rng.safetensors                 counters (skipped steps); state.json the step, format, file sizes
    RUN/latest                          the newest checkpoint's path, for people and tools

A checkpoint is written into RUN/checkpoints/.tmp-step-N, every file flushed to disk (fsync), and
the folder renamed into place, so a process killed at any moment leaves complete checkpoints and
at most a temporary folder that the next save removes. Readers take the newest complete
checkpoint (state.json present, every file at its recorded size), whatever ``latest`` says: a
kill between the rename and the pointer update loses nothing. Runs from before this layout kept
one checkpoint in RUN/checkpoint/; they still load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CmkitError
from .safe_io import READ_ERRORS, read_json

CHECKPOINTS = "checkpoints"
LATEST = "latest"
LEGACY = "checkpoint"  # the single checkpoint of runs from before the rotating layout
FORMAT = 1  # the checkpoint layout this cmkit writes and the newest it reads


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a flushed temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (lcm-lora runs)
FLOOR_CACHE = "eval_floor.json"  # `cmkit eval`'s data-vs-data floor (cmkit.evaluate)
COMPILE_CACHE = "compile_cache"  # inductor's kernels for a compiled run (cmkit.compiled_step)
RUN_ENTRIES = {"config.json", "config.json.tmp", "metrics.jsonl", "metrics.jsonl.tmp", CHECKPOINTS, LATEST,
               LATEST + ".tmp", "samples", "tensorboard", LEGACY, ".checkpoint.tmp", ".checkpoint.old",
               FLOOR_CACHE, FLOOR_CACHE + ".tmp", COMPILE_CACHE,
               "vae", "tokenizer", "text_encoder",  # a latent run's decoder and prompt encoder (copies)
               LORA_FILE, LORA_FILE + ".tmp"}


def save_lora_file(run_dir: Path, write) -> None:
    """A LoRA run's adapters in diffusers' format at ``run_dir``/`LORA_FILE`, replaced atomically at
    every checkpoint (``write(folder, name)`` writes them), so ``pipe.load_lora_weights(run_dir)``
    loads the latest."""
    tmp = run_dir / (LORA_FILE + ".tmp")
    write(run_dir, tmp.name)
    _fsync(tmp)
    os.replace(tmp, run_dir / LORA_FILE)


def is_run_dir(path: Path) -> bool:
    """A directory cmkit made: a config.json and nothing but run files."""
    return (path.is_dir() and (path / "config.json").is_file()
            and all(entry.name in RUN_ENTRIES for entry in path.iterdir()))


def check_new_run_dir(path: str | Path, *, force: bool, protect: tuple = ()) -> None:
    """Refuse a non-empty ``path`` unless ``force`` is given and it is a cmkit run that holds nothing
    in ``protect`` (the working directory, the teacher, the data). Changes nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CmkitError(f"run directory {path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise CmkitError(f"run directory {path} already exists: pass --resume to continue it "
                             "or --force to overwrite it")
        if not is_run_dir(path):
            raise CmkitError(f"--force refuses to delete {path}: it is not a cmkit run directory "
                             "(or holds other files)")
        target = path.resolve()
        for kept in (Path.cwd(), *protect):
            kept = Path(kept).resolve()
            if kept == target or target in kept.parents:
                raise CmkitError(f"--force refuses to delete {path}: it holds {kept}, which this run needs")


def prepare_run_dir(path: str | Path, *, resume: bool, force: bool, protect: tuple = ()) -> Path:
    """Create a run directory; refuse to touch an existing one without resume or force
    (see `check_new_run_dir`)."""
    path = Path(path)
    if resume and force:
        raise CmkitError("--resume and --force exclude each other")
    if resume:
        if not has_checkpoint(path):
            raise CmkitError(f"cannot resume: {path} holds no checkpoint")
        return path
    check_new_run_dir(path, force=force, protect=protect)
    if path.is_dir() and any(path.iterdir()):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_run_config(path: str | Path) -> dict:
    path = Path(path)
    config_file = path / "config.json"
    if not path.exists():
        raise CmkitError(f"{path} does not exist")
    if not config_file.is_file():
        raise CmkitError(f"{path} is not a cmkit run directory (no config.json)")
    config = read_json(config_file, "run config")
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise CmkitError(f"{config_file} is not a cmkit run config")
    return config


def _state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _optimizer_to_files(optimizer: torch.optim.Optimizer):
    """Split an optimizer state dict into tensors (safetensors) and the rest (JSON)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_checkpoint(folder: Path, *, modules: dict, optimizer, step: int, rng: dict) -> None:
    folder.mkdir()
    for name, module in modules.items():
        save_file(_state_dict(module), str(folder / f"{name}.safetensors"), metadata={"step": str(step)})
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(folder / "rng.safetensors"))
    files = sorted(f.name for f in folder.iterdir())
    for name in files:
        _fsync(folder / name)
    state = {"format": FORMAT, "step": step, "modules": sorted(modules),
             "files": {name: (folder / name).stat().st_size for name in files}}
    atomic_write_text(folder / "state.json", json.dumps(state))  # last: its presence marks the folder complete
    _fsync(folder)


def _remove(folder: Path) -> None:
    """Delete a folder so that no reader ever sees it half deleted: rename it out of view first."""
    trash = folder.with_name(f".trash-{folder.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    shutil.rmtree(trash)


def save_checkpoint(run_dir: Path, *, modules: dict, optimizer, step: int, rng: dict, keep: int = 3) -> Path:
    """Write a checkpoint at ``step``, point ``latest`` at it and keep the newest ``keep``. A write
    that fails (a full disk, say) leaves the earlier checkpoints as they were."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(exist_ok=True)
    for stale in root.glob(".*"):  # left by a process killed while writing or deleting
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:07d}"
    tmp = root / f".tmp-{name}"
    try:
        _write_checkpoint(tmp, modules=modules, optimizer=optimizer, step=step, rng=rng)
        final = root / name
        if final.exists():  # saved again at the same step (a resumed run stopped at once)
            _remove(final)
        os.replace(tmp, final)
        _fsync(root)
        atomic_write_text(Path(run_dir) / LATEST, f"{CHECKPOINTS}/{name}\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CmkitError(f"could not write the step-{step} checkpoint in {run_dir}: {e.strerror or e}; "
                         "the earlier checkpoints are intact") from None
    for old in _complete_checkpoints(root)[0][:-keep]:
        _remove(old)
    return final


def _read_state(folder: Path) -> tuple[dict | None, str]:
    """(state.json, "") of a complete checkpoint folder, else (None, what is wrong)."""
    try:
        state = read_json(folder / "state.json", "checkpoint state")
        step = state["step"]
    except (CmkitError, *READ_ERRORS) as e:
        return None, f"state.json: {e.__class__.__name__}"
    if not isinstance(state, dict) or not isinstance(step, int):
        return None, "state.json has no step"
    if not isinstance(state.get("format", 0), int) or state.get("format", 0) > FORMAT:
        raise CmkitError(f"the checkpoint {folder} has format {state['format']!r}, newer than this cmkit reads "
                         f"({FORMAT}): upgrade cmkit")
    for name, size in state.get("files", {}).items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return None, f"{name} is missing"
        if actual != size:
            return None, f"{name} has {actual} bytes, not {size}"
    return state, ""


def _complete_checkpoints(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(the complete checkpoints under ``root``, oldest first; the damaged ones, with the reason)."""
    if not root.is_dir():
        return [], []
    found, damaged = [], []
    for folder in root.iterdir():
        if folder.name.startswith("step-") and folder.is_dir():
            state, problem = _read_state(folder)
            if state is None:
                damaged.append((folder, problem))
            else:
                found.append((state["step"], folder))
    return [folder for _, folder in sorted(found)], sorted(damaged)


def checkpoint_dir(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run (a path without a state.json when it has none)."""
    run_dir = Path(run_dir)
    complete, damaged = _complete_checkpoints(run_dir / CHECKPOINTS)
    if complete:
        return complete[-1]
    if damaged:
        folder, problem = damaged[-1]
        raise CmkitError(f"{run_dir} holds no complete checkpoint: {folder.name} is unreadable or corrupt ({problem})")
    legacy, old = run_dir / LEGACY, run_dir / ".checkpoint.old"
    if not (legacy / "state.json").is_file() and (old / "state.json").is_file():
        return old  # a legacy swap cut between its two renames
    if (legacy / "state.json").is_file():
        _read_state(legacy)  # refuses a newer format
    return legacy


def has_checkpoint(run_dir: Path) -> bool:
    return (checkpoint_dir(run_dir) / "state.json").is_file()


def load_weights(run_dir: Path, name: str) -> dict:
    path = checkpoint_dir(run_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise CmkitError(f"{run_dir} has no {name} weights (no {path.name} in its checkpoint)")
    try:
        return load_file(str(path))
    except (SafetensorError, *READ_ERRORS) as e:
        raise CmkitError(f"{path} is unreadable or corrupt: {e}") from None


def load_training_state(run_dir: Path):
    """(step, optimizer state dict, rng tensors) of the newest complete checkpoint."""
    ckpt = checkpoint_dir(run_dir)
    try:
        step = json.loads((ckpt / "state.json").read_text())["step"]
        optim = _optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")),
                                      json.loads((ckpt / "optimizer.json").read_text()))
        return step, optim, load_file(str(ckpt / "rng.safetensors"))
    except (SafetensorError, *READ_ERRORS) as e:
        raise CmkitError(f"the checkpoint in {run_dir} is unreadable or corrupt: {e}") from None
