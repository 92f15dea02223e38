"""One training loop for every objective.

    run_dir = cmkit.train(config, "runs/teacher")

The loop draws batches and noise from one seeded ``torch.Generator`` (dropout uses torch's
global RNG, also seeded); both states, the optimizer, the EMA and the target network are in
every checkpoint, so ``resume=True`` continues a run bit for bit on CPU.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import METHODS
from .data import Standardizer, load_vectors
from .errors import CmkitError
from .objectives import ConsistencyDistillationLoss, ConsistencyTrainingLoss, EDMLoss
from .run import Run, build_model, noise_config


def _resolve_teacher(config: dict) -> Run:
    """CD inherits the teacher's noise range, standardisation and architecture."""
    path = config.get("teacher")
    if not path:
        raise CmkitError("method cd needs a teacher: pass --teacher RUN (a trained edm run)")
    teacher = Run(path)
    if teacher.method != "edm":
        raise CmkitError(f"teacher {path} is a {teacher.method} run; cd needs an edm teacher")
    config["teacher"] = str(Path(path).resolve())
    for key in ("noise", "model", "standardizer"):
        config[key] = copy.deepcopy(teacher.config[key])
    return teacher


def build_objective(config: dict, teacher: Run | None):
    method, obj, noise = config["method"], dict(config["objective"]), noise_config(config)
    if method == "edm":
        return EDMLoss(noise.sigma_data, **obj)
    if method == "cd":
        obj.pop("init_from_teacher")
        return ConsistencyDistillationLoss(teacher.model, noise, **obj)
    if method == "ct":
        # Fix the curriculum's horizon in the saved config, so a resume with another --steps
        # keeps the same N(k) and mu(k).
        config["objective"]["total_steps"] = obj["total_steps"] = obj["total_steps"] or config["train"]["steps"]
        return ConsistencyTrainingLoss(noise, **obj)
    raise CmkitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    optimizers = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if cfg["optimizer"] not in optimizers:
        raise CmkitError(f"unknown optimizer {cfg['optimizer']!r}; known: {', '.join(optimizers)}")
    return optimizers[cfg["optimizer"]](params, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                        weight_decay=cfg["weight_decay"])


