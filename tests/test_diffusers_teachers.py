"""diffusers DDPM/DDIM folders as teachers, in EDM's sigma, against diffusers itself.

- `run.denoise` on the scheduler's own levels equals the textbook formula with the raw UNet
  (epsilon, v and sample prediction; every beta schedule), and between levels uses diffusers'
  log-sigma interpolation of the timestep (EulerDiscreteScheduler._sigma_to_t).
- diffusers' EulerDiscreteScheduler loop and its DDIM loop (eta 0) from a given x_T equal cmkit's
  Euler sampler on the same sigmas.
- CD, ECT, sCT, sCD and guided CD start from such folders; the student starts from the teacher's
  weights, resumes bit for bit, and exports to diffusers (an LCMScheduler pipeline that computes
  the student's function) and to ONNX.
- Folders cmkit cannot represent exactly are refused in one line, with nothing written.
"""

import json

import numpy as np
import pytest
import torch

import cmkit
from cmkit.condition import Condition
from cmkit.discrete_vp import STUDENT_SIGMA_MAX
from cmkit.sampling import sample_euler
from helpers import cli, tree_digest

DIGITS = ["--data", "digits", "--batch-size", "8", "--quiet", "--set", "train.sample_every=0"]


def tiny_unet(classes: int = 0, time_embedding: str = "positional"):
    from diffusers import UNet2DModel
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8, num_class_embeds=classes or None,
                       time_embedding_type=time_embedding,
                       num_train_timesteps=1000 if time_embedding == "learned" else None)


def save_ddpm(folder, unet, layout: str = "pipeline", **scheduler):
    """A DDPMPipeline folder (or a bare UNet folder with the scheduler in ../scheduler/) made by
    diffusers itself; returns the scheduler."""
    from diffusers import DDPMPipeline, DDPMScheduler
    sched = DDPMScheduler(**scheduler)
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(str(folder))
    else:
        unet.save_pretrained(str(folder / "unet"))
        sched.save_pretrained(str(folder / "scheduler"))
    return sched


def train_and_resume(method: str, teacher, tmp_path):
    """A 4-step run of ``method`` from ``teacher``, and one stopped at 2 and resumed to 4: equal
    bit for bit. Returns the first."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli("train", "--method", method, "--teacher", teacher, *DIGITS, "--steps", 4, "--out", whole) == 0
    assert cli("train", "--method", method, "--teacher", teacher, *DIGITS, "--steps", 2, "--out", split) == 0
    assert cli("train", "--resume", "--out", split, "--steps", 4, "--quiet") == 0
    digest = lambda p: {k: v for k, v in tree_digest(p).items() if "step-0000004" in k}  # noqa: E731
    assert digest(whole) == digest(split) and digest(whole)
    return whole


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An unconditional epsilon DDPM folder (linear betas, 1000 steps)."""
    folder = tmp_path_factory.mktemp("ddpm") / "teacher"
    save_ddpm(folder, tiny_unet())
    return folder


def formula(unet, sched, x_edm, t, kind):
    """D(x; sigma_t) by the textbook VP formulas, in the scheduler's own variables."""
    abar = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    z = x_edm / (1 + sigma**2).sqrt()  # the VP state sqrt(abar) x0 + sqrt(1 - abar) eps
    with torch.no_grad():
        out = unet(z.float(), t.float()).sample.double()
    a, b = abar.sqrt(), (1 - abar).sqrt()
    return {"epsilon": (z - b * out) / a, "v_prediction": a * z - b * out, "sample": out}[kind]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "trained_betas"])
