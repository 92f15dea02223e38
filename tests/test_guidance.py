"""Class-conditional models, classifier-free guidance and guided distillation.

Truth: a mixture of Gaussians with one class per component has a closed-form class-conditional
denoiser (component k's posterior mean) and a closed-form unconditional one (the mixture's), so
the guided denoiser (1 - w) D_mix + w D_k is closed form too.
"""

import math

import numpy as np
import pytest
import torch

from cmkit.analytic import GaussianMixture
from cmkit.classes import resolve_labels
from cmkit.condition import Condition
from cmkit.errors import CmkitError
from cmkit.guidance import GuidedDenoiser, guided_denoise
from cmkit.nets import ResidualMLP, UNet, load_backbone_weights
from cmkit.noise import NoiseConfig, append_zero, karras_sigmas
from cmkit.precond import ConsistencyFunction, EDMDenoiser
from cmkit.run import load_run
from cmkit.sampling import sample_heun
from helpers import TINY_TRAIN, cli

BLOBS = GaussianMixture(weights=[0.25] * 4, means=[[-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0], [3.0, 3.0]],
                        covs=[[[0.25, 0.0], [0.0, 0.25]]] * 4)


def posterior_mean(x, sigma, mean, cov):
    """E[x0 | x0 + sigma z = x] for x0 ~ N(mean, cov), written out in plain torch."""
    eye = torch.eye(len(mean), dtype=torch.float64)
    return mean + (x - mean) @ torch.linalg.solve(cov + sigma**2 * eye, cov)


class AnalyticBackbone(torch.nn.Module):
    """The backbone whose EDM preconditioning is exactly ``BLOBS``' class denoiser (the inverse of
    the preconditioning applied to the ideal D): labels, null label and all pass through cmkit."""

    def __init__(self, noise: NoiseConfig):
        super().__init__()
        self.num_classes, self.noise = 4, noise
        self.ideal = BLOBS.as_class_denoiser()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # a module with a parameter, like a real one

    def forward(self, u, c_noise, condition=None):
        from cmkit.noise import edm_scalings

        sigma = torch.exp(4 * c_noise)  # EDM's c_noise = ln(sigma) / 4
        c_skip, c_out, c_in = (c[:, None] for c in edm_scalings(sigma, self.noise.sigma_data))
        x = u / c_in
        labels = None if condition is None or condition.labels is None else condition.labels.clone()
        if labels is not None:
            labels[labels == self.num_classes] = -1  # the null label: the mixture's denoiser
        d = self.ideal(x.double(), sigma.double(), labels).to(x.dtype)
        return (d - c_skip * x) / c_out


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_denoiser_matches_the_closed_form(w):
    noise = NoiseConfig()
    teacher = EDMDenoiser(AnalyticBackbone(noise), noise).double()
    g = torch.Generator().manual_seed(0)
    x = BLOBS.sample(64, generator=g) + 1.5 * torch.randn(64, 2, generator=g, dtype=torch.float64)
    labels = torch.arange(64) % 4
    sigma = 1.5
    mix = BLOBS.denoise(x, sigma)
    cond = torch.stack([posterior_mean(x[i], sigma, BLOBS.means[k], BLOBS.covs[k]) for i, k in enumerate(labels)])
    expected = (1 - w) * mix + w * cond
    got = GuidedDenoiser(teacher, w)(x, sigma, labels)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    # a per-sample scale, as guided distillation draws it
    scales = torch.tensor([0.0, 1.0, 2.5, 4.0]).repeat(16).double()
    per_sample = guided_denoise(teacher, x, sigma, labels, scales)
    torch.testing.assert_close(per_sample, (1 - scales[:, None]) * mix + scales[:, None] * cond, rtol=1e-6, atol=1e-6)


def test_labels_steer_the_teacher_sampler_to_each_component():
    """At w = 1 the guided ODE is the class's own: Heun sampling with label k gives N(mu_k, S_k)."""
    noise = NoiseConfig()
    teacher = EDMDenoiser(AnalyticBackbone(noise), noise).double()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(4000) % 4
    sigmas = append_zero(karras_sigmas(40, 0.002, 80.0)).double()
    x = sample_heun(GuidedDenoiser(teacher, 1.0), 80 * torch.randn(4000, 2, generator=g, dtype=torch.float64),
                    sigmas, labels)
    for k in range(4):
        xs = x[labels == k]
        assert torch.allclose(xs.mean(0), BLOBS.means[k], atol=0.05)
        assert torch.allclose(torch.cov(xs.T), BLOBS.covs[k], atol=0.03)


