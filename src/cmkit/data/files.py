"""Vector data from user files: .npy, .npz and .csv arrays of shape (N, D).

An .npz may also hold class labels (``labels``, N integers) and other kinds of condition, one
array per kind named ``condition_<kind>`` (N rows of numbers): the training loop hands them to the
network in its `cmkit.condition.Condition` under ``<kind>``."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import CmkitError
from ..safe_io import READ_ERRORS, NpzArchive, load_npy

SUFFIXES = (".npy", ".npz", ".csv")
CONDITION_PREFIX = "condition_"
MAX_CONDITION_KINDS = 8


def load_array(path: str | Path) -> np.ndarray:
    """Load an (N, D) array of finite numbers as float64; raise CmkitError naming any problem."""
    return load_labelled_array(path)[0]


def load_labelled_array(path: str | Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, np.ndarray]]:
    """`load_array`, the (N,) integer class labels an .npz holds under ``labels`` (else None) and
    its other condition kinds ({kind: (N, ...) float32}, from ``condition_<kind>`` arrays)."""
    path = Path(path)
    if not path.exists():
        raise CmkitError(f"data file not found: {path}")
    if path.suffix.lower() not in SUFFIXES:
        raise CmkitError(f"unsupported data file {path.name!r}: use .npy, .npz or .csv, or a built-in set")
    try:
        conditions = {}
        if path.suffix.lower() == ".npy":
            arr, labels = load_npy(path), None
        elif path.suffix.lower() == ".npz":
            with NpzArchive(path) as archive:
                kinds = [k for k in archive.files if k.startswith(CONDITION_PREFIX)]
                keys = ([k for k in ("data", "x", "arr_0") if k in archive.files]
                        or [k for k in archive.files if k != "labels" and k not in kinds])
                if not keys:
                    raise CmkitError(f"{path.name} holds no arrays")
                arr = archive[keys[0]]
                labels = archive["labels"] if "labels" in archive.files else None
                if len(kinds) > MAX_CONDITION_KINDS:
                    raise CmkitError(f"{path.name} holds {len(kinds)} condition arrays; at most {MAX_CONDITION_KINDS}")
                conditions = {k[len(CONDITION_PREFIX):]: archive[k] for k in kinds}
        else:
            arr, labels = _load_csv(path), None
    except CmkitError:
        raise
    except READ_ERRORS as e:
        raise CmkitError(f"cannot read {path.name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    arr = validate_array(arr, path.name)
    conditions = {kind: validate_condition(kind, values, len(arr), path.name) for kind, values in conditions.items()}
    return arr, validate_labels(labels, len(arr), path.name), conditions


def validate_condition(kind: str, values: np.ndarray, n: int, name: str) -> np.ndarray:
    """``n`` rows of finite numbers as float32, under a kind name that is a plain identifier
    other than the built-in ones."""
    if not kind.isidentifier() or kind in ("labels", "guidance"):
        raise CmkitError(f"{name}: condition_{kind} is not a usable condition name (a plain identifier other than "
                         "labels and guidance)")
    if values.dtype.kind not in "biuf" or values.ndim < 1 or values.shape[0] != n:
        raise CmkitError(f"{name}: condition_{kind} must be {n} rows of numbers, got {values.dtype} {values.shape}")
    if not np.isfinite(values).all():
        raise CmkitError(f"{name}: condition_{kind} contains NaN or inf")
    return values.astype(np.float32)


def validate_labels(labels, n: int, name: str) -> np.ndarray | None:
    """None, or ``n`` non-negative integer class labels as int64."""
    if labels is None:
        return None
    if labels.dtype.kind not in "iu" or labels.shape != (n,) or (len(labels) and labels.min() < 0):
        raise CmkitError(f"{name}: labels must be {n} non-negative integers, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _load_csv(path: Path) -> np.ndarray:
    with open(path, encoding="utf-8-sig") as fh:  # -sig: spreadsheets write a byte-order mark
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",")]
        skip = 0
    except ValueError:
        skip = 1  # a header row
    with warnings.catch_warnings():  # an empty file is reported below, as one line
        warnings.simplefilter("ignore")
        return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64,
                          encoding="utf-8-sig")


def validate_array(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind not in "biuf":
        raise CmkitError(f"{name}: data must be numeric, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise CmkitError(f"{name}: data must have shape (N, D), got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise CmkitError(f"{name}: need at least 2 rows and 1 column, got shape {arr.shape}")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise CmkitError(f"{name}: data contains NaN or inf ({int(bad.sum())} values, first in row {row})")
    return arr


def folder_classes(keys: list[str], root: str) -> tuple[list[str] | None, np.ndarray | None, str | None]:
    """(class names, labels, None) when every image (``keys``: paths relative to ``root``) sits in a
    first-level sub-folder; else (None, None, why the folder is unlabelled, or None for a folder of
    loose images only)."""
    parts = [key.split("/") for key in keys]
    if all(len(p) == 2 for p in parts):
        names = sorted({p[0] for p in parts})
        return names, np.array([names.index(p[0]) for p in parts], dtype=np.int64), None
    folders = sorted({p[0] for p in parts if len(p) > 1})
    if not folders:
        return None, None, None
    loose = [k for k, p in zip(keys, parts) if len(p) == 1]
    deep = [k for k, p in zip(keys, parts) if len(p) > 2]
    shown = ", ".join(folders[:4]) + (" ..." if len(folders) > 4 else "")
    where = (f"{len(loose)} of {len(keys)} images (e.g. {loose[0]}) sit directly in {root}, beside sub-folders "
             f"({shown})" if loose else f"{len(deep)} of {len(keys)} images (e.g. {deep[0]}) sit deeper than "
             f"a first-level sub-folder of {root}")
    return None, None, (f"unlabelled: {where}; sub-folders are classes only when every image sits directly "
                        "in one (move the others into a class folder)")


def holdout_split(n: int, fraction: float, seed: int, name: str, unit: str = "rows") -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): a seeded permutation with ``fraction`` held out (at least
    one), the same for vectors and images."""
    if not 0 < fraction < 1:
        raise CmkitError(f"data.holdout_fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng([seed, 2]).permutation(n)
    n_hold = max(1, int(round(fraction * n)))
    if n_hold >= n:
        raise CmkitError(f"{name}: too few {unit} ({n}) to hold some out for evaluation")
    return perm[n_hold:], perm[:n_hold]
