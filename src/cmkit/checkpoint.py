"""Run directories and checkpoints, written atomically and read without unpickling.

    RUN/config.json              the complete config (rebuilds the model)
    RUN/metrics.jsonl            one JSON object per logged step
    RUN/checkpoint/              the latest checkpoint, swapped in whole:
        model.safetensors        online weights
        ema.safetensors          EMA weights (what gets sampled)
        target.safetensors       target network (consistency methods)
        optimizer.safetensors    optimizer tensors; optimizer.json the rest
        rng.safetensors          RNG states; state.json the step

A checkpoint is first written to RUN/.checkpoint.tmp, then renamed into place, so an
interruption leaves either the old or the new checkpoint, never a mix.
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

CHECKPOINT = "checkpoint"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


RUN_ENTRIES = {"config.json", "config.json.tmp", "metrics.jsonl", "metrics.jsonl.tmp", CHECKPOINT,
               ".checkpoint.tmp", ".checkpoint.old"}


def is_run_dir(path: Path) -> bool:
    """A directory cmkit made: a config.json and nothing but run files."""
    return (path.is_dir() and (path / "config.json").is_file()
            and all(entry.name in RUN_ENTRIES for entry in path.iterdir()))


def prepare_run_dir(path: str | Path, *, resume: bool, force: bool, protect: tuple = ()) -> Path:
    """Create a run directory; refuse to touch an existing one without resume or force.

    ``--force`` deletes only a directory holding nothing but a cmkit run's files, and never one
    that is or contains a path in ``protect`` (the working directory, the teacher, the data)."""
    path = Path(path)
    if resume and force:
        raise CmkitError("--resume and --force exclude each other")
    if resume:
        if not (checkpoint_dir(path) / "state.json").is_file():
            raise CmkitError(f"cannot resume: {path} holds no checkpoint")
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
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
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_run_config(path: str | Path) -> dict:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CmkitError(f"{path} is not a cmkit run directory (no config.json)")
    try:
        config = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise CmkitError(f"{cfg} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or not isinstance(config.get("train"), dict):
        raise CmkitError(f"{cfg} is not a cmkit run config")
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


def save_checkpoint(run_dir: Path, *, modules: dict, optimizer, step: int, rng: dict) -> None:
    tmp = run_dir / ".checkpoint.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_state_dict(module), str(tmp / f"{name}.safetensors"), metadata={"step": str(step)})
    tensors, meta = _optimizer_to_files(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "modules": sorted(modules)}))
    final, old = run_dir / CHECKPOINT, run_dir / ".checkpoint.old"
    if not final.exists() and old.exists():
        os.replace(old, final)  # an earlier swap was cut short: its old copy is the only one
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def checkpoint_dir(run_dir: Path) -> Path:
    """The latest complete checkpoint (recovering one left behind by an interrupted swap)."""
    final, old = run_dir / CHECKPOINT, run_dir / ".checkpoint.old"
    if not (final / "state.json").is_file() and (old / "state.json").is_file():
        return old
    return final


def load_weights(run_dir: Path, name: str) -> dict:
    path = checkpoint_dir(run_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise CmkitError(f"{run_dir} has no {name} weights (no {path.name} in its checkpoint)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CmkitError(f"{path} is unreadable or corrupt: {e}") from None


def load_training_state(run_dir: Path):
    """(step, optimizer state dict, rng tensors) of the latest checkpoint."""
    ckpt = checkpoint_dir(run_dir)
    try:
        step = json.loads((ckpt / "state.json").read_text())["step"]
        optim = _optimizer_from_files(load_file(str(ckpt / "optimizer.safetensors")),
                                      json.loads((ckpt / "optimizer.json").read_text()))
        return step, optim, load_file(str(ckpt / "rng.safetensors"))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CmkitError(f"the checkpoint in {run_dir} is unreadable or corrupt: {e}") from None
