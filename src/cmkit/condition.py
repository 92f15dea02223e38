"""One value for everything a network is conditioned on besides x and the noise level.

    cond = Condition(labels=y)                    # class labels (n,)
    cond = cond.replace(guidance=w)              # and a guidance scale per sample (n,)
    model(x, sigma, cond)                          # every layer passes it on unchanged

A condition maps a *kind* (a name) to a tensor whose first dimension is the batch. Only the data
(which makes conditions) and the backbones (which embed them) look inside; preconditioning,
objectives, samplers, editing, serving and export pass the value through, slice it with the batch
(`select`, `cat`, `expand`, `to`) and at most replace a kind they own (classifier-free guidance
swaps ``labels`` for the null label, a guided student's scale is ``guidance``). So a new kind of
condition (text embeddings, an attribute) touches a backbone and the data, not every signature.

The built-in kinds: ``labels`` (int64 class indices 0..K-1, K the null label), ``guidance``
(float guidance scales of a guided-distilled student) and ``text`` (float per-token prompt
embeddings (n, L, D) from a pipeline's text encoder, `cmkit.text`; a text model's null condition
is the empty prompt's embedding).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

LABELS, GUIDANCE, TEXT = "labels", "guidance", "text"


class Condition(Mapping):
    """An immutable mapping kind -> per-sample tensor (kinds given as None are left out). A
    0-dimensional tensor or a number stands for the same value for every sample (`expand`)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, object] | None = None, **kinds):
        merged = {**(values or {}), **kinds}
        self._values = {k: torch.as_tensor(v) for k, v in merged.items() if v is not None}

    def __getitem__(self, kind: str) -> torch.Tensor:
        return self._values[kind]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" for k, v in self.items())
        return f"Condition({inner})"

    @property
    def labels(self) -> torch.Tensor | None:
        return self._values.get(LABELS)

    @property
    def guidance(self) -> torch.Tensor | None:
        return self._values.get(GUIDANCE)

    @property
    def text(self) -> torch.Tensor | None:
        return self._values.get(TEXT)

    def replace(self, **kinds) -> "Condition":
        """A copy with ``kinds`` set (None removes a kind)."""
        out = dict(self._values)
        for k, v in kinds.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = v
        return Condition(out)

    def expand(self, batch: int) -> "Condition":
        """Every kind with a first dimension of ``batch`` (0-d values repeated)."""
        return Condition({k: v.expand(batch, *v.shape) if v.ndim == 0 else v for k, v in self.items()})

    def select(self, index) -> "Condition":
        """Rows ``index`` (a slice or index tensor) of every per-sample kind."""
        return Condition({k: v if v.ndim == 0 else v[index] for k, v in self.items()})

    def to(self, device) -> "Condition":
        return Condition({k: v.to(device) for k, v in self.items()})

    @staticmethod
    def cat(conditions: Iterable["Condition"], batches: Iterable[int]) -> "Condition":
        """Conditions of consecutive batches (of sizes ``batches``) as one; all have the same kinds."""
        conditions, batches = list(conditions), list(batches)
        kinds = set(conditions[0])
        if any(set(c) != kinds for c in conditions):
            raise ValueError("conditions of different kinds cannot be batched together")
        return Condition({k: torch.cat([c.expand(b)[k] for c, b in zip(conditions, batches)]) for k in kinds})


EMPTY = Condition()


def as_condition(value) -> Condition:
    """A `Condition` from what a caller may hand over: None (nothing), a Condition, or class
    labels alone (a tensor, array or int), the common case in scripts."""
    if value is None:
        return EMPTY
    if isinstance(value, Condition):
        return value
    if isinstance(value, Mapping):
        return Condition(value)
    return Condition(labels=torch.as_tensor(value).long())


def _flatten(cond: Condition):
    kinds = sorted(cond)
    return [cond[k] for k in kinds], kinds


def _unflatten(values, kinds) -> Condition:
    return Condition(dict(zip(kinds, values)))


# A pytree node, so that torch.compile and torch.func see the tensors inside as inputs.
try:
    import torch.utils._pytree as _pytree
    _pytree.register_pytree_node(Condition, _flatten, _unflatten,
                                 serialized_type_name="cmkit.condition.Condition")
except (ImportError, AttributeError, ValueError):  # an older torch: treated as a constant, still correct
    pass