@pytest.mark.parametrize("net", ["mlp", "unet"])
def test_guided_student_starts_equal_to_its_teacher_at_every_scale(net):
    torch.manual_seed(0)
    if net == "mlp":
        teacher_net, student_net = ResidualMLP(2, width=32, num_classes=3), ResidualMLP(2, width=32, num_classes=3,
                                                                                       guidance=True)
        x = torch.randn(6, 2)
    else:
        teacher_net = UNet(1, 8, preset="tiny", num_classes=3)
        student_net = UNet(1, 8, preset="tiny", num_classes=3, guidance=True)
        assert teacher_net.unet.config.num_class_embeds == 4  # diffusers' own embedding, with the null row
        x = torch.randn(6, 1, 8, 8)
    for p in teacher_net.parameters():  # a teacher that is not at its initialisation
        p.data.add_(0.1 * torch.randn_like(p))
    load_backbone_weights(student_net, teacher_net)
    teacher, student = ConsistencyFunction(teacher_net), ConsistencyFunction(student_net)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])  # 3 is the null label
    with torch.no_grad():
        want = teacher(x, 2.0, labels)
        for w in (0.0, 1.0, 7.5):
            torch.testing.assert_close(student(x, 2.0, Condition(labels=labels, guidance=torch.full((6,), w))), want)
        # the labels matter, and so does the null label
        assert not torch.allclose(teacher(x, 2.0, labels.roll(1)), want)


def test_label_specs_resolve_and_bad_ones_are_refused():
    names = ["a", "b", "c"]
    assert resolve_labels([0, "c"], 4, num_classes=3, class_names=names).tolist() == [0, 2, 0, 2]
    assert resolve_labels("B", 2, num_classes=3, class_names=names).tolist() == [1, 1]
    first = resolve_labels(None, 500, num_classes=3, seed=4)
    assert torch.equal(first, resolve_labels("random", 500, num_classes=3, seed=4))
    assert sorted(first.unique().tolist()) == [0, 1, 2]
    assert resolve_labels("null", 2, num_classes=3, has_null=True).tolist() == [3, 3]
    assert resolve_labels(None, 5, num_classes=0) is None
    for bad, kwargs in [(3, {}), (-1, {}), ("d", {"class_names": names}), ("null", {}), ([], {})]:
        with pytest.raises(CmkitError):
            resolve_labels(bad, 2, num_classes=3, **kwargs)
    with pytest.raises(CmkitError, match="unconditional"):
        resolve_labels(0, 2, num_classes=0)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """Labelled 2-D data: the four blobs (well separated) and two overlapping classes."""
    root = tmp_path_factory.mktemp("guidance")
    g = torch.Generator().manual_seed(0)
    k = torch.multinomial(BLOBS.weights, 8000, replacement=True, generator=g)
    x = BLOBS.means[k] + 0.5 * torch.randn(8000, 2, generator=g, dtype=torch.float64)
    np.savez(root / "blobs.npz", x=x.numpy(), labels=k.numpy())
    c = torch.randint(0, 2, (8000,), generator=g)
    y = torch.randn(8000, 2, generator=g, dtype=torch.float64)
    y[:, 0] += 2.0 * c - 1.0  # classes at x = -1 and +1, unit spread: the Bayes accuracy is 84%
    np.savez(root / "overlap.npz", x=y.numpy(), labels=c.numpy())
    return root


@pytest.mark.slow
def test_conditional_cd_puts_each_class_on_its_component(blobs):
    data = blobs / "blobs.npz"
    assert cli("train", "--method", "edm", "--data", data, "--steps", 600, "--out", blobs / "edm",
               "--label-dropout", 0.1, "--quiet") == 0
    assert cli("train", "--method", "cd", "--teacher", blobs / "edm", "--data", data, "--steps", 300,
               "--out", blobs / "cd", "--quiet") == 0
    run = load_run(blobs / "cd")
    assert run.num_classes == 4 and run.class_names == ["0", "1", "2", "3"]
    for steps in (1, 2):
        for c in range(4):
            x = torch.from_numpy(run.sample(400, steps=steps, class_labels=c, seed=c))
            nearest = torch.cdist(x, BLOBS.means).argmin(1)
            assert float((nearest == c).float().mean()) >= 0.95, (steps, c)