def test_denoise_on_the_table_equals_the_formula(tmp_path, kind, schedule):
    unet = tiny_unet()
    extra = ({"trained_betas": np.linspace(2e-4, 0.03, 1000).tolist()} if schedule == "trained_betas"
             else {"beta_schedule": schedule})
    sched = save_ddpm(tmp_path / "m", unet, layout="unet" if schedule == "linear" else "pipeline",
                      prediction_type=kind, **extra)
    run = cmkit.load_run(tmp_path / "m" / "unet" if schedule == "linear" else tmp_path / "m")
    assert run.is_diffusion and run.shape == (1, 8, 8)
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod).sqrt()
    assert run.noise_range.sigma_min == pytest.approx(float(table[0]), rel=1e-7)
    assert run.noise_range.sigma_max == pytest.approx(float(table[-1]), rel=1e-7)
    if schedule == "sigmoid":  # diffusers' formula, transcribed (in float64: diffusers' float32 is within 1e-4)
        betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (0.02 - 0.0001) + 0.0001
        abar = torch.cumprod(1 - betas, 0)
        torch.testing.assert_close(run.model.table.sigmas, ((1 - abar) / abar).sqrt(), rtol=1e-4, atol=0)
    t = torch.tensor([0, 1, 10, 250, 500, 998, 999])
    sigma = table[t]
    x = torch.randn(len(t), 1, 8, 8, generator=torch.Generator().manual_seed(1)).double() * (1 + sigma.view(-1, 1, 1, 1))
    ours = run.denoise(x.float(), sigma).double()
    theirs = formula(unet, sched, x, t, kind)
    scale = theirs.flatten(1).abs().amax(1)
    assert ((ours - theirs).flatten(1).abs().amax(1) / scale).max() < 1e-5


def test_a_whole_table_student_of_sigmoid_betas_exports(tmp_path):
    """Only DDPMScheduler computes sigmoid betas (LCMScheduler raises): the export writes them out."""
    save_ddpm(tmp_path / "t", tiny_unet(), beta_schedule="sigmoid")
    assert cli("train", "--method", "lcm", "--teacher", tmp_path / "t", *DIGITS, "--steps", 2, "--out", tmp_path / "lcm") == 0
    assert cli("export", "diffusers", "--checkpoint", tmp_path / "lcm", "--out", tmp_path / "pipe", "--quiet") == 0
    run, back = cmkit.load_run(tmp_path / "lcm"), cmkit.load_run(tmp_path / "pipe")
    assert len(run.model.table.sigmas) == 1000 and torch.equal(back.model.table.sigmas, run.model.table.sigmas)


