"""Text-conditioned latent pipelines against diffusers itself, with tiny components built here.

- A StableDiffusionPipeline folder is a teacher: its prompt embeddings are the pipeline's
  ``encode_prompt`` (the empty prompt the unconditional one), and its guided denoiser on the
  scheduler's levels is the textbook formula with the raw UNet.
- ``--method lcm`` on a latent data set: loss and gradients equal a transcription of diffusers'
  reference script (train_lcm_distill_sd_wds.py) on identical inputs, epsilon and v-prediction.
- The run resumes bit for bit, exports a LatentConsistencyModelPipeline that samples what
  ``cmkit sample --prompt`` does from the same seed, and loads back as the same model.
- Latent caches: never re-encoded by training, refused when their source changed; hostile
  captions and folders are refused in one line with nothing written.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import cmkit
from cmkit.condition import Condition
from cmkit.config import build_config
from cmkit.discrete_vp import skipping_grid
from cmkit.training import Trainer
from helpers import cli, refused, tree_digest
from test_lcm import (_perturb, assert_equals_reference, assert_parts_equal_reference, expand, ref_eps, ref_x0,
                      reference_lcm_loss)
from tiny_sd import captioned_folder, save_sd

PROMPT = "a photo of a digit two"
FAST = ["--batch-size", "4", "--quiet", "--set", "train.sample_every=0"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(a StableDiffusionPipeline folder, a latent data set of captioned digits encoded by it)."""
    root = tmp_path_factory.mktemp("sd")
    folder = save_sd(root / "sd")
    images = captioned_folder(root / "images")
    assert cli("data", "encode", images, "--pipeline", folder, "--out", root / "latents") == 0
    return folder, root / "latents"


def train_and_resume(args, tmp_path):
    """(a 4-step run of ``args``, one stopped at 2 and resumed to 4), their checkpoints equal bit for bit."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert cli("train", *args, "--steps", 4, "--out", whole) == 0
    assert cli("train", *args, "--steps", 2, "--out", split) == 0
    assert cli("train", "--resume", "--out", split, "--steps", 4, "--quiet") == 0
    digest = lambda p: {k: v for k, v in tree_digest(p).items() if "step-0000004" in k}  # noqa: E731
    assert digest(whole) == digest(split) and digest(whole)
    return whole, split


def cache_tensors(path) -> dict:
    """Everything a latent cache holds as tensors: its latents and held-out images, and its tables."""
    from safetensors.torch import load_file
    from cmkit.data import load_latent_cache
    data = load_latent_cache(path, stream="never")
    return {"train": data.train, "holdout": data.holdout[:], "holdout_images": data.holdout_images[:],
            **load_file(str(path / "tables.safetensors"))}


def ref_guidance_embedding(w, embedding_dim=512):
    """guidance_scale_embedding of the reference script (VDM's sinusoidal embedding of 1000 w)."""
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -emb)
    emb = w.float()[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def test_the_guidance_embedding_is_the_pipelines():
    from diffusers import LatentConsistencyModelPipeline
    from cmkit.nets.diffusers_text_unet import guidance_embedding
    w = torch.tensor([0.0, 1.0, 3.5, 7.0])
    ours = guidance_embedding(w, 256)
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(ours, theirs.float())
    torch.testing.assert_close(ours, ref_guidance_embedding(w, 256))


def test_a_stable_diffusion_folder_is_a_guided_teacher(sd):
    from diffusers import StableDiffusionPipeline
    folder, _ = sd
    run = cmkit.load_run(folder)
    assert run.is_diffusion and run.takes_text and run.shape == (4, 4, 4) and run.image_shape == (1, 8, 8)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder))
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=None)
    text = run.text_condition(PROMPT, 2).text
    torch.testing.assert_close(text, cond.expand(2, -1, -1))
    torch.testing.assert_close(run.model.backbone.null_text, uncond)
    # The guided denoiser on a table level is the formula with the raw UNet (epsilon prediction).
    abar = pipe.scheduler.alphas_cumprod
    t = torch.tensor([10, 500])
    sigma = ((1 - abar[t]) / abar[t]).sqrt()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigma[:, None, None, None]
    w = 3.0
    ours = run.network(guidance=w)(x, sigma, Condition(text=text))
    vp = x / (1 + sigma**2).sqrt()[:, None, None, None]
    eps_c = pipe.unet(vp, t, encoder_hidden_states=text).sample
    eps_u = pipe.unet(vp, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    eps = eps_u + w * (eps_c - eps_u)
    theirs = (vp - expand((1 - abar[t]).sqrt()) * eps) / expand(abar[t].sqrt())
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prediction_type, loss_type", [
    ("epsilon", "l2"), pytest.param("v_prediction", "elementwise_huber", marks=pytest.mark.slow)])
