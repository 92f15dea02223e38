"""Class labels at the edges: what ``--class`` means, checked against a run.

A spec is None (the default: random classes for a conditional run, nothing for an unconditional
one), ``"random"``, ``"null"`` (the unconditional null label of a run trained with label
dropout), a class index or name, or a sequence of those (cycled over the samples, so
``--class 0,1,2 --n 9`` gives three of each in turn).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import CmkitError

RANDOM, NULL = "random", "null"


def parse_class_spec(text: str) -> list[str] | str:
    """``--class`` text: 'random', 'null', or a comma list of indices and names."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise CmkitError(f"--class takes an index, a name, a comma list, 'random' or 'null', got {text!r}")
    return items[0] if len(items) == 1 and items[0] in (RANDOM, NULL) else items


def resolve_labels(spec, n: int, *, num_classes: int, class_names: Sequence[str] | None = None,
                   has_null: bool = False, seed: int = 0) -> torch.Tensor | None:
    """(n,) int64 labels for ``spec`` (see the module docstring), or None for an unconditional run.
    Random labels come from their own seeded stream, so they do not change the seed's noise."""
    if not num_classes:
        if spec is not None:
            raise CmkitError("this run is unconditional: it takes no class labels (--class)")
        return None
    if spec is None or (isinstance(spec, str) and spec == RANDOM):
        return torch.from_numpy(np.random.default_rng([seed, 5]).integers(0, num_classes, n))
    if isinstance(spec, str) and spec == NULL:
        if not has_null:
            raise CmkitError("--class null needs a run trained with label dropout (--label-dropout > 0)")
        return torch.full((n,), num_classes, dtype=torch.long)
    items = list(spec) if isinstance(spec, (list, tuple, np.ndarray, torch.Tensor)) else [spec]
    if not items:
        raise CmkitError("the list of classes is empty")
    labels = [class_index(item, num_classes, class_names) for item in items]
    return torch.tensor([labels[i % len(labels)] for i in range(n)], dtype=torch.long)


def class_index(item, num_classes: int, class_names: Sequence[str] | None = None) -> int:
    """A class given by index (int or digits) or by name (case-insensitive), checked in range."""
    if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.ndim == 0):
        index = int(item)
    elif isinstance(item, str) and item.lstrip("-").isdigit():
        index = int(item)
    elif isinstance(item, str) and class_names:
        lowered = [name.lower() for name in class_names]
        if item.lower() not in lowered:
            raise CmkitError(f"unknown class {item!r}; this run's classes: {', '.join(class_names)}")
        return lowered.index(item.lower())
    else:
        raise CmkitError(f"a class is an index in 0..{num_classes - 1}, got {item!r}")
    if not 0 <= index < num_classes:
        raise CmkitError(f"class {index} is out of range: this run has {num_classes} classes (0..{num_classes - 1})")
    return index
