"""Run configurations: plain nested dicts, saved as JSON in every run directory.

A config starts from the method's defaults (``cmkit/configs/<method>.json``), then a user's
``--config FILE`` (JSON), then the command-line options, then ``--set key=value`` overrides.
Every key a user sets must exist in the defaults, so a typo is an error, not a silent no-op.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

from .errors import CmkitError

METHODS = ("edm", "cd", "ct")


def default_config(method: str) -> dict:
    if method not in METHODS:
        raise CmkitError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    text = resources.files("cmkit").joinpath("configs", f"{method}.json").read_text()
    return json.loads(text)


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CmkitError(f"config file not found: {path}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CmkitError(f"{path.name} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise CmkitError(f"{path.name} must hold a JSON object")
    return config


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys are an error."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in out:
            known = ", ".join(where + k for k in out) or "none"
            raise CmkitError(f"unknown config key {name!r} (known here: {known})")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, name + ".")
        else:
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
    """Defaults <- config file <- options (dotted names, None = not given) <- --set."""
    config = default_config(method)
    if config_file:
        user = read_config_file(config_file)
        if user.get("method", method) != method:
            raise CmkitError(f"{config_file} is for method {user['method']!r}, not {method!r}")
        config = merge(config, user)
    for dotted, value in options.items():
        if value is not None:
            config = merge(config, parse_set(f"{dotted}={json.dumps(value)}"))
    for assignment in sets:
        update = parse_set(assignment)
        inherited = {"model", "noise"} & set(update) - set(config)
        if inherited:
            raise CmkitError(f"unknown config key {assignment.split('=')[0]!r}: method {method} takes "
                             f"its {' and '.join(sorted(inherited))} settings from the teacher run")
        config = merge(config, update)
    return config