def test_lcm_on_prompts_equals_the_reference(tmp_path, sd, prediction_type, loss_type):
    from diffusers import DDPMScheduler
    _, latents = sd
    folder = save_sd(tmp_path / "teacher", prediction_type=prediction_type)
    if prediction_type != "epsilon":  # a latent set must come from the teacher's own VAE: re-encode
        latents = tmp_path / "latents"
        assert cli("data", "encode", captioned_folder(tmp_path / "images"), "--pipeline", folder, "--out",
                   latents) == 0
    trainer = Trainer(build_config("lcm", teacher=str(folder), **{
        "data.name": str(latents), "objective.guidance": [2.0, 8.0], "objective.distance": loss_type}))
    net, target, teacher = trainer.net, trainer.target, trainer.objective.teacher
    _perturb(net, 1)  # the w projection (zero at the start) moves too
    _perturb(target, 2)
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    B = 5
    g = torch.Generator().manual_seed(0)
    x0, noise = trainer.x_train[:B], torch.randn(B, 4, 4, 4, generator=g)
    text = trainer.text_table[trainer.text_ids[:B]]
    null = trainer.null_text.expand(B, -1, -1)
    index = torch.tensor([0, 1, 20, 48, 49])
    w = torch.tensor([1.0, 5.0, 2.5, 7.0, 4.0])  # LCM's w; cmkit's scale is w + 1
    starts, k = skipping_grid(1000, 50)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    draws = {"sigma_hi": sigmas[starts[index]], "sigma_lo": sigmas[(starts[index] - k).clamp(min=0)], "z": noise,
             "guidance": w + 1}
    ours = trainer.objective.loss(net, x0, draws, target=target, condition=Condition(text=text))[0].mean()
    ours_grads = torch.autograd.grad(ours, list(net.parameters()))

    def unet(module):  # the raw UNet2DConditionModel, as the reference calls it
        def call(x_t, t, prompt_embeds, w=None):
            cond = None if w is None else ref_guidance_embedding(w, 256)
            return module.backbone.unet(x_t, t, encoder_hidden_states=prompt_embeds, timestep_cond=cond).sample
        return call

    parts = {}
    reference = reference_lcm_loss(unet(net), unet(target), unet(teacher), scheduler, x0, noise, index, w, text,
                                   null, prediction_type, loss_type, parts=parts)
    reference_grads = torch.autograd.grad(reference, list(net.parameters()))
    assert_equals_reference(ours, ours_grads, reference, reference_grads)
    assert_parts_equal_reference(trainer.objective, net, target, x0, draws, Condition(text=text), parts)


def test_ref_x0_and_eps_are_consistent():  # the transcription's own helpers agree with each other
    alphas, sigmas = torch.tensor([0.8]), torch.tensor([0.6])
    x0, eps = torch.randn(1, 4), torch.randn(1, 4)
    x_t = alphas * x0 + sigmas * eps
    torch.testing.assert_close(ref_x0(eps, 0, x_t, "epsilon", alphas, sigmas), x0)
    v = alphas * eps - sigmas * x0
    torch.testing.assert_close(ref_eps(v, 0, x_t, "v_prediction", alphas, sigmas), eps)


def assert_samples_as_cmkit_does(pipe, run, tmp_path, guidance: float | None = None) -> None:
    """``pipe`` samples what `cmkit sample` does from the same seed, at 1 and 4 steps, within 2/255."""
    scale = [] if guidance is None else ["--guidance", guidance]
    for steps in (1, 4):
        out = tmp_path / f"s{steps}.npy"
        assert cli("sample", "--checkpoint", run, "--n", 3, "--steps", steps, "--prompt", PROMPT, *scale,
                   "--seed", 7, "--out", out, "--quiet") == 0
        ours = np.load(out).astype(int)[..., 0]
        theirs = pipe(PROMPT, num_images_per_prompt=3, num_inference_steps=steps, guidance_scale=guidance or 1.0,
                      generator=torch.Generator().manual_seed(7), output_type="np").images[..., 0]
        assert np.abs(ours - np.round(theirs * 255)).max() <= 2, steps