@pytest.mark.slow
def test_guided_student_follows_the_scale(blobs):
    """Distilled once over w in [0, 4], the 1-step student's class accuracy (by the Bayes classifier
    sign(x)) rises with w, as the guided teacher's does (50% unconditional at w = 0, the data's 84%
    at w = 1, near 100% at w = 3; a short run's student is partway from 84% toward 50% at w = 0)."""
    data = blobs / "overlap.npz"
    small = ["--set", "model.width=64", "--set", "model.depth=2", "--batch-size", 256, "--quiet"]
    assert cli("train", "--method", "edm", "--data", data, "--steps", 800, "--out", blobs / "oedm",
               "--label-dropout", 0.2, *small) == 0
    assert cli("train", "--method", "cd", "--teacher", blobs / "oedm", "--data", data, "--steps", 1000,
               "--out", blobs / "gcd", "--guidance", "0,4", "--batch-size", 256, "--quiet") == 0
    student, teacher = load_run(blobs / "gcd"), load_run(blobs / "oedm")
    labels = torch.arange(4000) % 2

    def accuracy(run, w, steps=None):
        x = run.sample(4000, steps=steps, class_labels=labels, guidance=w, seed=3)
        return float(((x[:, 0] > 0) == labels.numpy().astype(bool)).mean())

    acc = {w: accuracy(student, w, 1) for w in (0.0, 1.0, 3.0)}
    assert acc[0.0] + 0.05 < acc[1.0] < 0.93 and acc[3.0] > max(0.97, acc[1.0] + 0.05), acc
    guided = {w: accuracy(teacher, w) for w in (0.0, 1.0, 3.0)}
    assert abs(guided[0.0] - 0.5) < 0.04 and abs(guided[1.0] - 0.84) < 0.04 and guided[3.0] > 0.97, guided
    # one network evaluation: guided sampling of the student costs what plain sampling does
    calls = []
    hook = student.model.register_forward_hook(lambda *a: calls.append(1))
    student.sample(10, steps=1, class_labels=0, guidance=2.0)
    hook.remove()
    assert len(calls) == 1