def test_time_input_between_levels_is_diffusers_interpolation(teacher):
    """Fractional t: EulerDiscreteScheduler._sigma_to_t; learned embeddings: the nearest index,
    and sampler grids rounded onto the table (EDM's round_sigma)."""
    from diffusers import EulerDiscreteScheduler
    run = cmkit.load_run(teacher)
    euler = EulerDiscreteScheduler.from_pretrained(str(teacher), subfolder="scheduler")
    table = ((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5
    sigma = np.geomspace(float(table[0]) * 1.001, float(table[-1]) * 0.999, 37)
    theirs = euler._sigma_to_t(sigma, np.log(table.numpy().astype(np.float64)))
    ours = run.model.c_noise(torch.tensor(sigma, dtype=torch.float64))
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-6)
    learned = teacher.parent / "learned"
    save_ddpm(learned, tiny_unet(time_embedding="learned"))
    run = cmkit.load_run(learned)
    ours = run.model.c_noise(torch.tensor(sigma, dtype=torch.float32))
    nearest = np.abs(np.log(sigma)[:, None] - np.log(table.double().numpy())[None]).argmin(1)
    np.testing.assert_array_equal(ours.numpy(), nearest)
    levels = run.sigmas_for(steps=18)
    on_table = levels[:-1, None].double().sub(table.double()[None]).abs().amin(1)
    assert levels[-1] == 0 and float(on_table.max()) < 1e-6 * float(levels[0])


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_diffusers_euler_and_ddim_loops_equal_cmkit_euler(tmp_path, prediction):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler
    unet = tiny_unet()
    save_ddpm(tmp_path / "m", unet, prediction_type=prediction)
    run = cmkit.load_run(tmp_path / "m")
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    # Euler: 10 steps on the scheduler's integer timesteps (900, 800, ..., 0: "leading" spacing).
    euler = EulerDiscreteScheduler.from_pretrained(str(tmp_path / "m"), subfolder="scheduler")
    euler.set_timesteps(10)
    x = x_T * euler.init_noise_sigma
    with torch.no_grad():
        for t in euler.timesteps:
            out = unet(euler.scale_model_input(x, t), t).sample
            x = euler.step(out, t, x).prev_sample
    ours = sample_euler(run.model, x_T * euler.init_noise_sigma, euler.sigmas.float())
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    # DDIM (eta 0): each step is an Euler step in sigma; the grid ends at alpha-bar 1 (sigma 0).
    ddim = DDIMScheduler.from_pretrained(str(tmp_path / "m"), subfolder="scheduler", clip_sample=False)
    ddim.set_timesteps(10)
    z = x_T.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            z = ddim.step(unet(z, t).sample, t, z, eta=0.0).prev_sample
    abar = ddim.alphas_cumprod[ddim.timesteps]
    sigmas = torch.cat([((1 - abar) / abar).sqrt(), torch.zeros(1)])
    ours = sample_euler(run.model, x_T * (1 + sigmas[0] ** 2).sqrt(), sigmas.float())
    torch.testing.assert_close(ours, z, rtol=1e-5, atol=1e-5)


def test_cd_from_a_ddpm_folder_trains_resumes_samples_and_exports(tmp_path, teacher):
    from diffusers import DDPMPipeline
    from cmkit.training import Trainer
    from cmkit.config import build_config
    # The student starts from the teacher's weights.
    trainer = Trainer(build_config("cd", teacher=str(teacher), **{"data.name": "digits"}))
    ref = cmkit.load_run(teacher).model.backbone.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in trainer.net.backbone.state_dict().items())
    # Consistency boundary at the table's first level: f(x, sigma_0) = x.
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(trainer.net(x, trainer.net.table.sigma_min), x, rtol=0, atol=0)
    # Trains, and resumes bit for bit.
    whole = train_and_resume("cd", teacher, tmp_path)
    # Samples, and exports: diffusers' LCMScheduler computes the student's f at its timesteps.
    assert cli("sample", "--checkpoint", whole, "--n", 4, "--steps", 2, "--out", tmp_path / "s.png", "--quiet") == 0
    assert cli("export", "diffusers", "--checkpoint", whole, "--out", tmp_path / "pipe", "--quiet") == 0
    run, back = cmkit.load_run(whole), cmkit.load_run(tmp_path / "pipe")
    assert back.method == "cd" and not back.is_diffusion and back.noise_range == run.noise_range
    # The student's range stops at STUDENT_SIGMA_MAX; so do the pipeline's levels.
    top = STUDENT_SIGMA_MAX
    assert run.noise_range.sigma_max == top < cmkit.load_run(teacher).noise_range.sigma_max
    x = torch.randn(2, 1, 8, 8) * top
    torch.testing.assert_close(back.denoise(x, top), run.denoise(x, top), rtol=1e-5, atol=1e-5 * top)
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    sched, z = pipe.scheduler, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sched.set_timesteps(4)
    abar_top = sched.alphas_cumprod[sched.timesteps[0]]
    assert ((1 - abar_top) / abar_top).sqrt() <= STUDENT_SIGMA_MAX
    for t in sched.timesteps:
        abar = sched.alphas_cumprod[t]
        sigma = ((1 - abar) / abar).sqrt()
        with torch.no_grad():
            theirs = sched.step(pipe.unet(z, t).sample, t, z).denoised
        sched._step_index = None  # each timestep on its own
        x = z * (1 + sigma**2).sqrt()  # the EDM point whose VP state is z
        for ours in (run.denoise(x, sigma), back.denoise(x, sigma)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))
    assert cli("export", "onnx", "--checkpoint", whole, "--out", tmp_path / "cd.onnx", "--quiet") == 0


@pytest.mark.parametrize("method, flag", [("ect", "--init"), ("sct", "--init"), ("scd", "--teacher")])
def test_modern_methods_start_from_a_ddpm_folder(tmp_path, teacher, method, flag):
    out = tmp_path / method
    assert cli("train", "--method", method, flag, teacher, *DIGITS, "--steps", 2, "--out", out) == 0
    samples = cmkit.load_run(out).sample(4, steps=2, seed=0)
    assert samples.shape == (4, 1, 8, 8) and samples.dtype == np.uint8