@pytest.mark.slow
def test_an_lcm_run_on_prompts_resumes_exports_and_samples_as_the_pipeline_does(tmp_path, sd, monkeypatch):
    from diffusers import LatentConsistencyModelPipeline
    from cmkit.latents import LatentCodec
    folder, latents = sd

    def never(*args, **kwargs):
        raise AssertionError("training encoded images: the latent cache should have been read")

    monkeypatch.setattr(LatentCodec, "encode", never)
    args = ["--method", "lcm", "--teacher", folder, "--data", latents, "--guidance", "2,8", *FAST]
    whole, split = train_and_resume(args, tmp_path)
    # In a process of its own: transformers warns once per process (torchvision missing), and not here.
    done = subprocess.run([sys.executable, "-m", "cmkit", "export", "diffusers", "--checkpoint", whole, "--out",
                           tmp_path / "pipe", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert_samples_as_cmkit_does(pipe, whole, tmp_path, guidance=5.0)
    run, back = cmkit.load_run(whole), cmkit.load_run(tmp_path / "pipe")
    assert back.method == "lcm" and back.guidance_range == run.guidance_range == (2.0, 8.0)
    x = torch.randn(2, 4, 4, 4) * 3
    cond = run.text_condition(PROMPT, 2).replace(guidance=torch.full((2,), 5.0))
    torch.testing.assert_close(run.model(x, torch.tensor(3.0), cond), back.model(x, torch.tensor(3.0), cond),
                               rtol=1e-5, atol=1e-5)


def test_a_text_teachers_student_is_guided_by_default_as_the_reference_scripts_are(tmp_path, sd, capsys):
    from cmkit.training import resolve_run_config
    folder, latents = sd
    for method, scales, takes_scale in (("lcm", [6.0, 16.0], True), ("lcm-lora", [4.0, 16.0], False)):
        config, _ = resolve_run_config(build_config(method, teacher=str(folder), **{"data.name": str(latents)}))
        assert config["objective"]["guidance"] == scales and config["model"]["guidance"] is takes_scale, method
        assert f"guided at scales in [{scales[0]:g}, {scales[1]:g}]" in capsys.readouterr().err
    # --guidance none: an unguided student, said so at the start; its saved config resumes unguided.
    assert cli("train", "--method", "lcm", "--teacher", folder, "--data", latents, "--guidance", "none",
               "--steps", 1, "--out", tmp_path / "run", "--batch-size", 4, "--set", "train.sample_every=0") == 0
    assert "student is unguided" in capsys.readouterr().err
    run = cmkit.load_run(tmp_path / "run")
    assert run.guidance_range is None and not run.model.backbone.guidance_input
    assert resolve_run_config(run.config, resumed=True)[0]["objective"]["guidance"] is None


@pytest.mark.slow
def test_an_unguided_lcm_student_exports_as_a_pipeline_that_runs_it(tmp_path, sd, capsys):
    """LatentConsistencyModelPipeline needs the UNet's guidance input: an unguided student exports as
    a StableDiffusionPipeline with an LCMScheduler, which samples what cmkit does at scale 1."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    folder, latents = sd
    assert cli("train", "--method", "lcm", "--teacher", folder, "--data", latents, "--guidance", "none",
               "--steps", 4, "--out", tmp_path / "run", *FAST, "--set", "train.lr=0.01") == 0
    capsys.readouterr()
    assert cli("export", "diffusers", "--checkpoint", tmp_path / "run", "--out", tmp_path / "pipe") == 0
    assert "wrote a StableDiffusionPipeline (scheduler: LCMScheduler)" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert_samples_as_cmkit_does(pipe, tmp_path / "run", tmp_path)
    back = cmkit.load_run(tmp_path / "pipe")
    assert back.method == "lcm" and back.guidance_range is None


def test_encode_prints_progress_lines_where_stderr_is_not_a_terminal(tmp_path, sd, capsys, monkeypatch):
    """A log file (a pipe, a test's capture) gets a line every PROGRESS_LINE_SECONDS (here each
    batch) in place of a bar, which is shown on terminals only."""
    import re
    import cmkit.latents
    folder, _ = sd
    monkeypatch.setattr(cmkit.latents, "PROGRESS_LINE_SECONDS", 0.0)
    capsys.readouterr()
    assert cli("data", "encode", captioned_folder(tmp_path / "images"), "--vae", folder / "vae", "--batch-size", 8,
               "--out", tmp_path / "latents") == 0
    lines = [re.fullmatch(r"encode: (\d)/5 batches, \d+ s", line) for line in capsys.readouterr().err.splitlines()]
    assert all(lines) and [int(m.group(1)) for m in lines] == [1, 2, 3, 4, 5], lines  # 36 training images


def test_captions_from_metadata_and_txt_files_agree(tmp_path, sd):
    folder, latents = sd
    other = tmp_path / "jsonl"
    assert cli("data", "encode", captioned_folder(tmp_path / "images", layout="jsonl"), "--pipeline", folder,
               "--out", other) == 0
    a, b = (json.loads((p / "latents.json").read_text()) for p in (latents, other))
    assert a["captions"] == b["captions"] == [f"a photo of a digit {n}" for n in ("one", "three", "two", "zero")]
    ta, tb = cache_tensors(latents), cache_tensors(other)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_a_changed_source_is_refused(tmp_path, sd, capsys):
    folder, _ = sd
    images = captioned_folder(tmp_path / "images")
    assert cli("data", "encode", images, "--pipeline", folder, "--out", tmp_path / "latents") == 0
    (images / "99999.png").write_bytes((images / "00000.png").read_bytes())
    (images / "99999.txt").write_text("a photo of a digit zero")
    capsys.readouterr()
    assert cli("train", "--method", "lcm", "--teacher", folder, "--data", tmp_path / "latents", "--steps", 1,
               "--out", tmp_path / "run", *FAST) == 2
    err = capsys.readouterr().err.strip()
    assert "changed since this latent cache was encoded" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_sharded_cache_streams_into_training_bit_for_bit(tmp_path, sd, capsys, monkeypatch):
    """Latents in many small shards, streamed from them by a worker process reading rows ahead:
    the run is bit for bit the one that reads them into memory, and resumes bit for bit; a shard
    whose bytes changed since, or a cache of an older format, is refused in one line."""
    from cmkit.data.row_shards import ShardedRows
    folder, whole_cache = sd
    sharded = tmp_path / "sharded"
    assert cli("data", "encode", captioned_folder(tmp_path / "images"), "--pipeline", folder, "--out", sharded,
               "--shard-mb", 0.001) == 0  # 4 rows of 4x4x4 float32 latents per shard
    meta = json.loads((sharded / "latents.json").read_text())
    assert [s["rows"] for s in meta["train_shards"]] == [4] * 9 and len(meta["holdout_shards"]) == 2
    ta, tb = cache_tensors(sharded), cache_tensors(whole_cache)  # the same images: the same cache
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    args = ["--method", "lcm", "--teacher", folder, "--data", sharded, *FAST]
    (tmp_path / "streamed").mkdir()
    with monkeypatch.context() as m:
        m.setattr(ShardedRows, "materialize", lambda self: pytest.fail("the streamed run read the cache into memory"))
        streamed, _ = train_and_resume([*args, "--set", "data.stream=always", "--set", "data.workers=1"],
                                       tmp_path / "streamed")
    assert cli("train", *args, "--set", "data.stream=never", "--steps", 4, "--out", tmp_path / "memory") == 0
    digest = lambda p: {k: v for k, v in tree_digest(p).items() if "step-0000004" in k}  # noqa: E731
    assert digest(streamed) == digest(tmp_path / "memory")
    shard = sharded / meta["train_shards"][3]["file"]
    changed = bytearray(shard.read_bytes())
    changed[-1] ^= 1
    shard.write_bytes(bytes(changed))
    err = refused(capsys, "train", *args, "--steps", 1, "--out", tmp_path / "run")
    assert f"{shard} changed since it was written" in err and not (tmp_path / "run").exists()
    meta["version"] = 1
    (sharded / "latents.json").write_text(json.dumps(meta))
    assert "encode the source again" in refused(capsys, "train", *args, "--steps", 1, "--out", tmp_path / "run")


def test_captions_encoded_in_each_step_are_the_cached_embeddings(tmp_path, sd):
    """--text-embeddings encode keeps captions only: training runs the frozen text encoder on each
    batch's captions and draws what the cached table gives, the empty prompt for dropped captions."""
    from safetensors.torch import load_file
    from cmkit.batch_rng import BatchRNG
    folder, cached = sd
    encoded = tmp_path / "encoded"
    assert cli("data", "encode", captioned_folder(tmp_path / "images"), "--pipeline", folder, "--out", encoded,
               "--text-embeddings", "encode") == 0
    assert json.loads((encoded / "latents.json").read_text())["text_embeddings"] == "encoded"
    assert "text_table" not in load_file(str(encoded / "tables.safetensors"))
    trainers = [Trainer(build_config("lcm", teacher=str(folder), **{"data.name": str(data),
                                                                   "train.label_dropout": 0.5}))
                for data in (cached, encoded)]
    assert trainers[0].prompts is None and trainers[1].text_table is None
    draws = [t._draw(BatchRNG(torch.Generator().manual_seed(3), start=0, total=16), 16) for t in trainers]
    dropped = (draws[0][1].text == trainers[0].null_text).flatten(1).all(1)
    assert 0 < dropped.sum() < 16  # some captions dropped, some kept
    assert torch.equal(draws[0][0], draws[1][0])
    torch.testing.assert_close(draws[1][1].text, draws[0][1].text, rtol=1e-5, atol=1e-6)
    assert cli("train", "--method", "lcm", "--teacher", folder, "--data", encoded, "--steps", 2, "--out",
               tmp_path / "run", *FAST) == 0


def test_hostile_captions_and_folders_are_refused_in_one_line(tmp_path, sd, capsys):
    folder, _ = sd
    images = captioned_folder(tmp_path / "images")
    out = tmp_path / "latents"
    (images / "00003.txt").write_bytes("a photo of a caf\xe9".encode("latin-1"))
    assert "not UTF-8" in refused(capsys, "data", "encode", images, "--pipeline", folder, "--out", out)
    (images / "00003.txt").unlink()
    assert "00003.png has no caption" in refused(capsys, "data", "encode", images, "--pipeline", folder, "--out", out)
    (images / "00003.txt").write_text("a photo of a digit three")
    victim = sorted(images.glob("*.png"))[5]
    good = victim.read_bytes()
    victim.write_bytes(good[:40])  # truncated: captions would shift if it were skipped
    assert "do not decode" in refused(capsys, "data", "encode", images, "--pipeline", folder, "--out", out)
    victim.write_bytes(good)
    assert not out.exists()
    # A pipeline folder whose weights are pickles only is never unpickled.
    pickled = tmp_path / "pickled"
    save_sd(pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert "pickled weights" in refused(capsys, "sample", "--checkpoint", pickled, "--n", 1, "--out",
                                         tmp_path / "x.npy")
    weights = pickled / "text_encoder" / "model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    assert "pickled weights" in refused(capsys, "data", "encode", images, "--pipeline", pickled, "--out", out)
    assert not out.exists() and not (tmp_path / "x.npy").exists()
    # SDXL-style folders are refused with the reason.
    index = json.loads((folder / "model_index.json").read_text())
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline",
                                                        "text_encoder_2": ["transformers", "CLIPTextModel"]}))
    assert "SDXL" in refused(capsys, "sample", "--checkpoint", sdxl, "--n", 1, "--out", tmp_path / "x.npy")
    # A class for a text model: it takes a prompt.
    assert "takes a prompt, not class labels" in refused(capsys, "sample", "--checkpoint", folder, "--n", 1,
                                                          "--class", 1, "--out", tmp_path / "x.npy")


