"""`--method lcm` against a plain transcription of LCM as diffusers' reference script
(examples/consistency_distillation/train_lcm_distill_sd_wds.py) computes it, on tiny DDPM teachers
built here: the skipping grid, add_noise, the guided teacher's DDIM step, the boundary scalings,
the target at t - k, the loss and its gradients; then a run that trains, resumes, exports as an
LCMScheduler pipeline and samples as diffusers does."""

import json

import numpy as np
import pytest
import torch

import cmkit
from cmkit.condition import Condition
from cmkit.config import build_config
from cmkit.discrete_vp import lcm_timesteps, skipping_grid
from cmkit.training import Trainer
from helpers import cli
from test_diffusers_teachers import DIGITS, save_ddpm, tiny_unet, train_and_resume


# ------------------------------------------------------------------ the reference, transcribed


def ref_scalings(timestep, sigma_data=0.5, timestep_scaling=10.0):
    scaled = timestep_scaling * timestep
    return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / (scaled**2 + sigma_data**2) ** 0.5


def ref_x0(output, timesteps, sample, prediction_type, alphas, sigmas):
    if prediction_type == "epsilon":
        return (sample - sigmas[timesteps] * output) / alphas[timesteps]
    return alphas[timesteps] * sample - sigmas[timesteps] * output  # v_prediction


def ref_eps(output, timesteps, sample, prediction_type, alphas, sigmas):
    if prediction_type == "epsilon":
        return output
    return alphas[timesteps] * output + sigmas[timesteps] * sample


def expand(v):
    return v[:, None, None, None]


def reference_lcm_loss(student, target, teacher, scheduler, x0, noise, index, w, labels, null, prediction_type,
                       loss_type="l2", huber_c=0.001, num_ddim_timesteps=50, parts=None):
    """The reference's training step, in its own terms (VP states x_t, integer timesteps).
    ``parts``: a dict to receive its intermediate values (the student's output, the teacher's DDIM
    step and the target), for `assert_parts_equal_reference`."""
    T = scheduler.config.num_train_timesteps
    k = T // num_ddim_timesteps
    ddim_timesteps = torch.from_numpy((np.arange(1, num_ddim_timesteps + 1) * k).round().astype(np.int64) - 1)
    alphas = scheduler.alphas_cumprod.sqrt()
    sigmas = (1 - scheduler.alphas_cumprod).sqrt()
    start = ddim_timesteps[index]
    timesteps = (start - k).clamp(min=0)
    c_skip_start, c_out_start = (expand(c) for c in ref_scalings(start))
    c_skip, c_out = (expand(c) for c in ref_scalings(timesteps))
    noisy = scheduler.add_noise(x0, noise, start)
    alphas4, sigmas4 = alphas[:, None, None, None], sigmas[:, None, None, None]
    pred = student(noisy, start, labels, w)
    model_pred = c_skip_start * noisy + c_out_start * ref_x0(pred, start, noisy, prediction_type, alphas4, sigmas4)
    with torch.no_grad():
        cond = teacher(noisy, start, labels)
        cond_x0 = ref_x0(cond, start, noisy, prediction_type, alphas4, sigmas4)
        cond_eps = ref_eps(cond, start, noisy, prediction_type, alphas4, sigmas4)
        uncond = teacher(noisy, start, null)
        uncond_x0 = ref_x0(uncond, start, noisy, prediction_type, alphas4, sigmas4)
        uncond_eps = ref_eps(uncond, start, noisy, prediction_type, alphas4, sigmas4)
        x0_w = cond_x0 + expand(w) * (cond_x0 - uncond_x0)
        eps_w = cond_eps + expand(w) * (cond_eps - uncond_eps)
        x_prev = alphas4[timesteps] * x0_w + sigmas4[timesteps] * eps_w  # DDIMSolver.ddim_step
        target_out = target(x_prev, timesteps, labels, w)
        target_x0 = ref_x0(target_out, timesteps, x_prev, prediction_type, alphas4, sigmas4)
        goal = c_skip * x_prev + c_out * target_x0
    if parts is not None:  # x_prev in EDM's units: the VP state over sqrt(abar_t)
        parts.update(student=model_pred.detach(), x_lo=x_prev / alphas4[timesteps], target=goal)
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(model_pred.float(), goal.float(), reduction="mean")
    return torch.mean(torch.sqrt((model_pred.float() - goal.float()) ** 2 + huber_c**2) - huber_c)


