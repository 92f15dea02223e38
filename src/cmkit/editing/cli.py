"""`cmkit edit TASK`: the editing tasks from the command line.

Inputs are an image file (PNG/JPEG), a folder of them (sorted; one batch) or a uint8 .npy/.npz.
Images the size of the run's source data (say 28x28 Fashion-MNIST for a model trained at
data.resolution=32) are padded or resized as in training. Outputs: a .png grid (a row per input:
the input, then its variations), a .npz (uint8 NHWC 'images', input-major, and 'inputs'), or a
folder (one PNG per output); interpolation writes a .png strip or a .gif.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CmkitError

def add_parser(sub, seed_type, sigma_list, class_spec, help: str) -> None:
    from .tasks import LATENT_TASKS, TASKS

    p = sub.add_parser("edit", help=help, description=f"Zero-shot editing: {', '.join(TASKS)}.")
    tasks = p.add_subparsers(dest="task", required=True, parser_class=type(p))
    for task in TASKS.values():
        t = tasks.add_parser(task.name, help=task.help)
        t.add_argument("--checkpoint", required=True, help="run directory or diffusers folder (any method; a teacher "
                       "edits through its ODE flow map)")
        t.add_argument("--out", required=True, help=".png, .npz or a folder" if task.image else ".png strip or .gif")
        t.add_argument("--seed", type=seed_type, default=0, help="fixes the noise (default 0)")
        t.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
        t.add_argument("--class", dest="class_spec", type=class_spec,
                       help="class-conditional runs: an index or name, or a comma list (one per input); default "
                       "'null' for runs trained with --label-dropout" + ("" if task.image else ", else seed A's class"))
        t.add_argument("--guidance", type=float, help="classifier-free guidance scale (see cmkit sample --help)")
        t.add_argument("--quiet", action="store_true", help="print nothing but errors")
        if not task.image:  # interpolation
            t.add_argument("--seed-a", type=seed_type, required=True, help="the seed of the first frame's noise")
            t.add_argument("--seed-b", type=seed_type, required=True, help="the seed of the last frame's noise")
            t.add_argument("--frames", type=int, default=8, help="frames, both ends included (default 8)")
            continue
        t.add_argument("--input", required=True, help="image file, folder of images, or uint8 .npy/.npz")
        if task.sigma:
            t.add_argument("--sigma", type=float, required=True,
                           help="the noise's standard deviation in model units ([-1, 1] images: 0.2 is about "
                           "25 of 255 grey levels)")
        if task.variations:
            t.add_argument("--n", type=int, default=1, help="variations per input")
        group = t.add_mutually_exclusive_group()
        if task.levels:
            group.add_argument("--sigmas", type=sigma_list, help="decreasing noise levels (default: " +
                               ("--steps levels of a Karras grid)" if task.steps else "5.38,2.24, the paper's)"))
        if task.steps:
            group.add_argument("--steps", type=int, default=10, help="levels of the default grid (default 10)")
        if task.strength:  # image-to-image: the live canvas's settings
            group.add_argument("--strength", type=float, help="instead of --sigmas: start at this fraction of the "
                               "model's time axis (0-1; 1 is pure noise) and take --steps levels down from it")
            t.add_argument("--steps", type=int, help="with --strength: consistency steps (default 1)")
        if task.name in LATENT_TASKS:
            t.add_argument("--prompt", help="a text-conditioned model's prompt (default the empty prompt)")
        if task.mask:
            where = t.add_mutually_exclusive_group(required=True)
            where.add_argument("--mask", help="mask image (white = fill in), the input's size")
            where.add_argument("--box", help="x,y,w,h rectangle to fill in (pixels of the input)")
        if task.factor:
            t.add_argument("--factor", type=int, required=True, help="upscaling factor p (2..8); the input is "
                           "the model's size divided by p")
            t.add_argument("--downscale", action="store_true", help="the input is full size: average its p x p "
                           "patches first (to try super-resolution on images you have)")


def read_inputs(path: str) -> np.ndarray:
    """uint8 (N, C, H, W) from an image file, a folder or an .npy/.npz."""
    from ..data.images import IMAGE_SUFFIXES, load_image_array, load_image_folder, to_nchw

    p = Path(path)
    if p.is_dir():
        return to_nchw(load_image_folder(p)[0], p.name)
    if not p.is_file():
        raise CmkitError(f"--input {path}: no such file or folder")
    if p.suffix.lower() in (".npy", ".npz"):
        return load_image_array(p)[0]
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise CmkitError(f"--input must be a PNG/JPEG image, a folder of them or a uint8 .npy/.npz, got {p.name!r}")
    return _read_picture(p, grey=None)[None]


def _read_picture(p: Path, grey: bool | None) -> np.ndarray:
    from ..safe_io import read_image

    arr = read_image(p, mode=None if grey is None else "L" if grey else "RGB")
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _fit(run, images: np.ndarray, allow_grey_for_rgb: bool = False) -> np.ndarray:
    """Match the model's channels (RGB -> grey by luma; grey -> RGB only where the task allows)
    and size (the run's own pad/resize when its data were fitted to a resolution)."""
    if not (allow_grey_for_rgb and images.shape[1] == 1):
        images = _channels_only(run, images)
    return _fit_size(run, images)


def _fit_size(run, images: np.ndarray) -> np.ndarray:
    """Pad or resize (N, C, H, W) uint8 as the run's training data were, when the run fitted its
    data to a square resolution and ``images`` are another size."""
    from ..data.images import fit_resolution

    h, w = run.image_shape[1:]
    data = run.config.get("data", {})
    if tuple(images.shape[2:]) == (h, w) or data.get("resolution") != h or h != w:
        return images
    return fit_resolution(torch.from_numpy(np.array(images)), h, data.get("fit", "pad")).numpy()


def _mask(args, run, inputs_hw: tuple[int, int]) -> np.ndarray:
    """bool (H, W) at the model's size: True = fill in."""
    h, w = inputs_hw
    if args.box:
        try:
            x, y, bw, bh = (int(v) for v in args.box.split(","))
        except ValueError:
            raise CmkitError(f"--box must be x,y,w,h in pixels, got {args.box!r}") from None
        if bw < 1 or bh < 1 or x < 0 or y < 0 or x + bw > w or y + bh > h:
            raise CmkitError(f"--box {args.box} does not fit in the {w}x{h} input")
        mask = np.zeros((1, 1, h, w), dtype=np.uint8)
        mask[..., y:y + bh, x:x + bw] = 255
    else:
        p = Path(args.mask)
        if not p.is_file():
            raise CmkitError(f"--mask {args.mask}: no such file")
        mask = _read_picture(p, grey=True)[None]
        if mask.shape[2:] != (h, w):
            raise CmkitError(f"--mask is {mask.shape[3]}x{mask.shape[2]}, the input is {w}x{h}: they must match")
    return _fit_size(run, mask)[0, 0] > 127


def cmd_edit(args, device: str) -> None:
    from ..run import load_run
    from . import tasks

    out = Path(args.out)
    interpolating = not tasks.TASKS[args.task].image
    if interpolating:
        if out.suffix.lower() not in (".png", ".gif"):
            raise CmkitError(f"interpolate writes a .png strip or a .gif, got {out.name!r}")
    elif out.suffix.lower() not in (".png", ".npz", ""):
        raise CmkitError(f"--out must be a .png grid, a .npz or a folder, got {out.name!r}")
    from ..outputs import refuse_to_clobber
    refuse_to_clobber(out, args.checkpoint)
    run = load_run(args.checkpoint, device=device)
    if not run.is_image:
        raise CmkitError(f"cmkit edit needs an image model; {args.checkpoint} was trained on vectors "
                         "(the Python function cmkit.editing.edit works on any tensor)")
    if interpolating:
        frames = tasks.interpolate(run, args.seed_a, args.seed_b, args.frames, class_labels=args.class_spec,
                                   guidance=args.guidance)
        _write_strip(frames, out, title=f"interpolation from seed {args.seed_a} to seed {args.seed_b}, "
                                        f"{args.frames} frames, {run.method}")
        _done(args, f"wrote {len(frames)} frames to {out}")
        return
    task = tasks.TASKS[args.task]
    raw = read_inputs(args.input)
    if task.factor and args.downscale:  # a full-size input: make the low-resolution one
        inputs = tasks.downscale(_fit(run, raw), args.factor)
    elif task.factor:  # the input is the low-resolution image: only its channels are fitted
        inputs = _channels_only(run, raw)
    else:
        inputs = _fit(run, raw, allow_grey_for_rgb=task.grey_input)
    mask = _mask(args, run, raw.shape[2:]) if task.mask else None
    result = tasks.run_task(run, task.name, inputs, mask=mask,
                            factor=getattr(args, "factor", None), sigma=getattr(args, "sigma", None),
                            n=getattr(args, "n", 1), seed=args.seed, sigmas=getattr(args, "sigmas", None),
                            steps=getattr(args, "steps", None), class_labels=args.class_spec, guidance=args.guidance,
                            **{k: getattr(args, k) for k in ("strength", "prompt") if getattr(args, k, None) is not None})
    if task.factor:
        inputs = np.repeat(np.repeat(inputs, args.factor, 2), args.factor, 3)  # shown beside, enlarged
    _write_edits(inputs, result, getattr(args, "n", 1), out, title=_edit_title(args, run, task), mask=mask)
    _done(args, f"wrote {len(result)} edited image(s) to {out}")


def _channels_only(run, images: np.ndarray) -> np.ndarray:
    """The model's channels: RGB -> grey by luma; grey -> RGB is an error (colorize does that)."""
    from .operators import LUMA

    c = run.image_shape[0]
    if images.shape[1] == 3 and c == 1:
        luma = np.tensordot(np.array(LUMA), images.astype(np.float64), axes=([0], [1]))
        return np.clip(np.round(luma), 0, 255).astype(np.uint8)[:, None]
    if images.shape[1] == 1 and c == 3:
        raise CmkitError("this model makes RGB images and the input is grey: colour it first with "
                         "`cmkit edit colorize`")
    return images


def _done(args, message: str) -> None:
    if not args.quiet:
        print(message)


def _edit_title(args, run, task) -> str:
    """What an edit figure shows: the task, the model, the levels and the class."""
    what = {"inpaint": "inputs (fill region tinted), then inpaintings", "colorize": "grey inputs, then colourings",
            "superres": f"low-resolution inputs (enlarged), then x{getattr(args, 'factor', 0)} super-resolutions",
            "stroke": "stroke paintings, then images (SDEdit)",
            "denoise": f"noisy inputs, then denoised (sigma {getattr(args, 'sigma', 0):g})"}.get(task.name, task.name)
    parts = [what, f"{run.method}, seed {args.seed}"]
    if getattr(args, "sigmas", None):
        parts.append("sigmas " + ",".join(f"{v:g}" for v in args.sigmas))
    elif getattr(args, "strength", None) is not None:
        parts.append(f"strength {args.strength:g}, {args.steps or 1} step(s)")
    elif task.steps:
        parts.append(f"{args.steps} levels")
    if args.class_spec is not None:
        parts.append(f"class {args.class_spec}")
    if getattr(args, "prompt", None):
        parts.append(f"prompt {args.prompt!r}")
    if args.guidance is not None:
        parts.append(f"guidance {args.guidance:g}")
    return "; ".join(parts)


def _write_edits(inputs: np.ndarray, result: np.ndarray, n: int, out: Path, title: str | None = None,
                 mask: np.ndarray | None = None) -> None:
    from ..plotting import save_edit_grid

    if inputs.shape[1] != result.shape[1]:  # a grey input beside its colourings
        inputs = np.repeat(inputs, result.shape[1], axis=1)
    if out.suffix.lower() == ".png":
        save_edit_grid(inputs, result, n, out, title=title, masks=mask)
    elif out.suffix.lower() == ".npz":
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp.npz")
        np.savez(tmp, images=result.transpose(0, 2, 3, 1), inputs=inputs.transpose(0, 2, 3, 1))
        tmp.replace(out)
    else:
        from PIL import Image
        if out.exists() and any(out.iterdir()):
            raise CmkitError(f"--out folder {out} is not empty; choose a new one")
        out.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(result):
            picture = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
            Image.fromarray(picture).save(out / f"edit-{k // n:04d}-{k % n:02d}.png")


def _write_strip(frames: np.ndarray, out: Path, title: str | None = None) -> None:
    from PIL import Image

    from ..plotting import save_image_grid
    if out.suffix.lower() == ".png":
        save_image_grid(frames, out, nrow=len(frames), title=title)
        return
    scale = max(1, 128 // frames.shape[2])
    pictures = [Image.fromarray(f[0] if f.shape[0] == 1 else f.transpose(1, 2, 0)) for f in frames]
    pictures = [p.resize((p.width * scale, p.height * scale), Image.NEAREST) for p in pictures]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.gif")
    pictures[0].save(tmp, save_all=True, append_images=pictures[1:], duration=120, loop=0)
    tmp.replace(out)