def test_images_given_to_a_latent_teacher_are_refused_with_the_line_that_encodes_them(tmp_path, sd, capsys,
                                                                                    monkeypatch):
    import re
    import shlex
    folder, _ = sd
    monkeypatch.chdir(tmp_path)
    captioned_folder(tmp_path / "images")
    err = refused(capsys, "train", "--method", "lcm", "--teacher", folder, "--data", "images", "--steps", 1,
                   "--out", "runs/lcm")
    assert "latent model" in err, err
    encode, data = re.search(r"\((cmkit data encode [^)]*)\), then train with --data (\S+)", err).groups()
    assert cli(*shlex.split(encode)[1:]) == 0  # the line as given works
    assert cli("train", "--method", "lcm", "--teacher", folder, "--data", data, "--steps", 1, "--out", "runs/lcm",
               *FAST) == 0


def test_an_over_long_prompt_is_truncated_with_a_warning(sd, capsys):
    folder, _ = sd
    run = cmkit.load_run(folder)
    capsys.readouterr()
    long = run.text_condition("a photo of a digit two two two two two", 1).text
    assert "truncated" in capsys.readouterr().err
    assert long.shape == (1, 8, 16)
    with pytest.raises(cmkit.CmkitError, match="control"):
        run.text_condition("a photo\x00", 1)
    with pytest.raises(cmkit.CmkitError, match="at most"):
        run.text_condition("a" * 5000, 1)