def test_a_class_conditional_unet_distills_with_guidance(tmp_path):
    folder = tmp_path / "cond"
    save_ddpm(folder, tiny_unet(classes=11), beta_schedule="squaredcos_cap_v2")
    (folder / "cmkit.json").write_text(json.dumps({"num_classes": 10, "has_null_label": True}))
    teacher = cmkit.load_run(folder)
    assert teacher.num_classes == 10 and teacher.has_null_label
    assert cli("sample", "--checkpoint", folder, "--n", 3, "--steps", 3, "--class", 4, "--guidance", 2,
               "--out", tmp_path / "t.npz", "--quiet") == 0
    out = tmp_path / "gcd"
    assert cli("train", "--method", "cd", "--teacher", folder, *DIGITS, "--guidance", "1,3", "--steps", 2,
               "--out", out) == 0
    student = cmkit.load_run(out)
    assert student.guidance_range == (1.0, 3.0)
    # At initialisation the guidance input adds nothing (zero last layer), so the guided student
    # is its teacher's network at every scale: check on a fresh student before training moves it.
    from cmkit.config import build_config
    from cmkit.training import Trainer
    fresh = Trainer(build_config("cd", teacher=str(folder), **{"data.name": "digits", "objective.guidance": [1, 3]}))
    x, sigma, labels = torch.randn(2, 1, 8, 8) * 5, torch.tensor([5.0, 5.0]), torch.tensor([1, 2])
    with torch.no_grad():
        a = fresh.net(x, sigma, Condition(labels=labels, guidance=torch.tensor([1.0, 3.0])))
        b = fresh.net(x, sigma, Condition(labels=labels, guidance=torch.tensor([2.0, 2.0])))
    torch.testing.assert_close(a, b)
    images = student.sample(4, class_labels="3", guidance=2.0, seed=0)
    assert images.shape == (4, 1, 8, 8)


def test_the_teacher_is_a_run_sample_eval_edit(tmp_path, teacher):
    assert cli("sample", "--checkpoint", teacher, "--n", 4, "--steps", 3, "--out", tmp_path / "s.npz", "--quiet") == 0
    assert cli("eval", "--checkpoint", teacher, "--data", "digits", "--steps", 2, "--n", 50,
               "--out", tmp_path / "e.json", "--quiet") == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["method"] == "edm" and np.isfinite(result["results"][0]["fd"])
    assert cli("edit", "inpaint", "--checkpoint", teacher, "--input", tmp_path / "s.npz", "--box", "2,2,4,4",
               "--out", tmp_path / "e.png", "--quiet") == 0
    assert (tmp_path / "e.png").is_file()


def _error(capsys, *args) -> str:
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cmkit: error: "), err
    return err[0]


def test_refusals_are_one_line_and_write_nothing(tmp_path, capsys):
    def folder(name, **scheduler):
        path = tmp_path / name
        save_ddpm(path, tiny_unet())
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **scheduler}))
        return path

    out = tmp_path / "out"
    pickled = folder("pkl")
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert "safe_serialization=True" in _error(capsys, "sample", "--checkpoint", pickled, "--n", 2,
                                               "--out", tmp_path / "s.npy")
    assert "unknown scheduler 'FooScheduler'" in _error(
        capsys, "train", "--method", "cd", "--teacher", folder("foo", _class_name="FooScheduler"), *DIGITS,
        "--out", out)
    assert "prediction_type 'x0'" in _error(capsys, "train", "--method", "ect", "--init",
                                            folder("pred", prediction_type="x0"), *DIGITS, "--out", out)
    assert "beta_schedule 'cubic'" in _error(capsys, "sample", "--checkpoint", folder("beta", beta_schedule="cubic"),
                                             "--n", 2, "--out", tmp_path / "s.npy")
    assert "VE" in _error(capsys, "sample", "--checkpoint", folder("ve", _class_name="ScoreSdeVeScheduler"),
                          "--n", 2, "--out", tmp_path / "s.npy")
    good = folder("good")
    unscheduled = folder("nosched")
    (unscheduled / "scheduler" / "scheduler_config.json").unlink()
    assert "no scheduler" in _error(capsys, "sample", "--checkpoint", unscheduled, "--n", 2,
                                    "--out", tmp_path / "s.npy")
    # Data of another size or channel count than the UNet's.
    assert "shape" in _error(capsys, "train", "--method", "cd", "--teacher", good, *DIGITS,
                             "--set", "data.resolution=16", "--out", out)
    learned = tmp_path / "learned"
    save_ddpm(learned, tiny_unet(time_embedding="learned"))
    assert "learned table" in _error(capsys, "train", "--method", "sct", "--init", learned, *DIGITS, "--out", out)
    assert not out.exists() and not (tmp_path / "s.npy").exists()
    from cmkit.errors import CmkitError
    with pytest.raises(CmkitError, match="noise range"):
        cmkit.load_run(good).denoise(torch.zeros(1, 1, 8, 8), 1e4)
