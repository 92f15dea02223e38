"""One condition value through every layer (`cmkit.condition`).

- The value's own operations: batching as the samplers and guidance batch it, and torch's pytree
  (what torch.compile and torch.func see) round-trips it.
- A new kind of condition, defined here by a backbone and a data file only, reaches the backbone
  from `cmkit train` and from `Run.sample`, and the trained model follows it: nothing else in cmkit
  names it.
"""

import numpy as np
import pytest
import torch

import cmkit
from cmkit.condition import Condition, as_condition
from cmkit.nets import BACKBONES, ResidualMLP
from helpers import TINY, cli


def test_condition_batches_like_its_tensors():
    labels, scale = torch.tensor([0, 1, 2]), torch.tensor(2.5)
    cond = Condition(labels=labels, guidance=scale, extra=None)
    assert set(cond) == {"labels", "guidance"} and cond.labels is labels
    wide = cond.expand(3)
    assert wide.guidance.tolist() == [2.5] * 3
    assert cond.select(slice(1, 3)).labels.tolist() == [1, 2] and cond.select(slice(1, 3)).guidance.ndim == 0
    both = Condition.cat([cond, cond.replace(labels=torch.full((3,), 9))], [3, 3])
    assert both.labels.tolist() == [0, 1, 2, 9, 9, 9] and both.guidance.shape == (6,)
    assert "guidance" not in cond.replace(guidance=None)
    with pytest.raises(ValueError, match="different kinds"):
        Condition.cat([cond, Condition(labels=labels)], [3, 3])
    assert as_condition(None) == {} and as_condition(2).labels.dtype == torch.int64
    leaves, spec = torch.utils._pytree.tree_flatten(cond)
    back = torch.utils._pytree.tree_unflatten([leaf + 1 for leaf in leaves], spec)
    assert isinstance(back, Condition) and back.labels.tolist() == [1, 2, 3]


SEEN: list = []


class BrightnessMLP(ResidualMLP):
    """A backbone for a kind of condition cmkit does not know: ``brightness``, one number per
    sample, added to the time embedding's input through a learned projection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.brightness = torch.nn.Linear(1, self.out.in_features)

    def forward(self, x, c_noise, condition=None):
        SEEN.append(sorted(condition))
        b = condition["brightness"].to(x.dtype).reshape(x.shape[0], 1)
        h = super().forward(x, c_noise, condition.replace(brightness=None))
        return h + self.out(self.brightness(b))


@pytest.mark.slow
def test_a_new_condition_kind_reaches_the_backbone_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKBONES, "brightness-mlp", BrightnessMLP)
    rng = np.random.default_rng(0)
    b = rng.choice([-1.0, 1.0], size=(3000, 1))
    x = np.concatenate([b, -b], axis=1) + 0.1 * rng.standard_normal((3000, 2))
    np.savez(tmp_path / "bright.npz", x=x, condition_brightness=b)
    run_dir = tmp_path / "edm"
    SEEN.clear()
    assert cli("train", "--method", "edm", "--data", tmp_path / "bright.npz", "--set", "model.backbone=brightness-mlp",
               *TINY, "--steps", 600, "--out", run_dir) == 0
    assert SEEN and all(kinds == ["brightness"] for kinds in SEEN)
    run = cmkit.load_run(run_dir)
    for value in (-1.0, 1.0):
        samples = run.sample(500, steps=10, seed=1, condition={"brightness": torch.full((500, 1), value)})
        # The model follows the condition: the conditional mean, not the mixture's (0, 0).
        np.testing.assert_allclose(samples.mean(0), [value, -value], atol=0.25)