@pytest.mark.slow
def test_cmkit_methods_train_on_a_vae_only_latent_set(tmp_path, sd, capsys):
    """--vae: latents without captions (the digits' labels kept) are data for cmkit's own UNet; the
    cache holds the VAE's posterior mean times its scaling factor, and samples decode through it."""
    from diffusers import AutoencoderKL
    folder, _ = sd
    latents = tmp_path / "latents"
    assert cli("data", "encode", "digits", "--vae", folder / "vae", "--out", latents) == 0
    meta = json.loads((latents / "latents.json").read_text())
    assert meta["captions"] is None and meta["shape"] == [4, 4, 4] and meta["image_shape"] == [1, 8, 8]
    cached = cache_tensors(latents)
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"))
    with torch.no_grad():
        mean = vae.encode(cached["holdout_images"][:5].float() / 127.5 - 1).latent_dist.mean
    torch.testing.assert_close(cached["holdout"][:5], mean * vae.config.scaling_factor, rtol=1e-4, atol=1e-5)
    run_dir = tmp_path / "edm"
    assert cli("train", "--method", "edm", "--data", latents, "--steps", 2, "--out", run_dir, "--set",
               "model.preset=tiny", *FAST) == 0
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["checkpoints", "vae"]
    run = cmkit.load_run(run_dir)
    assert run.num_classes == 10 and run.shape == (4, 4, 4) and run.image_shape == (1, 8, 8)
    noise = np.random.default_rng(0).standard_normal((2, 4, 4, 4)).astype(np.float32)
    images = run.sample(2, steps=2, noise=noise, class_labels=3)
    z = cmkit.run.generate(run.model, run.shape, run.sigmas_for(2), is_diffusion=True, n=2, noise=noise,
                           condition=Condition(labels=torch.tensor([3, 3])))
    with torch.no_grad():
        decoded = vae.decode(z / vae.config.scaling_factor).sample
    assert np.abs(images.astype(int) - ((decoded + 1) * 127.5).clamp(0, 255).round().numpy()).max() <= 1
    assert cli("train", "--method", "ect", "--init", run_dir, "--data", latents, "--steps", 2, "--out",
               tmp_path / "ect", *FAST) == 0
    # Inpainting through the VAE: the known pixels are the input's exactly, the hole is the model's.
    from cmkit.editing import tasks
    student = cmkit.load_run(tmp_path / "ect")
    inputs = cached["holdout_images"][:2].numpy()
    hole = np.zeros((8, 8), bool)
    hole[2:6, 1:5] = True
    filled = tasks.inpaint(student, inputs, hole, n=2, seed=1, class_labels="3")
    assert filled.shape == (4, 1, 8, 8)
    assert np.array_equal(filled[:, :, ~hole], np.repeat(inputs, 2, axis=0)[:, :, ~hole])
    assert not np.array_equal(filled[0, :, hole], filled[1, :, hole])  # two variations of input 0
    assert tasks.stroke(student, inputs, seed=1, class_labels="3").shape == (2, 1, 8, 8)
    # Not built yet, so refused in one line: ONNX export of latent runs, and pixel-constraint edits.
    assert cli("export", "onnx", "--checkpoint", tmp_path / "ect", "--out", tmp_path / "m.onnx", "--quiet") == 2
    assert "latent run" in capsys.readouterr().err
    np.save(tmp_path / "noisy.npy", images[:1])
    assert cli("edit", "denoise", "--checkpoint", tmp_path / "ect", "--input", tmp_path / "noisy.npy", "--sigma",
               0.5, "--out", tmp_path / "d.png", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert "generates latents" in err and len(err.splitlines()) == 1 and not (tmp_path / "d.png").exists()


LORA = ["--set", "objective.lora_rank=4", "--set", "objective.lora_alpha=8"]  # alpha != rank: the scale travels


def test_lcm_lora_equals_the_reference_and_keeps_one_copy_of_the_unet(sd):
    """LCM-LoRA's step as diffusers' train_lcm_distill_lora_sd_wds.py takes it: the teacher is the UNet
    with its adapters disabled, the target the student itself under no_grad, no w embedding."""
    from diffusers import DDPMScheduler
    folder, latents = sd
    trainer = Trainer(build_config("lcm-lora", teacher=str(folder), **{
        "data.name": str(latents), "objective.guidance": [2.0, 8.0], "objective.lora_rank": 4,
        "objective.lora_alpha": 8}))
    net, unet = trainer.net, trainer.net.backbone.unet
    # One copy: the teacher is a view of the student's UNet, the EMA shares its frozen base, and only
    # the adapters train.
    assert trainer.objective.teacher.backbone is net.backbone and trainer.target is None
    base = [(n, p) for n, p in net.named_parameters() if not p.requires_grad]
    ema = dict(trainer.ema.named_parameters())
    assert base and all(ema[n] is p for n, p in base)
    trained = trainer.optimizer.param_groups[0]["params"]
    assert trained and all(".lora_" in n for n, p in net.named_parameters() if any(p is q for q in trained))
    _perturb(net, 1)  # the adapters (and, harmlessly, the frozen base) move: teacher != student
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    B = 5
    x0, noise = trainer.x_train[:B], torch.randn(B, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    text, null = trainer.text_table[trainer.text_ids[:B]], trainer.null_text.expand(B, -1, -1)
    index, w = torch.tensor([0, 3, 20, 48, 49]), torch.tensor([1.0, 5.0, 2.5, 7.0, 4.0])
    starts, k = skipping_grid(1000, 50)
    sigmas = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt()
    draws = {"sigma_hi": sigmas[starts[index]], "sigma_lo": sigmas[(starts[index] - k).clamp(min=0)], "z": noise,
             "guidance": w + 1}
    ours = trainer.objective.loss(net, x0, draws, target=trainer.target, condition=Condition(text=text))[0].mean()
    ours_grads = torch.autograd.grad(ours, trained)

    def student(x_t, t, prompt_embeds, w=None):
        return unet(x_t, t, encoder_hidden_states=prompt_embeds).sample

    def teacher(x_t, t, prompt_embeds):
        unet.disable_adapters()
        try:
            return unet(x_t, t, encoder_hidden_states=prompt_embeds).sample
        finally:
            unet.enable_adapters()

    parts = {}
    reference = reference_lcm_loss(student, student, teacher, scheduler, x0, noise, index, w, text, null, "epsilon",
                                   parts=parts)
    reference_grads = torch.autograd.grad(reference, trained)
    assert_equals_reference(ours, ours_grads, reference, reference_grads)
    assert_parts_equal_reference(trainer.objective, net, None, x0, draws, Condition(text=text), parts)


@pytest.mark.slow
def test_an_lcm_lora_run_resumes_and_its_lora_file_loads_into_the_base_pipeline(tmp_path, sd, capsys):
    from diffusers import LCMScheduler, StableDiffusionPipeline
    folder, latents = sd
    args = ["--method", "lcm-lora", "--teacher", folder, "--data", latents, "--guidance", "2,8", *LORA,
            "--set", "train.lr=0.01", *FAST]
    whole, split = train_and_resume(args, tmp_path)
    from safetensors import safe_open
    files = []
    for run in (whole, split):  # the same adapters and config (safetensors orders its header freely)
        with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
            files.append(({k: f.get_tensor(k) for k in f.keys()}, f.metadata()))
    assert files[0][1] == files[1][1] and files[0][0].keys() == files[1][0].keys()
    assert all(torch.equal(files[0][0][k], files[1][0][k]) for k in files[0][0])
    assert "takes no guidance scale" in refused(capsys, "sample", "--checkpoint", whole, "--n", 1, "--prompt", PROMPT,
                                                 "--guidance", 8, "--out", tmp_path / "x.npy")
    assert "pixel-space" in refused(capsys, "export", "onnx", "--checkpoint", whole, "--out", tmp_path / "x.onnx")
    assert cli("export", "diffusers", "--checkpoint", whole, "--out", tmp_path / "lora") == 0
    assert "load_lora_weights" in capsys.readouterr().out
    for source in (whole, tmp_path / "lora"):
        pipe = StableDiffusionPipeline.from_pretrained(str(folder))
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
        pipe.load_lora_weights(str(source))
        for steps in (1, 4):
            out = tmp_path / f"{source.name}-{steps}.npy"
            assert cli("sample", "--checkpoint", whole, "--n", 3, "--steps", steps, "--prompt", PROMPT, "--seed", 7,
                       "--out", out, "--quiet") == 0
            ours = np.load(out).astype(int)[..., 0]
            theirs = pipe(PROMPT, num_images_per_prompt=3, num_inference_steps=steps, guidance_scale=1.0,
                          generator=torch.Generator().manual_seed(7), output_type="np").images[..., 0]
            assert np.abs(ours - np.round(theirs * 255)).max() <= 2, (source, steps)
    # The adapters moved the network: without them the pipeline samples something else.
    plain = StableDiffusionPipeline.from_pretrained(str(folder))
    plain.scheduler = LCMScheduler.from_config(plain.scheduler.config)
    theirs = plain(PROMPT, num_images_per_prompt=3, num_inference_steps=4, guidance_scale=1.0,
                   generator=torch.Generator().manual_seed(7), output_type="np").images[..., 0]
    assert np.abs(ours - np.round(theirs * 255)).max() > 2


def test_gradient_checkpointing_changes_memory_not_gradients(sd):
    folder, latents = sd
    grads = []
    for checkpointing in (False, True):
        trainer = Trainer(build_config("lcm", teacher=str(folder), **{
            "data.name": str(latents), "objective.guidance": [2.0, 8.0],
            "train.gradient_checkpointing": checkpointing}))
        assert trainer.net.backbone.unet.is_gradient_checkpointing == checkpointing
        rng = trainer._batch_rng(0, 0, torch.Generator())
        batch, condition = trainer._draw(rng, 4)
        draws = trainer.objective.draw(batch, generator=rng, condition=condition)
        loss, _ = trainer._loss(batch, condition, draws)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(trainer.net.parameters()))]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    assert float(grads[0].abs().sum()) > 0
    with pytest.raises(cmkit.CmkitError, match="image runs"):
        Trainer(build_config("edm", **{"data.name": "moons", "train.gradient_checkpointing": True}))


def test_tar_shards_carry_captions_as_txt_or_json_members(tmp_path, sd):
    import io
    import tarfile
    folder, latents = sd
    images = captioned_folder(tmp_path / "images")
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, png in enumerate(sorted(images.glob("*.png"))):
            caption = png.with_suffix(".txt").read_text()
            members = [(png.name, png.read_bytes())]
            if i % 2:  # half as .txt, half as .json {"text": ...}
                members.append((png.stem + ".txt", caption.encode()))
            else:
                members.append((png.stem + ".json", json.dumps({"text": caption}).encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert cli("data", "encode", shard, "--pipeline", folder, "--out", tmp_path / "from-tar") == 0
    a, b = (json.loads((p / "latents.json").read_text()) for p in (latents, tmp_path / "from-tar"))
    assert a["captions"] == b["captions"]
    ta, tb = cache_tensors(latents), cache_tensors(tmp_path / "from-tar")
    assert torch.equal(ta["train_text_ids"], tb["train_text_ids"])
    torch.testing.assert_close(ta["train"], tb["train"], rtol=1e-5, atol=1e-6)  # the same images, decoded apart
