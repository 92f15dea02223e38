"""Run configurations: plain nested dicts, saved as JSON in every run directory.

A config starts from the defaults every method shares (``cmkit/configs/base.json``) with the
method's own differences over them (``cmkit/configs/<method>.json``, named by its `MethodSpec`),
then a user's ``--config FILE`` (JSON), then the command-line options, then ``--set key=value``
overrides. Every key a user sets must exist in the defaults, so a typo is an error, not a silent
no-op. `build_config` returns a complete, checked config and never changes it afterwards; what a
run derives from it (the teacher's sections, the data's statistics, a curriculum's horizon) goes
into a new dict when the run starts (`cmkit.training.resolve_run_config`), written once to config.json.
"""

from __future__ import annotations

import copy
import difflib
import json
from importlib import resources
from pathlib import Path

from .data import check_stream_settings, is_image_source
from .devices import check_compile_mode, check_device_name
from .errors import CmkitError
from .objectives import MethodSpec, get_method
from .safe_io import read_json
from .validate import check_seed

# The defaults' sections, in the order config.json lists them.
SECTIONS = ("data", "noise", "model", "objective", "train")


def _packaged(name: str) -> dict:
    """A packaged config file; keys starting with '_' (the source of the defaults) are documentation."""
    return _without_notes(json.loads(resources.files("cmkit").joinpath("configs", name).read_text()))