@torch.no_grad()
def ema_update(ema: torch.nn.Module, online: torch.nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * online (rate 0 copies)."""
    for e, p in zip(ema.parameters(), online.parameters()):
        e.lerp_(p, 1 - rate)
    for e, b in zip(ema.buffers(), online.buffers()):
        e.copy_(b)


def ema_rate(rate: float, step: int) -> float:
    """The sampling EMA's rate, warmed up as min(rate, (1 + step) / (10 + step)) so that early
    random weights do not linger in short runs (the warm-up k-diffusion and EDM use too)."""
    return min(rate, (1 + step) / (10 + step))


def _check_config(config: dict) -> None:
    train = config["train"]
    if config["method"] not in METHODS:
        raise CmkitError(f"unknown method {config['method']!r}; known: {', '.join(METHODS)}")
    if not config["data"]["name"]:
        raise CmkitError("no data given: pass --data NAME_OR_PATH")
    for key in ("steps", "batch_size"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise CmkitError(f"train.{key} must be a positive integer, got {train[key]!r}")
    if not (isinstance(train["lr"], (int, float)) and train["lr"] > 0):
        raise CmkitError(f"train.lr must be positive, got {train['lr']!r}")
    if not 0 <= train["ema_rate"] < 1:
        raise CmkitError(f"train.ema_rate must be in [0, 1), got {train['ema_rate']!r}")


def train(config: dict, out: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True) -> Path:
    """Train (or, with ``resume``, continue training) the run ``config`` describes into ``out``.

    On resume the run's saved config is used, with ``train.steps`` (the step to stop at) taken
    from ``config``.
    """
    out = Path(out)
    if resume:
        checkpoint.prepare_run_dir(out, resume=True, force=False)
        steps = config["train"]["steps"]
        config = checkpoint.read_run_config(out)
        config["train"]["steps"] = steps
    _check_config(config)
    teacher = _resolve_teacher(config) if config["method"] == "cd" else None
    d = config["data"]
    data = load_vectors(d["name"], n=d["n"], n_holdout=d["n_holdout"],
                        holdout_fraction=d["holdout_fraction"], seed=d["seed"])
    if "standardizer" not in config:
        config["standardizer"] = Standardizer.fit(data.train, config["noise"]["sigma_data"]).state()
    config["model"]["dim"] = data.dim
    if teacher is not None and teacher.dim != data.dim:
        raise CmkitError(f"data has {data.dim} dimensions but the teacher was trained on {teacher.dim}")
    objective = build_objective(config, teacher)
    train_cfg = config["train"]

    device = train_cfg["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(train_cfg["seed"])
    gen = torch.Generator().manual_seed(train_cfg["seed"])
    net = build_model(config)
    if teacher is not None and config["objective"]["init_from_teacher"]:
        net.backbone.load_state_dict(teacher.model.backbone.state_dict())
    net.to(device).train()
    if teacher is not None:
        teacher.model.to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    target = copy.deepcopy(net).requires_grad_(False) if objective.needs_target else None
    optimizer = build_optimizer(net.parameters(), train_cfg)
    x_train = Standardizer.from_state(config["standardizer"]).to_model(data.train)

    start = 0
    metrics_path = out / "metrics.jsonl"
    if resume:
        start, optim_state, rng = checkpoint.load_training_state(out)
        for name, module in _modules(net, ema, target).items():
            module.load_state_dict(checkpoint.load_weights(out, name))
        optimizer.load_state_dict(optim_state)
        gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        _truncate_metrics(metrics_path, start)
        if start >= train_cfg["steps"]:
            raise CmkitError(f"{out} is already at step {start}; pass --steps above it to train further")
    else:
        checkpoint.prepare_run_dir(out, resume=False, force=force)
    checkpoint.atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")

    def save(step: int):
        checkpoint.save_checkpoint(out, modules=_modules(net, ema, target), optimizer=optimizer,
                                   step=step, rng={"generator": gen.get_state(), "torch": torch.get_rng_state()})

    bar = tqdm(range(start, train_cfg["steps"]), initial=start, total=train_cfg["steps"],
               disable=not progress, desc=f"train {config['method']}", dynamic_ncols=True)
    with open(metrics_path, "a") as log:
        for step in bar:
            batch = x_train[torch.randint(len(x_train), (train_cfg["batch_size"],), generator=gen)]
            loss_per_sample, extra = objective(net, batch.to(device), step=step, target=target,
                                               generator=gen)
            loss = loss_per_sample.mean()
            if not torch.isfinite(loss):
                raise CmkitError(f"loss became {loss.item()} at step {step}; the last checkpoint is "
                                 "intact: lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), train_cfg["grad_clip"] or math.inf)
            for group in optimizer.param_groups:
                group["lr"] = train_cfg["lr"] * min(1.0, (step + 1) / max(1, train_cfg["lr_warmup"]))
            optimizer.step()
            if target is not None:
                ema_update(target, net, objective.target_rate(step))
            ema_update(ema, net, ema_rate(train_cfg["ema_rate"], step))
            done = step + 1
            if done % train_cfg["log_every"] == 0 or done == train_cfg["steps"]:
                record = {"step": done, "loss": loss.item(), "grad_norm": grad_norm.item(), **extra}
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            if done % train_cfg["save_every"] == 0 and done != train_cfg["steps"]:
                save(done)
    save(train_cfg["steps"])
    bar.close()
    return out


def _modules(net, ema, target) -> dict:
    modules = {"model": net, "ema": ema}
    if target is not None:
        modules["target"] = target
    return modules


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint being resumed, so the log matches an unbroken run."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))
