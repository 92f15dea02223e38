"""Run configurations: plain nested dicts, saved as JSON in every run directory.

A config starts from the method's defaults (``cmkit/configs/<method>.json``), then a user's
``--config FILE`` (JSON), then the command-line options, then ``--set key=value`` overrides.
Every key a user sets must exist in the defaults, so a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import copy
import difflib
import json
from importlib import resources
from pathlib import Path

from .errors import CmkitError
from .safe_io import read_json


def _is_image_source(name) -> bool:
    from .data import is_image_source
    return isinstance(name, str) and is_image_source(name)

METHODS = ("edm", "cd", "ct", "ict", "ect", "sct", "scd", "meanflow")
TEACHER_METHODS = ("cd", "scd")  # distil from --teacher (and take its model, noise and data units)
INIT_METHODS = ("ect", "sct", "scd")  # may start from an EDM run's weights with --init


def _packaged(name: str) -> dict:
    """A packaged config; keys starting with '_' (the source of the defaults) are documentation."""
    config = json.loads(resources.files("cmkit").joinpath("configs", name).read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def default_config(method: str, images: bool = False) -> dict:
    """The method's defaults; for image data with the image overlay (``configs/images.json``)
    applied: a UNet instead of the MLP, image batch sizes and learning rates."""
    if method not in METHODS:
        raise CmkitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    config = _packaged(f"{method}.json")
    if images:
        overlay = _packaged("images.json")
        if "model" in config:  # cd takes its model from the teacher
            config["model"] = overlay["model"]
        config = merge(config, {"train": overlay["train"]})
        extra = overlay["methods"].get(method, {})
        if "model" not in config:
            extra = {k: v for k, v in extra.items() if k != "model"}
        config = merge(config, extra)
    return config


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CmkitError(f"config file not found: {path}")
    config = read_json(path, "config file")
    if not isinstance(config, dict):
        raise CmkitError(f"{path.name} must hold a JSON object")
    return config


# Types of the keys whose default is null (any other key must keep its default's type).
NULLABLE = {"teacher": str, "init": str, "objective.tangent_warmup": int, "data.name": str, "data.resolution": int, "data.root": str,
            "objective.huber_c": float, "objective.total_steps": int, "train.grad_clip": float,
            "model.channels": list, "model.layers_per_block": int, "model.attention": list,
            "model.dropout": float, "objective.r_p_mean": float, "objective.r_p_std": float,
            "model.num_classes": int, "objective.guidance": list}


def _check_type(name: str, default, value) -> None:
    """Refuse a value of another type than the default's (ints may stand for floats)."""
    expected = NULLABLE.get(name) if default is None or name in NULLABLE else type(default)
    if value is None and name in NULLABLE:
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


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys and wrong types are errors."""
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
            out[key] = merge(out[key], value, name + ".")
        else:
            _check_type(name, out[key], value)
            out[key] = copy.deepcopy(value)
    return out


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


def build_config(method: str, *, config_file: str | None = None, sets: list[str] = (),
                 **options) -> dict:
    """Defaults <- config file <- options (dotted names, None = not given) <- --set. The defaults
    are the image ones when the data named last (by any of these) is an image source."""
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
    config = default_config(method, images=bool(data_names) and _is_image_source(data_names[-1]))
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
    return config
