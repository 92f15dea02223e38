"""Checks of user-given numbers, one place for the command line, the Python API and the server:
an integer is an integer (not a bool, not 2.5) and a float is finite, each within its range.
JSON and form fields arrive as NaN, inf, "1e999" or true as easily as digits; every check names
the field and the allowed range in one CmkitError."""

from __future__ import annotations

import math
import numbers

from .errors import CmkitError

SEED_LIMIT = 2**63  # seeds are integers in [0, 2^63): what torch.Generator.manual_seed takes


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def check_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():  # 3.0 from a JSON client
            value = int(value)
        else:
            raise CmkitError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CmkitError(f"{name} must be {_range(lo, hi)}, got {value}")
    return value


def check_float(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """``value`` as a finite float in [lo, hi] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CmkitError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise CmkitError(f"{name} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise CmkitError(f"{name} must be {_range(lo, hi)}, got {value:g}")
    return value


def check_seed(value, name: str = "seed") -> int:
    """A seed: an integer in [0, 2^63)."""
    value = check_int(name, value)
    if not 0 <= value < SEED_LIMIT:
        raise CmkitError(f"{name}: seeds are integers in [0, 2^63), got {value}")
    return value