def assert_equals_reference(ours, ours_grads, reference, reference_grads) -> None:
    """cmkit's loss and gradients against the reference's, on identical inputs (neither zero)."""
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    # All gradients as one vector: float32 rounding through the UNet, either way round, is ~1e-5 of
    # the largest (and all there is in the gradients of biases that a GroupNorm cancels).
    ours_grads, reference_grads = (torch.cat([g.flatten() for g in gs]) for gs in (ours_grads, reference_grads))
    torch.testing.assert_close(ours_grads, reference_grads, rtol=1e-4, atol=1e-4 * float(reference_grads.abs().max()))
    assert ours > 0 and float(ours_grads.abs().sum()) > 0


def assert_parts_equal_reference(objective, net, target, x0, draws, condition, parts) -> None:
    """cmkit's student output f(x_hi, sigma_hi), teacher step x_lo and target f-(x_lo, sigma_lo) against
    the reference's. The loss alone can miss a wrong parametrization: CD's boundary form (c_skip on
    x rather than on the VP state) moves the target at t = 0 by sigma_0^2 / 2 of x (4e-4 on Stable
    Diffusion's table, 5e-5 on linear betas), where float32 rounding is ~1e-6 of (1 + sigma)."""
    scales = draws.get("guidance")
    seen = condition.replace(guidance=scales if objective.student_sees_guidance else None)
    sigma_hi, sigma_lo = draws["sigma_hi"], draws["sigma_lo"]
    x_hi = x0 + expand(sigma_hi) * draws["z"]
    with torch.no_grad():
        x_lo = objective.lower(x_hi, x0, draws["z"], sigma_hi, sigma_lo, condition, scales)
        ours = {"student": (net(x_hi, sigma_hi, seen), sigma_hi), "x_lo": (x_lo, sigma_lo),
                "target": ((target or net)(x_lo, sigma_lo, seen), sigma_lo)}
    for name, (value, sigma) in ours.items():
        scale = expand(1 + sigma)  # rounding grows with the level: x_sigma, and sigma eps in x0 = x - sigma eps
        torch.testing.assert_close(value / scale, parts[name] / scale, rtol=0, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------ cmkit against it


def guided_teacher(folder, prediction_type):
    save_ddpm(folder, tiny_unet(classes=11), prediction_type=prediction_type)
    (folder / "cmkit.json").write_text(json.dumps({"num_classes": 10, "has_null_label": True}))
    return folder


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("prediction_type, loss_type", [
    ("epsilon", "l2"), pytest.param("v_prediction", "elementwise_huber", marks=pytest.mark.slow)])
def test_lcm_loss_and_gradients_equal_the_reference(tmp_path, prediction_type, loss_type):
    from diffusers import DDPMScheduler
    folder = guided_teacher(tmp_path / "teacher", prediction_type)
    trainer = Trainer(build_config("lcm", teacher=str(folder), **{
        "data.name": "digits", "objective.guidance": [2.0, 8.0], "objective.distance": loss_type}))
    net, target, objective = trainer.net, trainer.target, trainer.objective
    teacher = objective.teacher
    _perturb(net, 1)  # three different networks, as after some training
    _perturb(target, 2)
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    B = 6
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(B, 1, 8, 8, generator=g).clamp(-1, 1), torch.randn(B, 1, 8, 8, generator=g)
    index = torch.tensor([0, 1, 7, 25, 48, 49])  # includes t_n = 0 (the clamp) and the top, 999
    w = torch.tensor([1.0, 5.0, 2.5, 7.0, 4.0, 3.0])  # the paper's w; cmkit's scale is w + 1
    labels, null = torch.tensor([1, 2, 3, 4, 5, 9]), torch.full((B,), 10)
    starts, k = skipping_grid(1000, 50)
    assert k == 20 and starts[0] == 19 and starts[-1] == 999
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    draws = {"sigma_hi": sigmas[starts[index]], "sigma_lo": sigmas[(starts[index] - k).clamp(min=0)], "z": noise,
             "guidance": w + 1}
    ours = objective.loss(net, x0, draws, target=target, condition=Condition(labels=labels))[0].mean()
    ours_grads = torch.autograd.grad(ours, list(net.parameters()))

    def unet(module):  # the raw network, as the reference calls its UNets: (x_t, t, labels, w)
        return lambda x_t, t, y, w=None: module.backbone(x_t, t.float(), Condition(
            labels=y, guidance=None if w is None else w + 1))

    parts = {}
    reference = reference_lcm_loss(unet(net), unet(target), unet(teacher), scheduler, x0, noise, index, w, labels,
                                   null, prediction_type, loss_type, parts=parts)
    reference_grads = torch.autograd.grad(reference, list(net.parameters()))
    assert_equals_reference(ours, ours_grads, reference, reference_grads)
    assert_parts_equal_reference(objective, net, target, x0, draws, Condition(labels=labels), parts)


def test_lcm_draws_its_pairs_from_the_skipping_grid(tmp_path):
    folder = tmp_path / "teacher"
    save_ddpm(folder, tiny_unet())
    trainer = Trainer(build_config("lcm", teacher=str(folder), **{"data.name": "digits"}))
    table = trainer.objective.teacher.table.sigmas.float()
    draws = trainer.objective.draw(torch.zeros(4000, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    hi = (draws["sigma_hi"][:, None] == table).float().argmax(1)
    lo = (draws["sigma_lo"][:, None] == table).float().argmax(1)
    assert set(hi.tolist()) == set(range(19, 1000, 20))  # every start, nothing else
    assert torch.equal(lo, (hi - 20).clamp(min=0))
    # The student covers the teacher's whole table (its grid reaches t = 999), as published.
    assert trainer.config["noise"]["sigma_max"] == pytest.approx(float(table[-1]), rel=1e-6)


def test_lcm_refuses_a_cmkit_edm_teacher(tmp_path, capsys):
    assert cli("train", "--method", "edm", *DIGITS, "--set", "model.preset=tiny", "--steps", 1,
               "--out", tmp_path / "edm") == 0
    assert cli("train", "--method", "lcm", "--teacher", tmp_path / "edm", *DIGITS, "--steps", 1,
               "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "lcm distils a discrete-time teacher" in err and len(err.strip().splitlines()) == 1


def test_lcm_schedules_are_lcm_schedulers():
    from diffusers import LCMScheduler
    scheduler = LCMScheduler(num_train_timesteps=1000)
    for steps in (1, 2, 3, 4, 8, 50):
        scheduler.set_timesteps(steps)
        assert lcm_timesteps(1000, steps).tolist() == scheduler.timesteps.tolist(), steps
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]


@pytest.mark.slow
def test_an_lcm_run_resumes_exports_and_samples_as_the_lcm_pipeline_does(tmp_path):
    from diffusers import DDPMPipeline, LCMScheduler
    folder = tmp_path / "teacher"
    save_ddpm(folder, tiny_unet(), prediction_type="v_prediction")
    whole = train_and_resume("lcm", folder, tmp_path)
    assert cli("export", "diffusers", "--checkpoint", whole, "--out", tmp_path / "pipe", "--quiet") == 0
    pipe = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.num_train_timesteps == 1000
    for steps in (1, 4):
        # `cmkit sample` and the pipeline, from the same seed: one generator draws the start and each
        # re-noising in both (cmkit re-noises by sqrt(s^2 - sigma_0^2), the scheduler by s: 1e-4 apart).
        out = tmp_path / f"s{steps}.npy"
        assert cli("sample", "--checkpoint", whole, "--n", 3, "--steps", steps, "--seed", 5, "--out", out,
                   "--quiet") == 0
        ours = np.load(out).astype(int)[..., 0]
        theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=steps,
                      output_type="np").images[..., 0]
        assert np.abs(ours - np.round(theirs * 255)).max() <= 2, steps
    run, back = cmkit.load_run(whole), cmkit.load_run(tmp_path / "pipe")
    assert back.method == "lcm" and back.noise_range == run.noise_range
    assert torch.equal(run.sigmas_for(4), back.sigmas_for(4))


def test_the_transcription_catches_cds_boundary_form_in_place_of_lcms(tmp_path, monkeypatch):
    """The comparison above fails for a student with c_skip on x instead of the VP state."""
    from cmkit.precond import LCMFunction
    monkeypatch.setattr(LCMFunction, "skip_on_vp_state", False)
    with pytest.raises(AssertionError, match="target"):
        test_lcm_loss_and_gradients_equal_the_reference(tmp_path, "epsilon", "l2")
