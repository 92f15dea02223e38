"""One training loop for every objective.

    run_dir = cmkit.train(config, "runs/teacher")

Every random draw of a step comes from generators seeded by (seed, step): batches and noise from
one shared by all processes and micro-batches (each keeps its rows of the global batch, see
batch_rng.py), dropout from one per micro-batch. So a resumed run continues bit for bit on CPU,
and 1 or N processes (torchrun) with the same global batch train the same model to float
rounding. The optimizer, EMA and target network are in every checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .batch_rng import BatchRNG, step_seed
from .config import INIT_METHODS, METHODS, TEACHER_METHODS
from .distributed import World, sum_gradients, close, world_from_env
from .data import ImageData, ImageScaler, Standardizer, is_builtin, load_dataset, random_hflip
from .errors import CmkitError, Stopped
from .guidance import GuidanceInput, default_guidance
from .nets import load_backbone_weights
from .objectives import (ConsistencyDistillationLoss, ConsistencyTrainingLoss, ContinuousConsistencyLoss, EDMLoss,
                         EasyConsistencyTuningLoss, ImprovedConsistencyTrainingLoss, MeanFlowLoss)
from .plotting import save_image_grid
from .run import Run, build_model, default_levels, generate, noise_config

GRID_SAMPLES = 64  # images in each progress grid (8 x 8)
VOLATILE_METRICS = ("images_per_s", "max_memory_mb")  # measured, so no two runs share them
GRID_SEED = 0  # the same noise every time, so grids show the model changing, not the noise


def _resolve_edm_run(config: dict, key: str, flag: str, resumed: bool) -> Run:
    """A teacher (``key`` = "teacher") or an initialisation (``key`` = "init"): an EDM run whose noise
    range, standardisation and architecture the new run inherits (a resumed run checks them)."""
    path = config[key]
    source = Run(path)
    if source.method != "edm":
        role = "teacher" if key == "teacher" else "run to start from"
        raise CmkitError(f"{flag} {path} is a {source.method} run; {config['method']} needs an edm {role}")
    config[key] = str(Path(path).resolve())
    for section in ("noise", "model", "standardizer"):
        if resumed and _comparable(config[section]) != _comparable(source.config[section]):
            raise CmkitError(f"{flag} {path} differs from this run in its {section} (a run that changed since "
                             "this one started, or --init and --teacher runs that do not match)")
        config[section] = copy.deepcopy(source.config[section])
    config["model"].setdefault("num_classes", 0)  # a run from before class conditioning is unconditional
    return source


def _warn_about_time_input(config: dict) -> None:
    """sCT/sCD differentiate the network along t. OpenAI's c_noise = 250 ln(sigma) moves the UNet's
    time embedding so fast near both ends of the noise range that the derivative explodes and
    training fails (digits: FD 429 against 25 from the same teacher with EDM's c_noise)."""
    model = config["model"]
    if config["method"] in ("sct", "scd") and model.get("backbone") == "unet" and model.get("c_noise") == "openai":
        print("cmkit: warning: this run's time input is OpenAI's c_noise = 250 ln(sigma), which sCT/sCD cannot "
              "differentiate stably; train the teacher with --set model.c_noise=edm (docs/images.md)",
              file=sys.stderr)


def _comparable(section: dict) -> dict:
    """A config section as a resumed run compares it with its source: less a guided student's
    guidance input (which its teacher lacks), with runs from before class conditioning unconditional."""
    section = {k: v for k, v in section.items() if k != "guidance"}
    if "backbone" in section:
        section.setdefault("num_classes", 0)
    return section


def _resolve_sources(config: dict) -> tuple[Run | None, Run | None]:
    """(teacher, init) of a run. sCD starts from its teacher unless --init says otherwise."""
    method = config["method"]
    resumed = "standardizer" in config  # set when a run starts; a fresh config has none
    teacher = init = None
    if method in TEACHER_METHODS:
        if not config.get("teacher"):
            raise CmkitError(f"method {method} needs a teacher: pass --teacher RUN (a trained edm run)")
        teacher = _resolve_edm_run(config, "teacher", "--teacher", resumed)
    if method in INIT_METHODS and config.get("init"):
        init = _resolve_edm_run(config, "init", "--init", resumed or teacher is not None)
    elif method == "scd":
        init = teacher
    return teacher, init


def build_objective(config: dict, teacher: Run | None):
    method, obj, noise = config["method"], dict(config["objective"]), noise_config(config)
    if method == "edm":
        return EDMLoss(noise.sigma_data, **obj)
    if method == "cd":
        obj.pop("init_from_teacher")
        return ConsistencyDistillationLoss(teacher.model, noise, **obj)
    if "total_steps" in obj:
        # Fix a curriculum's horizon in the saved config, so a resume with another --steps keeps it.
        config["objective"]["total_steps"] = obj["total_steps"] = obj["total_steps"] or config["train"]["steps"]
    if method == "ct":
        return ConsistencyTrainingLoss(noise, **obj)
    if method == "ict":
        return ImprovedConsistencyTrainingLoss(noise, **obj)
    if method == "ect":
        return EasyConsistencyTuningLoss(noise, **obj)
    if method in ("sct", "scd"):
        if obj["tangent_warmup"] is None:  # the paper's 10k steps, at most a quarter of the run
            config["objective"]["tangent_warmup"] = obj["tangent_warmup"] = min(10000, config["train"]["steps"] // 4)
        return ContinuousConsistencyLoss(noise, teacher=None if teacher is None else teacher.model, **obj)
    if method == "meanflow":
        return MeanFlowLoss(**obj)
    raise CmkitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    optimizers = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}
    if cfg["optimizer"] not in optimizers:
        raise CmkitError(f"unknown optimizer {cfg['optimizer']!r}; known: {', '.join(optimizers)}")
    extra = {}
    if cfg["fused_optimizer"]:
        if cfg["optimizer"] == "radam":
            raise CmkitError("train.fused_optimizer needs adam or adamw (torch has no fused RAdam)")
        extra["fused"] = True
    return optimizers[cfg["optimizer"]](params, lr=cfg["lr"], betas=tuple(cfg["betas"]),
                                        weight_decay=cfg["weight_decay"], **extra)


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


def _check_config(config: dict, world: World = World()) -> None:
    train = config["train"]
    if config["method"] not in METHODS:
        raise CmkitError(f"unknown method {config['method']!r}; known: {', '.join(METHODS)}")
    if not config["data"]["name"]:
        raise CmkitError("no data given: pass --data NAME_OR_PATH")
    for key in ("sample_every", "max_bad_steps"):
        if not isinstance(train[key], int) or isinstance(train[key], bool) or train[key] < 0:
            raise CmkitError(f"train.{key} must be a non-negative integer (0: never), got {train[key]!r}")
    for key in ("steps", "batch_size", "log_every", "save_every", "grad_accum", "keep_checkpoints"):
        if not isinstance(train[key], int) or isinstance(train[key], bool) or train[key] < 1:
            raise CmkitError(f"train.{key} must be a positive integer, got {train[key]!r}")
    for key in ("n", "n_holdout"):
        if not isinstance(config["data"][key], int) or config["data"][key] < 2:
            raise CmkitError(f"data.{key} must be an integer of at least 2, got {config['data'][key]!r}")
    shards = world.size * train["grad_accum"]
    if train["batch_size"] % shards:
        raise CmkitError(f"train.batch_size {train['batch_size']} must divide evenly over {world.size} process(es) "
                         f"x {train['grad_accum']} accumulated micro-batch(es)")
    if not isinstance(train["tensorboard"], bool):
        raise CmkitError(f"train.tensorboard must be true or false, got {train['tensorboard']!r}")
    if train["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise CmkitError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    if not (isinstance(train["lr"], (int, float)) and train["lr"] > 0):
        raise CmkitError(f"train.lr must be positive, got {train['lr']!r}")
    if not (isinstance(train["ema_rate"], (int, float)) and 0 <= train["ema_rate"] < 1):
        raise CmkitError(f"train.ema_rate must be in [0, 1), got {train['ema_rate']!r}")
    if train["grad_clip"] is not None and train["grad_clip"] < 0:
        raise CmkitError(f"train.grad_clip must be >= 0 (0 or null: no clipping), got {train['grad_clip']!r}")
    for key, value in (("train.seed", train["seed"]), ("data.seed", config["data"]["seed"])):
        if not 0 <= value < 2**63:
            raise CmkitError(f"{key} must be a non-negative integer, got {value!r}")
    device = train["device"]
    if device not in ("cpu", "auto") and not device.startswith("cuda"):
        raise CmkitError(f"train.device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CmkitError(f"train.device is {device!r} but no CUDA device is available (use cpu or auto)")


def _resolve_classes(config: dict, data, teacher: Run | None) -> int:
    """Fix the run's number of classes K (0: unconditional) in its config and check the labels,
    the label dropout and guided distillation against it. K comes from the teacher or --init run
    when there is one, else from ``model.num_classes`` (null: the data's labels, if any)."""
    model, train, obj = config["model"], config["train"], config["objective"]
    labels_k = data.num_classes
    K = model.get("num_classes")
    if K is None:
        K = labels_k or 0
    if not isinstance(K, int) or K < 0:
        raise CmkitError(f"model.num_classes must be a non-negative integer (0: unconditional), got {K!r}")
    if K and labels_k is None:
        raise CmkitError(f"the model is class-conditional ({K} classes) but {data.name} has no labels")
    if K and labels_k > K:
        raise CmkitError(f"{data.name} has labels up to {labels_k - 1}, but the model has only {K} classes")
    model["num_classes"] = K
    p = train.get("label_dropout", 0.0)
    if not 0 <= p < 1:
        raise CmkitError(f"--label-dropout must be in [0, 1), got {p}")
    if p and not K:
        raise CmkitError("--label-dropout needs class labels, and this run is unconditional")
    if K:
        names = data.class_names or []
        config.setdefault("class_names", list(names[:K]) + [str(i) for i in range(len(names), K)])
    if obj.get("guidance") is not None:
        if not K:
            raise CmkitError("guided distillation (--guidance) needs a class-conditional teacher and labelled data")
        if not teacher.config["train"].get("label_dropout", 0.0):
            raise CmkitError(f"--guidance needs a teacher trained with --label-dropout > 0; {config['teacher']} was not")
        model["guidance"] = True
    return K


class Trainer:
    """Everything one run trains with: data, model, EMA, target, objective, optimizer and RNGs.

    ``step()`` performs one optimisation step; ``save()``/``restore()`` round-trip everything
    that a bit-exact resume needs."""

    def __init__(self, config: dict, world: World = World()):
        self.world = world
        _check_config(config, world)
        fresh = "standardizer" not in config  # set when a run starts (or copied from its sources below)
        teacher, init = _resolve_sources(config)
        d = config["data"]
        data = load_dataset(d)
        self.images = isinstance(data, ImageData)
        shape = data.shape if self.images else (data.dim,)
        for source, what in ((teacher, "teacher"), (init, "--init run")):
            if source is not None and source.shape != shape:
                raise CmkitError(f"data has shape {shape} but the {what} was trained on {source.shape}")
        if d["hflip"] and not self.images:
            raise CmkitError("data.hflip applies to images only")
        if not is_builtin(d["name"]):
            d["name"] = str(Path(d["name"]).resolve())  # so eval finds it from any directory
        self.num_classes = _resolve_classes(config, data, teacher)
        if fresh and world.is_main:
            _warn_about_time_input(config)
        if self.images:
            config.setdefault("standardizer", ImageScaler(shape).state())
            config["model"].update(image_channels=shape[0], resolution=shape[1])
            if config["model"]["backbone"] != "unet":
                raise CmkitError(f"image data needs the unet backbone, not {config['model']['backbone']!r}")
        else:
            if "standardizer" not in config:
                config["standardizer"] = Standardizer.fit(data.train, config["noise"]["sigma_data"]).state()
            config["model"]["dim"] = data.dim
        self.config = config
        self.protected = [p for p in (config.get("teacher"), None if is_builtin(d["name"]) else d["name"]) if p]
        try:
            self._build(config, teacher, init, data)
        except (ValueError, TypeError, KeyError) as e:
            raise CmkitError(f"invalid config: {e}") from None

    def _build(self, config: dict, teacher: Run | None, init: Run | None, data) -> None:
        """``data``: the loaded data set (its training split and labels are used)."""
        self.cfg = cfg = config["train"]
        self.device = self.world.device(cfg["device"])

        torch.manual_seed(cfg["seed"])  # initialisation: the same on every rank
        self.generator = torch.Generator()  # batches and noise, reseeded every step
        self.net = build_model(config)
        self.objective = build_objective(config, teacher)  # after the seed: it may own weights
        if teacher is not None:
            teacher.model.to(self.device)
            if config["objective"].get("init_from_teacher"):
                init = teacher
        if init is not None:
            load_backbone_weights(self.net.backbone, init.model.backbone)
        self.net.to(self.device).train()
        self.extra_modules = {name: m.to(self.device) for name, m in getattr(self.objective, "modules", {}).items()}
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.target = copy.deepcopy(self.net).requires_grad_(False) if self.objective.needs_target else None
        self.memory_format = torch.channels_last if cfg["channels_last"] and self.images else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        params = list(self.net.parameters()) + [p for m in self.extra_modules.values() for p in m.parameters()]
        self.optimizer = build_optimizer(params, cfg)
        # Vectors are standardised once; images stay uint8 (on the device) until a batch is drawn.
        self.x_train = (data.train.to(self.device) if self.images
                        else Standardizer.from_state(config["standardizer"]).to_model(data.train))
        self.y_train = data.train_labels.to(self.device) if self.num_classes else None
        # torch.compile wraps the online network for the objective's forward passes only, so the
        # saved weights, the EMA and the target keep their plain module names.
        self.forward_net = torch.compile(self.net) if cfg["compile"] else self.net
        self.skipped_steps = 0  # steps skipped for a NaN/inf loss or gradient, over the whole run
        self.bad_in_row = 0
        self.stop_signal = None  # set by SIGTERM/SIGINT; the run stops, saved, after the step in progress
        self.stopping = False  # a stop every rank agreed on
        self._sync_weights()
        self.autocast = torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=cfg["bf16"])

    @property
    def modules(self) -> dict:
        modules = {"model": self.net, "ema": self.ema, **self.extra_modules}
        if self.target is not None:
            modules["target"] = self.target
        return modules

    def _sync_weights(self) -> None:
        """Start every rank from rank 0's weights (the same seed builds the same ones; this makes it certain)."""
        self.world.broadcast_([t for m in self.modules.values() for t in (*m.parameters(), *m.buffers())])

    def _seed_dropout(self, seed: int) -> None:
        """Seed the global RNG that dropout draws from, on the training device only (torch.manual_seed
        would also seed every CUDA device: 75 us, a tenth of a small network's step)."""
        if self.device.startswith("cuda"):
            torch.cuda.manual_seed(seed)
        else:
            torch.random.default_generator.manual_seed(seed)

    def _draw(self, rng: BatchRNG, size: int):
        """This shard's ``size`` training samples (in model units) and labels."""
        cfg = self.cfg
        index = rng.randint(len(self.x_train), size).to(self.device)
        batch = self.x_train[index]
        if self.images:
            if self.config["data"]["hflip"]:
                batch = random_hflip(batch, rng)
            batch = ImageScaler.to_model(batch).contiguous(memory_format=self.memory_format)
        labels = None
        if self.y_train is not None:
            labels = self.y_train[index]
            if cfg.get("label_dropout"):  # classifier-free guidance training: some labels become null
                drop = (rng.rand(size) < cfg["label_dropout"]).to(self.device)
                labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return batch.to(self.device), labels

    def step(self, step: int) -> dict:
        """One optimisation step on the global batch: this rank's micro-batches, gradients averaged
        over the ranks, then one update (skipped everywhere if any rank saw a NaN/inf)."""
        cfg, world = self.cfg, self.world
        accum, total = cfg["grad_accum"], cfg["batch_size"]
        micro = total // (world.size * accum)
        params = self.optimizer.param_groups[0]["params"]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, bad, extra = torch.zeros(()), 0.0, {}
        for a in range(accum):
            m = world.rank * accum + a  # this micro-batch's place in the global batch
            rng = BatchRNG(self.generator.manual_seed(step_seed(cfg["seed"], step)), start=m * micro, total=total)
            self._seed_dropout(step_seed(cfg["seed"], step, 1 + m))
            batch, labels = self._draw(rng, micro)
            with self.autocast:
                per_sample, extra = self.objective(self.forward_net, batch, step=step, target=self.target,
                                                   generator=rng, class_labels=labels)
            loss = per_sample.float().mean() / (accum * world.size)
            if torch.isfinite(loss):
                loss.backward()
            else:
                bad = 1.0
            loss_sum += loss.detach().cpu()
        flags = sum_gradients(world, params, torch.stack([loss_sum, torch.tensor(bad),
                                                              torch.tensor(float(self.stop_signal is not None))]))
        loss_value, bad, self.stopping = flags[0].item(), flags[1].item() > 0, flags[2].item() > 0
        grad_norm = torch.tensor(math.nan)
        if not bad:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or math.inf)
        if not torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip the step, count it
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.bad_in_row += 1
            if self.bad_in_row > cfg["max_bad_steps"]:
                raise CmkitError(f"the loss or its gradients were NaN or inf for {self.bad_in_row} steps in a row "
                                 f"(up to step {step + 1}); the last checkpoint is intact: lower --lr, set "
                                 "train.grad_clip, or check the data")
            return {"step": step + 1, "loss": loss_value, "grad_norm": grad_norm.item(), "skipped": True,
                    "skipped_steps": self.skipped_steps, **extra}
        self.bad_in_row = 0
        for group in self.optimizer.param_groups:
            group["lr"] = cfg["lr"] * min(1.0, (step + 1) / max(1, cfg["lr_warmup"]))
        self.optimizer.step()
        if self.target is not None:
            ema_update(self.target, self.net, self.objective.target_rate(step))
        ema_update(self.ema, self.net, ema_rate(cfg["ema_rate"], step))
        return {"step": step + 1, "loss": loss_value, "grad_norm": grad_norm.item(),
                "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped_steps, **extra}

    def sample_grid(self, path: Path) -> None:
        """A grid of EMA samples (1 step for a consistency model, 18 Heun steps for a teacher)."""
        noise = noise_config(self.config)
        diffusion = self.config["method"] == "edm"
        labels = torch.arange(GRID_SAMPLES) % self.num_classes if self.num_classes else None
        model = self.ema
        if self.config["model"].get("guidance"):
            model = GuidanceInput(model, default_guidance(self.config["objective"]["guidance"]))
        x = generate(model, tuple(self.x_train.shape[1:]), default_levels(diffusion, noise),
                     is_diffusion=diffusion, n=GRID_SAMPLES, seed=GRID_SEED, sigma_min=noise.sigma_min,
                     class_labels=labels)
        save_image_grid(ImageScaler.to_data(x), path)

    def save(self, out: Path, step: int) -> None:
        """A checkpoint from rank 0, once every rank has checked that their weights agree."""
        self.world.check_in_sync(self.modules)
        if self.world.is_main:
            checkpoint.save_checkpoint(out, modules=self.modules, optimizer=self.optimizer, step=step,
                                       rng={"skipped_steps": torch.tensor([self.skipped_steps])},
                                       keep=self.cfg["keep_checkpoints"])

    def restore(self, out: Path) -> int:
        """Load the latest checkpoint of ``out``; return its step."""
        step, optim_state, rng = checkpoint.load_training_state(out)
        for name, module in self.modules.items():
            module.load_state_dict(checkpoint.load_weights(out, name))
        self.optimizer.load_state_dict(optim_state)
        self.skipped_steps = int(rng["skipped_steps"][0]) if "skipped_steps" in rng else 0
        return step


class _StopOnSignals:
    """While active, SIGTERM and SIGINT ask the trainer to stop after the step in progress (a
    second SIGINT interrupts at once). Only the main thread can own signal handlers; elsewhere
    this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, trainer: Trainer):
        self.trainer, self.previous = trainer, {}

    def _handle(self, signum, frame):
        if self.trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.trainer.stop_signal = signum

    def __enter__(self):
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread
            self.previous = {}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _peak_memory_mb(device: str) -> float:
    """Peak memory of this process: CUDA memory allocated on a GPU, else the resident set size."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class _Logs:
    """metrics.jsonl (and TensorBoard when asked for), written by rank 0 only."""

    def __init__(self, out: Path, cfg: dict, active: bool):
        self.active, self.tensorboard = active, None
        if not active:
            return
        self.file = open(out / "metrics.jsonl", "a")
        if cfg["tensorboard"]:  # its import was checked with the config
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.active:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.active:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def train(config: dict, out: str | Path, *, resume: bool = False, force: bool = False,
          progress: bool = True) -> Path:
    """Train (or, with ``resume``, continue training) the run ``config`` describes into ``out``.

    On resume the run's saved config is used, with ``train.steps`` (the step to stop at) taken
    from ``config``. Under torchrun every process calls this; rank 0 writes the run directory.
    SIGTERM or SIGINT (pre-emption, Ctrl-C) finish the step in progress, save a checkpoint and
    raise `Stopped`.
    """
    out = Path(out)
    world = world_from_env(config["train"].get("device", "auto"))
    try:
        return _train(config, out, world, resume=resume, force=force, progress=progress and world.is_main)
    finally:
        close(world)


def _train(config: dict, out: Path, world: World, *, resume: bool, force: bool, progress: bool) -> Path:
    if resume:
        checkpoint.prepare_run_dir(out, resume=True, force=force)
        steps, method = config["train"]["steps"], config.get("method")
        config = checkpoint.read_run_config(out)
        if method is not None and method != config["method"]:
            raise CmkitError(f"{out} is a run of method {config['method']}, not {method}")
        config["train"]["steps"] = steps
    trainer = Trainer(config, world)
    total = config["train"]["steps"]
    start = 0
    if resume:
        start = trainer.restore(out)
        if start >= total:
            raise CmkitError(f"{out} is already at step {start}; pass --steps above it to train further")
        world.barrier()  # every rank has read the log's checkpoint before rank 0 rewrites the log
        if world.is_main:
            _truncate_metrics(out / "metrics.jsonl", start, config["train"]["log_every"])
        horizon = config["objective"].get("total_steps")
        if progress and config["method"] == "ct" and horizon != total:
            print(f"cmkit: note: the CT curriculum keeps its horizon objective.total_steps = {horizon}",
                  file=sys.stderr)
    else:
        checkpoint.check_new_run_dir(out, force=force, protect=tuple(trainer.protected))
        world.barrier()  # every rank checked before rank 0 creates (or replaces) the directory
        if world.is_main:
            checkpoint.prepare_run_dir(out, resume=False, force=force, protect=tuple(trainer.protected))
    if world.is_main:
        checkpoint.atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    world.barrier()

    cfg = config["train"]
    logs = _Logs(out, cfg, world.is_main)
    try:
        with _StopOnSignals(trainer), \
                tqdm(range(start, total), initial=start, total=total, disable=not progress,
                     desc=f"train {config['method']}", dynamic_ncols=True) as bar:
            for step in bar:
                tick = time.perf_counter()
                record = trainer.step(step)
                # Throughput of the step itself (checkpoints and grids excluded), and peak memory.
                record["images_per_s"] = round(cfg["batch_size"] / (time.perf_counter() - tick), 2)
                record["max_memory_mb"] = round(_peak_memory_mb(trainer.device), 1)
                done = record["step"]
                if done % cfg["log_every"] == 0 or done == total or trainer.stopping:
                    logs.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4g}")
                if trainer.stopping and done != total:
                    trainer.save(out, done)
                    world.barrier()
                    raise Stopped(trainer.stop_signal or signal.SIGTERM, done)
                if done % cfg["save_every"] == 0 and done != total:
                    trainer.save(out, done)
                if (world.is_main and trainer.images and cfg["sample_every"]
                        and (done % cfg["sample_every"] == 0 or done == total)):
                    trainer.sample_grid(out / "samples" / f"step-{done:07d}.png")
        trainer.save(out, total)
        world.barrier()
    finally:
        logs.close()
    return out


def _truncate_metrics(path: Path, step: int, log_every: int) -> None:
    """Make the log read as an unbroken run's would: drop lines past the checkpoint being resumed,
    a closing line at that step that was off the log_every rhythm, and a torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            logged = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue
        if logged < step or (logged == step and step % log_every == 0):
            kept.append(line)
    checkpoint.atomic_write_text(path, "".join(line + "\n" for line in kept))