def test_label_dropout_replaces_that_fraction_of_labels(blobs, monkeypatch):
    from cmkit.config import build_config
    from cmkit.training import Trainer

    config = build_config("edm", sets=["data.name=" + str(blobs / "blobs.npz"), "train.label_dropout=0.3",
                                       "train.batch_size=4000"])
    trainer = Trainer(config)
    seen = []
    draw = trainer.objective.draw  # every step's draws see the step's labels
    monkeypatch.setattr(trainer.objective, "draw", lambda x0, *, condition=None, **k: (
        seen.append(condition.labels), draw(x0, condition=condition, **k))[1])
    trainer.step(0)
    null = float((seen[0] == 4).float().mean())
    assert abs(null - 0.3) < 0.03
    assert sorted(seen[0].unique().tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.slow  # it reads blobs/cd and blobs/gcd, which the slow tests above train
def test_bad_conditioning_input_is_one_line_and_exit_2(blobs, tmp_path, capsys):
    data = blobs / "blobs.npz"
    # an unconditional run of the same data, and a conditional teacher without label dropout
    assert cli("train", "--method", "edm", "--data", data, "--steps", 2, "--out", tmp_path / "u",
               "--set", "model.num_classes=0", *TINY_TRAIN) == 0
    assert cli("train", "--method", "edm", "--data", data, "--steps", 2, "--out", tmp_path / "c", *TINY_TRAIN) == 0
    assert load_run(tmp_path / "u").num_classes == 0 and load_run(tmp_path / "c").num_classes == 4
    out = tmp_path / "s.npy"
    capsys.readouterr()
    cases = [
        (["sample", "--checkpoint", tmp_path / "c", "--n", 2, "--class", 4, "--out", out], "out of range"),
        (["sample", "--checkpoint", tmp_path / "c", "--n", 2, "--class", "cat", "--out", out], "unknown class 'cat'"),
        (["sample", "--checkpoint", tmp_path / "c", "--n", 2, "--class", "null", "--out", out], "label dropout"),
        (["sample", "--checkpoint", tmp_path / "c", "--n", 2, "--guidance", 2, "--out", out], "label-dropout"),
        (["sample", "--checkpoint", tmp_path / "u", "--n", 2, "--guidance", 2, "--out", out], "unconditional"),
        (["sample", "--checkpoint", tmp_path / "u", "--n", 2, "--class", 1, "--out", out], "unconditional"),
        (["sample", "--checkpoint", blobs / "cd", "--n", 2, "--guidance", 2, "--out", out], "not distilled"),
        (["sample", "--checkpoint", blobs / "gcd", "--n", 2, "--guidance", 9, "--out", out], "distilled for"),
        (["train", "--method", "cd", "--teacher", tmp_path / "c", "--data", data, "--guidance", "1,3",
          "--out", tmp_path / "x1", *TINY_TRAIN], "label-dropout"),
        (["train", "--method", "ct", "--data", data, "--guidance", "1,3", "--out", tmp_path / "x2"], "only for"),
        (["train", "--method", "edm", "--data", "moons", "--label-dropout", 0.1, "--out", tmp_path / "x3"],
         "unconditional"),
        (["train", "--method", "edm", "--data", data, "--set", "model.num_classes=3", "--out", tmp_path / "x4"],
         "only 3 classes"),
        (["train", "--method", "edm", "--data", data, "--label-dropout", 1.5, "--out", tmp_path / "x5"], "[0, 1)"),
        (["train", "--method", "cd", "--teacher", blobs / "oedm", "--data", "moons", "--out", tmp_path / "x6"],
         "no labels"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (argv, err)
    assert not out.exists()


@pytest.mark.parametrize("method", ["cd", "scd"])
def test_guided_distillation_steps_the_guided_teachers_ode(method):
    """With the range [2, 2], a guided objective's loss equals the plain objective's on the teacher
    wrapped in GuidedDenoiser(w = 2), for a student whose guidance input starts at zero effect."""
    from cmkit.objectives import ConsistencyDistillationLoss, ContinuousConsistencyLoss

    noise = NoiseConfig()
    teacher = EDMDenoiser(AnalyticBackbone(noise), noise).double()
    torch.manual_seed(0)
    plain_net = EDMDenoiser(ResidualMLP(2, width=32, num_classes=4), noise).double()
    guided_net = EDMDenoiser(ResidualMLP(2, width=32, num_classes=4, guidance=True), noise).double()
    load_backbone_weights(guided_net.backbone, plain_net.backbone)
    x0 = BLOBS.sample(256, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(256) % 4

    def loss(net, teacher, guidance):
        if method == "cd":
            objective = ConsistencyDistillationLoss(teacher, noise, num_levels=18, guidance=guidance)
            return objective(net, x0, target=net, generator=torch.Generator().manual_seed(2),
                             condition=Condition(labels=labels))[0]
        objective = ContinuousConsistencyLoss(noise, teacher=teacher, tangent_warmup=0, guidance=guidance)
        return objective(net, x0, generator=torch.Generator().manual_seed(2), condition=Condition(labels=labels))[0]

    guided = loss(guided_net, teacher, [2.0, 2.0])
    expected = loss(plain_net, GuidedDenoiser(teacher, 2.0), None)
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(loss(plain_net, teacher, None), expected)  # and guidance changes it


def test_conditional_run_with_label_dropout_resumes_bit_for_bit(blobs, tmp_path):
    from helpers import TINY, tree_digest

    common = ["train", "--method", "edm", "--data", blobs / "blobs.npz", "--label-dropout", 0.3,
              "--set", "train.save_every=4", *TINY]
    assert cli(*common, "--steps", 8, "--out", tmp_path / "straight") == 0
    assert cli(*common, "--steps", 4, "--out", tmp_path / "split") == 0
    assert cli("train", "--method", "edm", "--steps", 8, "--out", tmp_path / "split", "--resume", "--quiet") == 0
    straight, split = tree_digest(tmp_path / "straight"), tree_digest(tmp_path / "split")
    straight.pop("config.json"), split.pop("config.json")
    assert straight == split