def _without_notes(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _overlay(base: dict, update: dict, where: str) -> dict:
    """``update`` deep-merged into a copy of ``base`` for a defaults file: it may add model and
    objective keys, but not invent data, noise or train keys (a typo there would go unnoticed)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _overlay(out[key], value, name + ".")
        elif key in out or where.split(".")[0] in ("model", "objective"):
            out[key] = copy.deepcopy(value)
        else:
            raise CmkitError(f"a defaults file sets {name!r}, which configs/base.json does not have")
    return out


def base_section(name: str) -> dict:
    """A section of the defaults every method shares (``configs/base.json``)."""
    return _packaged("base.json")[name]


def default_config(method: str, images: bool = False) -> dict:
    """The method's defaults: ``configs/base.json`` with ``configs/<method>.json`` over it; for image
    data with the image overlay (``configs/images.json``: a UNet instead of the MLP, image batch
    sizes) and the method's own ``images`` section applied."""
    spec = get_method(method)
    base = _packaged("base.json")
    own = _without_notes(json.loads(spec.defaults_file()))
    own_images = own.pop("images", {})
    unknown = set(own) - set(SECTIONS)
    if unknown:
        raise CmkitError(f"the defaults of {method} have unknown sections: {', '.join(sorted(unknown))}")
    config: dict = {"method": spec.name}
    if spec.teacher:
        config["teacher"] = None
    if spec.init:
        config["init"] = None
    for section in SECTIONS:
        if spec.teacher and section in ("noise", "model"):
            continue  # taken from the teacher
        config[section] = base.get(section, {})
    config = _overlay(config, own, "")
    if images:
        overlay = _packaged("images.json")
        if "model" in config:
            config["model"] = overlay["model"]
        config = _overlay(config, {"train": overlay["train"]}, "")
        if "model" not in config:
            own_images = {k: v for k, v in own_images.items() if k != "model"}
        config = _overlay(config, own_images, "")
    return config


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CmkitError(f"config file not found: {path}")
    config = read_json(path, "config file")
    if not isinstance(config, dict):
        raise CmkitError(f"{path.name} must hold a JSON object")
    return config


# Types of the shared keys whose default is null (any other key must keep its default's type); a
# method's own null objective keys are typed in its spec (`MethodSpec.nullable`).
NULLABLE = {"teacher": str, "init": str, "data.name": str, "data.resolution": int, "data.root": str, "data.workers": int,
            "train.grad_clip": float, "model.channels": list, "model.layers_per_block": int,
            "model.attention": list, "model.dropout": float, "model.num_classes": int}


def _check_type(name: str, default, value, nullable: dict) -> None:
    """Refuse a value of another type than the default's (ints may stand for floats)."""
    expected = nullable.get(name) if default is None or name in nullable else type(default)
    if value is None and name in nullable:
        return
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is list:
        ok = isinstance(value, list) and (default is None or len(value) == len(default))
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise CmkitError(f"config key {name!r} takes a {expected.__name__}"
                         + (f" of length {len(default)}" if expected is list and default is not None else "")
                         + f", got {value!r}")


def merge(base: dict, update: dict, where: str = "", nullable: dict | None = None) -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys and wrong types are errors.
    ``nullable``: the types of keys whose default is null (default: those of ``base``'s method)."""
    if nullable is None:
        nullable = nullable_types(get_method(base["method"])) if "method" in base else NULLABLE
    out = copy.deepcopy(base)
    if not isinstance(update, dict):
        raise CmkitError(f"config section {where.rstrip('.') or 'top level'!r} must be a JSON object, got {update!r}")
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in out:
            known = ", ".join(where + k for k in out) or "none"
            close = difflib.get_close_matches(str(key), [str(k) for k in out], n=1, cutoff=0.6)
            hint = f": did you mean {where + close[0]!r}?" if close else ""
            raise CmkitError(f"unknown config key {name!r}{hint} (known here: {known})")
        if name == "method" and value != out[key]:
            raise CmkitError(f"the method is chosen with --method, not in the config ({value!r})")
        if isinstance(out[key], dict):
            out[key] = merge(out[key], value, name + ".", nullable)
        else:
            _check_type(name, out[key], value, nullable)
            out[key] = copy.deepcopy(value)
    return out


def nullable_types(spec: MethodSpec) -> dict:
    return {**NULLABLE, **spec.nullable}


def parse_set(assignment: str) -> dict:
    """'train.lr=1e-3' -> {'train': {'lr': 0.001}}. Values parse as JSON, else as strings."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise CmkitError(f"--set takes key=value, got {assignment!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    nested: dict = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def build_config(method: str, *, config_file: str | None = None, sets: list[str] = (), preview: bool = False,
                 **options) -> dict:
    """Defaults <- config file <- options (dotted names, None = not given) <- --set. The defaults
    are the image ones when the data named last (by any of these) is an image source. ``preview``
    (--print-config): a method's teacher may still be missing."""
    updates = []
    if config_file:
        user = read_config_file(config_file)
        if user.get("method", method) != method:
            raise CmkitError(f"{config_file} is for method {user['method']!r}, not {method!r}")
        updates.append((config_file, user))
    updates += [(dotted, parse_set(f"{dotted}={json.dumps(value)}")) for dotted, value in options.items()
                if value is not None]
    updates += [(assignment.split("=")[0], parse_set(assignment)) for assignment in sets]
    data_names = [u["data"]["name"] for _, u in updates if isinstance(u.get("data"), dict) and "name" in u["data"]]
    images = bool(data_names) and isinstance(data_names[-1], str) and is_image_source(data_names[-1])
    config = default_config(method, images=images)
    for source, update in updates:
        inherited = {"model", "noise"} & set(update) - set(config)
        if inherited:
            raise CmkitError(f"{source!r} sets {' and '.join(sorted(inherited))}: method {method} takes "
                             "those settings from the teacher run")
        config = merge(config, update)
    if config.get("init"):
        touched = sorted({"model", "noise"} & {k for _, u in updates for k in u})
        if touched:
            raise CmkitError(f"with --init the run takes its {' and '.join(touched)} from the --init run; "
                             "drop those settings")
    check_config(config, need_teacher=not preview)
    return config


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config: dict, need_teacher: bool = True) -> None:
    """The checks a config passes before any run starts from it: what it names exists, and its
    numbers are in range. (What depends on the machine or the process count is checked when the
    run starts.)"""
    spec = get_method(config.get("method"))
    train, data = config["train"], config["data"]
    if not data["name"]:
        raise CmkitError("no data given: pass --data NAME_OR_PATH")
    if need_teacher and spec.teacher and not config.get("teacher"):
        raise CmkitError(f"method {spec.name} needs a teacher: pass --teacher RUN (a trained edm run)")
    for key in ("sample_every", "max_bad_steps"):
        if not _is_int(train[key]) or train[key] < 0:
            raise CmkitError(f"train.{key} must be a non-negative integer (0: never), got {train[key]!r}")
    for key in ("steps", "batch_size", "log_every", "save_every", "grad_accum", "keep_checkpoints"):
        if not _is_int(train[key]) or train[key] < 1:
            raise CmkitError(f"train.{key} must be a positive integer, got {train[key]!r}")
    for key in ("n", "n_holdout"):
        if not _is_int(data[key]) or data[key] < 2:
            raise CmkitError(f"data.{key} must be an integer of at least 2, got {data[key]!r}")
    if not isinstance(train["tensorboard"], bool):
        raise CmkitError(f"train.tensorboard must be true or false, got {train['tensorboard']!r}")
    if not (isinstance(train["lr"], (int, float)) and train["lr"] > 0):
        raise CmkitError(f"train.lr must be positive, got {train['lr']!r}")
    if not (isinstance(train["ema_rate"], (int, float)) and 0 <= train["ema_rate"] < 1):
        raise CmkitError(f"train.ema_rate must be in [0, 1), got {train['ema_rate']!r}")
    if train["grad_clip"] is not None and train["grad_clip"] < 0:
        raise CmkitError(f"train.grad_clip must be >= 0 (0 or null: no clipping), got {train['grad_clip']!r}")
    for key, value in (("train.seed", train["seed"]), ("data.seed", data["seed"])):
        check_seed(value, key)
    check_stream_settings(data)
    check_device_name(train["device"], "train.device")
    check_compile_mode(train["compile_mode"])
