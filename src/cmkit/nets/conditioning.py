"""What a backbone makes of the built-in condition kinds (`cmkit.condition`): a class label and a
guidance scale.

Labels are integers 0..K-1 plus one more, K, the *null* label: the "no class" input a model trained
with label dropout knows, which classifier-free guidance needs. A condition without ``labels`` on
a conditional backbone means the null label. A guidance scale w (a guided-distilled student's extra
input) enters through its own embedding whose last layer starts at zero, so a student initialised
from its teacher computes exactly the teacher's function at every w when training starts.
"""

from __future__ import annotations

import torch
from torch import nn

from ..condition import GUIDANCE, LABELS, Condition, as_condition


def labels_or_null(class_labels: torch.Tensor | None, num_classes: int, batch: int, device) -> torch.Tensor:
    """The labels to embed: ``class_labels`` as int64, or the null label K for all when None."""
    if class_labels is None:
        return torch.full((batch,), num_classes, dtype=torch.long, device=device)
    class_labels = torch.as_tensor(class_labels, device=device).long()
    return class_labels.expand(batch) if class_labels.ndim == 0 else class_labels


def check_condition(name: str, num_classes: int, guidance_input: bool, condition) -> Condition:
    """``condition`` as a `Condition` after checking it against what the backbone takes: labels
    only if class-conditional, a guidance scale exactly when it has that input, no other kinds."""
    condition = as_condition(condition)
    unknown = sorted(set(condition) - {LABELS, GUIDANCE})
    if unknown:
        raise ValueError(f"this {name} takes no {unknown[0]!r} condition")
    if condition.labels is not None and not num_classes:
        raise ValueError(f"this {name} is unconditional: it takes no class labels")
    if (condition.guidance is not None) != guidance_input:
        raise ValueError(f"this {name} {'needs' if guidance_input else 'takes no'} guidance scale input"
                         + (" (it was distilled with guidance)" if guidance_input else ""))
    return condition


def zero_last_layer(mlp: nn.Module) -> nn.Module:
    """Zero the last Linear of ``mlp`` so that its output starts at 0."""
    last = [m for m in mlp.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return mlp
