"""The `cmkit` command line: a thin layer over the Python API.

User mistakes end in one line on stderr ("cmkit: error: ...") and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import CmkitError, Stopped


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's wrapping, except for help texts that lay out their own lines (the method list)."""

    def _split_lines(self, text, width):
        if "\n" not in text:
            return super()._split_lines(text, width)
        import textwrap
        lines = []
        for raw in text.splitlines():  # "  name     summary" rows wrap under their summary
            lines += textwrap.wrap(raw, width, subsequent_indent=" " * (len(raw) - len(raw.split("  ")[-1].lstrip())))
        return lines


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2 (no usage dump)."""

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            message = f"unrecognized arguments: {' '.join(unknown)}"
            self.error(message + _suggest_options(self, parsed, unknown))
        return parsed

    def error(self, message):
        message = message.replace("\r", "\\r").replace("\n", "\\n")  # user text stays on one line
        if "invalid choice:" in message:  # --method cdd, cmkit tarin: did you mean ...?
            import difflib
            import re
            match = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
            if match:
                choices = [c.strip().strip("'") for c in match.group(2).split(",")]
                close = difflib.get_close_matches(match.group(1), choices, n=1, cutoff=0.6)
                message += f" (did you mean {close[0]}?)" if close else ""
        raise CmkitError(message)


def _command_parsers(parser: argparse.ArgumentParser, parsed=None, prefix: str = ""):
    """(name, parser) of the (sub-)commands below ``parser`` ("edit inpaint"): all of them, or with
    ``parsed`` the chain of the ones chosen (``cmkit data check``: data, then data check)."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            chosen = getattr(parsed, action.dest, None) if parsed is not None else None
            for name, sub in action.choices.items():
                if parsed is None or name == chosen:
                    found += [(prefix + name, sub), *_command_parsers(sub, parsed, f"{prefix}{name} ")]
    return found


def _suggest_options(parser: argparse.ArgumentParser, parsed, unknown: list[str]) -> str:
    """' (did you mean --x?)' from the chosen command's own options (never the rejected one), or
    which commands take an option that this one does not."""
    import difflib
    chain = _command_parsers(parser, parsed)
    command, chosen = chain[-1] if chain else ("", parser)
    own = set(chosen._option_string_actions)
    hints = []
    for token in (t.split("=")[0] for t in unknown if t.startswith("--")):
        others = sorted(name for name, sub in _command_parsers(parser) if token in sub._option_string_actions)
        close = difflib.get_close_matches(token, sorted(own - {token}), n=1, cutoff=0.7)
        if others and command:
            named = ", ".join(others) if len(others) <= 4 else f"{', '.join(others[:3])} and {len(others) - 3} more"
            hints.append(f"{token} is an option of {named}, not of {command}")
        elif close:
            hints.append(f"did you mean {close[0]}?")
    if any("{" not in t and t.endswith(".tar") for t in unknown):  # the shell expanded a shard pattern
        hints.append("quote a shard pattern, 'train-{000000..000009}.tar', or the shell expands it")
    return f" ({'; '.join(hints)})" if hints else ""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _seed(text: str) -> int:
    from .validate import check_seed
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    except CmkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _name_list(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def _scale_range(text: str) -> list[float] | str:
    if text.strip().lower() == "none":
        return "none"  # an unguided student, where a method would guide by default
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (or one number), got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 <= LO <= HI, got {text!r}")
    return values


def _class_spec(text: str):
    from .classes import parse_class_spec
    try:
        return parse_class_spec(text)
    except CmkitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


CLASS_HELP = ("class-conditional runs: an index or name, a comma list (cycled over the samples), 'random' "
              "(default) or 'null' (unconditional; runs trained with --label-dropout)")
GUIDANCE_HELP = ("classifier-free guidance scale w (D_uncond + w (D_cond - D_uncond); 1 = none): teachers "
                 "trained with --label-dropout, and students distilled with --guidance")

INCEPTION_ENV = "CMKIT_INCEPTION_WEIGHTS"
TOKEN_ENV = "CMKIT_SERVE_TOKEN"  # cmkit serve's API token
QUIET_HELP = "print nothing but errors (no progress bars)"
DEVICE_HELP = "cpu, cuda, cuda:N, mps or auto (default auto: a GPU when there is one)"
CHECKPOINT_HELP = "a run directory, or a diffusers folder (a pipeline, or a UNet2DModel with its scheduler)"


def _sigma_list(text: str) -> list[float]:
    from .noise import parse_sigmas
    try:
        return parse_sigmas(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Each command's one-line summary (the `cmkit --help` list, built without importing torch).
COMMAND_HELP = {
    "demo": "train a teacher and a CD model on a 2-D set or 8x8 digits, evaluate, plot (start here)",
    "train": "train a diffusion teacher or a consistency model (the methods: cmkit train --help)",
    "sample": "generate samples from a run",
    "edit": "zero-shot editing: inpainting, colorization, super-resolution, strokes, denoising, interpolation",
    "eval": "compare a run's samples with held-out data",
    "tune-sigmas": "search a consistency run's multistep noise levels by the eval metric",
    "export": "write a run as a diffusers ConsistencyModelPipeline folder, as ONNX (fp32, fp16, int8) or as a web "
              "page that generates in the browser",
    "serve": "a web page and HTTP API for real-time sampling and editing",
    "serve-site": "serve a site written by export web, with the headers its threads need",
    "data": "inspect an image source, encode it into a latent data set, or pack a folder into tar shards",
    "train-classifier": "train the Fashion-MNIST feature classifier of the fd/pr metrics",
}


def _add_network_options(p: argparse.ArgumentParser, token_use: str, port_help: str = "TCP port (default 8000)"):
    """The address, token and connection options `serve` and `serve-site` share (`_serve_access`)."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; any other "
                   "needs a token or --insecure)")
    p.add_argument("--port", type=int, default=8000, help=port_help)
    p.add_argument("--token-file", help=f"file holding the token (or set ${TOKEN_ENV}); {token_use}")
    p.add_argument("--token", help="the token itself (visible to other users of this machine in the "
                   "process list: prefer --token-file or $" + TOKEN_ENV + ")")
    p.add_argument("--insecure", action="store_true", help="serve a non-loopback address without a token")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a host name clients reach the server by (repeatable; '*': any); loopback names and "
                   "the --host address are always allowed")
    p.add_argument("--max-connections", type=int, default=256, help="open connections (default 256); at the limit a "
                   "new one closes the oldest idle one")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send a request's "
                   "headers (default 10)")


def _root_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = _Parser(prog="cmkit", description="Consistency models: train, distill, sample, edit, evaluate, serve.")
    parser.add_argument("--version", action="version", version=f"cmkit {_version()}")
    return parser, parser.add_subparsers(dest="command", required=True, parser_class=_Parser)


def summary_parser() -> argparse.ArgumentParser:
    """The commands and their summaries only: `cmkit --help` and `cmkit --version` need no more,
    and building the full parser imports torch (the method registry)."""
    parser, sub = _root_parser()
    for name, text in COMMAND_HELP.items():
        sub.add_parser(name, help=text)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser, sub = _root_parser()

    from .devices import COMPILE_MODES
    from .objectives import methods
    specs = methods()
    by_role = lambda test: ", ".join(name for name, spec in specs.items() if test(spec))  # noqa: E731
    p = sub.add_parser("train", help=COMMAND_HELP["train"], formatter_class=_HelpFormatter)
    p.add_argument("--method", choices=tuple(specs), metavar="METHOD",
                   help="one of:\n" + "\n".join(f"  {name:9s} {spec.summary}" for name, spec in specs.items()))
    p.add_argument("--data", help="a built-in 2-D set (moons, 8gaussians, checkerboard, swissroll, gaussian, "
                   "gmm), an (N, D) .npy/.npz/.csv file, an image set (fashion-mnist, digits), a folder of "
                   "PNG/JPEG images, an EDM-style .zip, .tar shards (train-{000000..000099}.tar or a folder of "
                   "them) or a uint8 image .npy/.npz; large sets stream from disk (docs/data.md)")
    p.add_argument("--steps", type=int, help="train until this step (default: the method's config, 4000 for most; "
                   "with --resume: the run's own)")
    p.add_argument("--out", help="run directory (required, except with --print-config)")
    p.add_argument("--teacher", help=f"diffusion run to distill from (methods {by_role(lambda s: s.teacher)})")
    p.add_argument("--init", help=f"run whose weights to start from: a diffusion run (methods "
                   f"{by_role(lambda s: s.init and not s.frozen_init)}), or the consistency run that "
                   f"{by_role(lambda s: s.frozen_init)} continues")
    p.add_argument("--batch-size", type=int, help="samples per optimizer step (default: 512 for vectors, 128 for "
                   "images; see --print-config)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the method's, e.g. 4e-4 for CD, 1e-3 for "
                   "EDM on vectors; see --print-config)")
    p.add_argument("--label-dropout", type=float, help="class-conditional runs: replace this fraction of labels "
                   "with the null label, for classifier-free guidance (e.g. 0.1)")
    p.add_argument("--guidance", type=_scale_range, metavar="LO,HI", help=f"methods {by_role(lambda s: s.guided)}: "
                   "distill the "
                   "teacher's classifier-free guidance at scales drawn from [LO, HI]; the student takes the scale "
                   "as an input (sample it with --guidance W). lcm and lcm-lora from a text teacher guide by "
                   "default (the reference scripts' range, objective.prompt_guidance); none: an unguided student")
    p.add_argument("--seed", type=_seed, help="training seed (batches, noise, initialisation)")
    p.add_argument("--device", help="cpu, cuda, cuda:N, mps or auto (default auto: a GPU when there is one; under "
                   "torchrun each process takes cuda:LOCAL_RANK); also with --resume")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="fp32 (default) or bfloat16 autocast (train.bf16)")
    p.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                   help="torch.compile the training step (train.compile); MODE is one of "
                   f"{', '.join(COMPILE_MODES)} (default: default; reduce-overhead adds CUDA graphs); also "
                   "with --resume")
    p.add_argument("--config", help="JSON file of config overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set model.width=256 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the complete config these options give "
                   "(every default filled in) and exit")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its saved config (until "
                   "--steps, default the run's own)")
    p.add_argument("--force", action="store_true", help="overwrite the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("sample", help=COMMAND_HELP["sample"])
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--n", type=int, help="number of samples (required, except with --noise: its rows)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int, help="consistency steps, or Heun/Euler steps for a teacher")
    group.add_argument("--sigmas", type=_sigma_list, help="explicit decreasing noise levels s1,s2,...")
    p.add_argument("--sampler", choices=("heun", "euler"), help="teacher runs only (default heun)")
    p.add_argument("--s-churn", type=float, default=0.0, help="Heun stochastic churn (EDM S_churn; teacher runs)")
    p.add_argument("--s-tmin", type=float, default=0.0, help="churn only at sigma >= this")
    p.add_argument("--s-tmax", type=float, default=float("inf"), help="churn only at sigma <= this")
    p.add_argument("--s-noise", type=float, default=1.0, help="churn noise scale (EDM S_noise)")
    p.add_argument("--class", dest="class_spec", type=_class_spec, help=CLASS_HELP)
    p.add_argument("--prompt", action="append", help="text-conditioned runs: the prompt (repeat for several, "
                   "cycled over the samples; default the empty prompt)")
    p.add_argument("--guidance", type=float, help=GUIDANCE_HELP)
    p.add_argument("--seed", type=_seed, default=0, help="fixes the samples (default 0)")
    p.add_argument("--noise", help=".npy of (n, *shape) standard-normal starting noise (replaces the seed's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--batch-size", type=int, help="samples per network batch (default 256 images, 100000 "
                   "vectors); a seed's samples depend on it once n exceeds it")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPUs; slower on most CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network (CUDA graphs on a GPU)")
    p.add_argument("--out", required=True, help=".npy (data units; images uint8 NHWC; written batch by batch), "
                   ".npz (images: uint8 NHWC under 'images') or .png (image grid, or a scatter plot of 2-D data)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = sub.add_parser("export", help=COMMAND_HELP["export"])
    p.add_argument("format", choices=("diffusers", "onnx", "web"), help="diffusers (a pipeline folder: "
                   "ConsistencyModelPipeline, or for LCM students an LCMScheduler pipeline or LoRA file), onnx, or web (a static site that generates in the visitor's browser)")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="diffusers, web: a new folder; onnx: a .onnx file")
    p.add_argument("--levels", type=int, help="diffusers: the scheduler's num_train_timesteps, the Karras grid its "
                   "multistep timesteps index (default: CD's num_levels, else 40)")
    p.add_argument("--clip-denoised", action="store_true", help="diffusers: clamp each step's output to [-1, 1] "
                   "(the scheduler's default; cmkit's samplers do not, so parity needs it off)")
    p.add_argument("--with-f", action="store_true", help="onnx: also export f(x, sigma) for multistep sampling")
    p.add_argument("--guidance", type=float, help="onnx: the scale a guided student is exported at")
    p.add_argument("--no-check", action="store_true", help="onnx: skip the onnxruntime parity check")
    p.add_argument("--ort-web", help="web: onnxruntime-web's dist folder (default: the repository's "
                   "web/node_modules, from npm ci --prefix web)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out (onnx: its files; web: "
                   "a site; diffusers: a folder cmkit exported)")
    p.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                   help="onnx, web: fp16 halves the file; int8 (quantized, per channel) quarters it and runs faster on "
                   "CPUs; both are checked against fp32 (default fp32)")
    p.add_argument("--max-diff", type=float, help="onnx, web: the largest mean pixel difference from fp32 allowed "
                   "(0..255 levels; default 0.5 for fp16, 2.5 for int8)")
    p.add_argument("--seed", type=_seed, default=0, help="onnx, web: the noise int8 is calibrated and checked on (default 0)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = sub.add_parser("data", help=COMMAND_HELP["data"], description=COMMAND_HELP["data"].capitalize() + ".")
    data_sub = p.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    q = data_sub.add_parser("check", help="count images, sizes, colour, classes; list the ones that do not decode "
                            "(exit status 1 if any)")
    q.add_argument("source", help="a folder, .zip (EDM layout), .tar, shard pattern (train-{000000..000009}.tar), "
                   "folder of .tar shards or .npy")
    q.add_argument("--limit", type=int, help="decode only the first N images")
    q.add_argument("--grid", help="write a PNG grid of 64 of the images here")
    q.add_argument("--seed", type=_seed, default=0, help="which images the grid shows (default 0)")
    q = data_sub.add_parser("encode", help="encode images (and captions) once into a latent data set with a "
                            "pipeline's VAE (and text encoder)")
    q.add_argument("source", help="images: a folder (captions in metadata.jsonl or .txt files), tar shards (.txt "
                   "members), fashion-mnist, digits, ...")
    q.add_argument("--pipeline", help="a diffusers pipeline folder: its vae/, tokenizer/ and text_encoder/")
    q.add_argument("--vae", help="an AutoencoderKL folder alone (latents without captions)")
    q.add_argument("--out", required=True, help="the latent data set's folder (new)")
    q.add_argument("--caption-template", help="captions from class names, e.g. 'a photo of a {class}'")
    q.add_argument("--no-captions", action="store_true", help="latents only, even with a text encoder at hand")
    q.add_argument("--text-embeddings", choices=("auto", "cache", "encode"), default="auto",
                   help="cache one embedding per distinct caption, or encode each batch's captions in training "
                   "with the frozen text encoder (default auto: cache up to 256 MB of them)")
    q.add_argument("--shard-mb", type=float, default=256.0, help="the most one latent shard holds (default 256)")
    q.add_argument("--resolution", type=int, help="resize images to this side first")
    q.add_argument("--fit", choices=("pad", "resize"), default="pad", help="how images reach --resolution")
    q.add_argument("--holdout-fraction", type=float, default=0.1, help="held out for eval (default 0.1, as training)")
    q.add_argument("--seed", type=_seed, default=0, help="the train/held-out split's seed (default 0, as training)")
    q.add_argument("--batch-size", type=int, default=64, help="images per VAE batch (default 64)")
    q.add_argument("--force", action="store_true", help="replace an existing latent data set in --out")
    q = data_sub.add_parser("pack", help="write a folder of images as WebDataset-style tar shards ({key}.png + {key}.cls)")
    q.add_argument("folder", help="folder of PNG/JPEG images (first-level sub-folders: classes)")
    q.add_argument("out", help="folder for the shards (empty or new)")
    q.add_argument("--shard-size", type=int, default=10000, help="images per shard (default 10000)")
    q.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ... (default train)")
    q.add_argument("--skip-bad", action="store_true", help="leave out (and name) images that do not decode "
                   "instead of refusing the folder")

    p = sub.add_parser("tune-sigmas", help=COMMAND_HELP["tune-sigmas"])
    p.add_argument("--checkpoint", required=True, help="run directory (a diffusers folder with --dry-run)")
    p.add_argument("--steps", type=int, required=True, help="number of sampling steps K (>= 2)")
    p.add_argument("--data", help="reference data (default: the run's own held-out split)")
    p.add_argument("--n", type=int, default=2000, help="samples per evaluation (default 2000)")
    p.add_argument("--metric", help="sw1 or energy (vectors; default sw1), fd (images)")
    p.add_argument("--iterations", type=int, default=6, help="ternary-search iterations per level (default 6)")
    p.add_argument("--seed", type=_seed, default=0, help="samples and reference subset (default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dry-run", action="store_true", help="print the levels; do not store them")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    p = sub.add_parser("serve", help=COMMAND_HELP["serve"])
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    _add_network_options(p, "clients send 'Authorization: Bearer TOKEN', the page takes it as #token=TOKEN")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--preview-vae", metavar="FOLDER", help="a latent run's live frames: encode and decode them with "
                   "this small AutoencoderTiny (TAESD-style) folder instead of the run's VAE")
    p.add_argument("--max-n", type=int, default=64, help="largest n per request (default 64)")
    p.add_argument("--window-ms", type=float, default=5.0, help="micro-batching window (default 5 ms)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait per lane; more get 503 (default 64)")
    p.add_argument("--idle-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection stays "
                   "open (default 5)")
    p.add_argument("--read-timeout", type=float, default=30.0, help="seconds a request body may stall (default 30)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish (default 30)")
    p.add_argument("--docs", action="store_true", help="serve interactive API docs at /docs (Swagger UI, "
                   "which the browser loads from a CDN); /openapi.json is always there")

    p = sub.add_parser("serve-site", help=COMMAND_HELP["serve-site"])
    p.add_argument("site", help="the folder cmkit export web wrote")
    _add_network_options(p, "every file needs it: open /?token=TOKEN once (it sets a cookie) or send "
                         "'Authorization: Bearer TOKEN'", port_help="TCP port (default 8000; 0: any free one)")

    p = sub.add_parser("eval", help=COMMAND_HELP["eval"])
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="reference data (default: the run's own held-out split)")
    p.add_argument("--steps", type=_int_list, help="comma list of step counts (default: 1,2 or 18 for a teacher)")
    p.add_argument("--n", type=int, default=10000, help="samples per step count (capped by the held-out size)")
    p.add_argument("--metric", type=_name_list, help="image runs: comma list of fd (classifier Frechet distance), "
                   "pr (k-NN precision/recall), fid (Inception-v3; needs --inception-weights); default fd")
    p.add_argument("--guidance", type=float, help=GUIDANCE_HELP + "; samples take the reference's labels")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--inception-weights", help=f"pt_inception-2015-12-05 weights for fid (or ${INCEPTION_ENV})")
    p.add_argument("--seed", type=_seed, default=0, help="sampling and subsampling seed")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (no progress bar)")
    p.add_argument("--quiet", action="store_true", help="no progress bars; the results are still printed")

    p = sub.add_parser("train-classifier", help=COMMAND_HELP["train-classifier"])
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--root", help="folder of the Fashion-MNIST IDX files (default: the Debian package's)")
    p.add_argument("--epochs", type=int, default=4, help="passes over the training images (default 4)")
    p.add_argument("--seed", type=_seed, default=0, help="initialisation and batch order (default 0)")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    from .editing.cli import add_parser as add_edit_parser
    add_edit_parser(sub, _seed, _sigma_list, _class_spec, COMMAND_HELP["edit"])

    p = sub.add_parser("demo", help=COMMAND_HELP["demo"])
    p.add_argument("--out", help="output directory (default runs/demo-DATA, e.g. runs/demo-moons)")
    p.add_argument("--data", default="moons", help="a built-in 2-D set (default moons) or digits (8x8 images, "
                   "a tiny UNet; about 4 minutes on 2 CPU cores)")
    p.add_argument("--seed", type=_seed, default=0, help="training and sampling seed")
    p.add_argument("--steps", type=_int_list, metavar="TEACHER,CD", help="training steps of the teacher and of "
                   "CD (default 4000,3000 on 2-D sets, 1500,1000 on digits; fewer: a quicker, rougher look)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted demo in --out (after Ctrl-C): a "
                   "finished run is reused, a stopped one continues from its last checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return parser


def _version() -> str:
    from . import __version__
    return __version__


def cmd_train(args) -> None:
    from .config import build_config, default_config
    from .training import train

    from .objectives import get_method, methods

    if not args.resume and args.method is None:
        raise CmkitError(f"--method is required: one of {', '.join(methods())}")
    if args.out is None and not args.print_config:
        raise CmkitError("--out is required: the run directory to write")
    options = {"data.name": args.data, "train.steps": args.steps, "train.batch_size": args.batch_size,
               "train.lr": args.lr, "train.seed": args.seed, "train.label_dropout": args.label_dropout,
               "train.device": args.device,
               "train.bf16": None if args.precision is None else args.precision == "bf16",
               "train.compile": None if args.compile is None else True, "train.compile_mode": args.compile}
    spec = get_method(args.method) if args.method is not None else None
    sets = list(args.set or [])
    if args.guidance == "none" and spec is not None and not args.resume:  # a resume refuses --guidance below
        args.guidance = None
        if "prompt_guidance" in default_config(spec.name)["objective"]:
            sets.append("objective.prompt_guidance=null")
    for flag, value, role, key, what in (
            ("--guidance", args.guidance, "guided", "objective.guidance", "--guidance (guided distillation)"),
            ("--teacher", args.teacher, "teacher", "teacher", "--teacher"),
            ("--init", args.init, "init", "init", "--init")):
        if value is None or spec is None:  # --resume without --method: the resume check refuses them
            continue
        if not getattr(spec, role):
            takers = [name for name, other in methods().items() if getattr(other, role)]
            raise CmkitError(f"{what} is only for --method {', '.join(takers)}")
        options[key] = value
    if args.resume:
        if args.print_config:
            raise CmkitError("--print-config shows a new run's config; a resumed run's is in its config.json")
        changed = [flag for flag, value in (("--data", args.data), ("--teacher", args.teacher), ("--init", args.init),
                                            ("--batch-size", args.batch_size), ("--lr", args.lr),
                                            ("--label-dropout", args.label_dropout), ("--guidance", args.guidance),
                                            ("--seed", args.seed), ("--config", args.config),
                                            ("--precision", args.precision),
                                            ("--set", args.set or None)) if value is not None]
        if changed:
            raise CmkitError(f"--resume continues a run with its saved config; only --steps may be given, not "
                             f"{', '.join(changed)} (and --device or --compile, to move the run to another machine)")
        config = {"method": args.method, "train": {} if args.steps is None else {"steps": args.steps}}
        # A machine's properties, not the run's: a run may move.
        for key in ("device", "compile", "compile_mode"):
            if options[f"train.{key}"] is not None:
                config["train"][key] = options[f"train.{key}"]
    else:
        config = build_config(args.method, config_file=args.config, sets=sets, preview=args.print_config,
                              **options)
        if args.print_config:
            from .training import preview_config
            config, note = preview_config(config)
            print(json.dumps(config, indent=2))
            if note:
                print(f"cmkit: note: {note}", file=sys.stderr)
            return
    out = train(config, args.out, resume=args.resume, force=args.force, progress=not args.quiet,
                own_signals=args.own_signals)
    if not args.quiet and not _rank_tag():
        print(f"run saved to {out}")


def cmd_sample(args) -> None:
    from .outputs import refuse_to_clobber, stream_samples, write_samples
    from .run import load_run

    out = Path(args.out)
    if out.suffix not in (".npy", ".npz", ".png"):
        raise CmkitError(f"--out must end in .npy, .npz or .png, got {out.name!r}")
    noise = _load_noise(args.noise) if args.noise else None
    if args.n is None:
        if noise is None:
            raise CmkitError("--n is required: the number of samples (or --noise FILE.npy, one per row)")
        args.n = len(noise)
    if args.n < 1:
        raise CmkitError(f"--n must be positive, got {args.n}")
    if noise is not None and len(noise) != args.n:
        raise CmkitError(f"--noise {args.noise} holds {len(noise)} rows but --n is {args.n}; drop --n to take "
                         "one sample per row")
    refuse_to_clobber(out, args.checkpoint)
    run = load_run(args.checkpoint, device=_device(args.device))
    if args.sampler and not run.is_diffusion:
        raise CmkitError("--sampler applies to teacher (edm) runs; consistency runs use --steps or --sigmas")
    churn = {"s_churn": args.s_churn, "s_tmin": args.s_tmin, "s_tmax": args.s_tmax, "s_noise": args.s_noise}
    chunks = run.sample_chunks(args.n, steps=args.steps, sigmas=args.sigmas, seed=args.seed, noise=noise,
                               sampler=args.sampler or "heun", class_labels=args.class_spec, guidance=args.guidance,
                               prompt=args.prompt,
                               batch_size=args.batch_size, bf16=args.bf16, compile=args.compile,
                               **(churn if args.s_churn else {}))
    from tqdm.auto import tqdm
    with tqdm(total=args.n, disable=args.quiet, desc="sample", unit="sample", dynamic_ncols=True, delay=2) as bar:
        def progress(chunks):
            for x in chunks:
                bar.update(len(x))
                yield x
        if out.suffix == ".npy":
            stream_samples(progress(chunks), args.n, run.image_shape, out, image=run.is_image)
        else:
            labels = run.labels(args.class_spec, args.n, args.seed)  # as sample_chunks draws them
            write_samples(np.concatenate(list(progress(chunks))), out, image=run.is_image,
                          title=_samples_title(run, args, labels),
                          labels=None if labels is None else labels.numpy())
    if not args.quiet:
        print(f"wrote {args.n} samples to {out}")


def _samples_title(run, args, labels) -> str:
    """"cd, 2 steps (sigma 80, 0.821), class 3, seed 0": what a figure of samples shows."""
    levels = [v for v in run.sigmas_for(args.steps, args.sigmas).tolist() if v > 0]
    if run.is_diffusion:
        title = f"{run.method}, Heun, {len(levels)} steps ({2 * len(levels) - 1} NFE)"
    else:
        count = f"{len(levels)} step" + ("s" if len(levels) > 1 else "")
        title = f"{run.method}, {count} (sigma {', '.join(f'{v:.3g}' for v in levels)})"
    if labels is not None:
        distinct = sorted(set(labels.tolist()))
        names = run.class_names or []
        name = lambda k: names[k] if k < len(names) else ("null" if k == run.num_classes else str(k))  # noqa: E731
        title += f", class {name(distinct[0])}" if len(distinct) == 1 else f", {len(distinct)} classes"
    prompts = getattr(args, "prompt", None)
    if prompts:
        title += f", prompt {prompts[0][:40]!r}" + (f" and {len(prompts) - 1} more" if len(prompts) > 1 else "")
    if args.guidance is not None:
        title += f", guidance {args.guidance:g}"
    return f"{title}, seed {args.seed}"


def _device(name: str) -> str:
    from .devices import resolve_device
    return resolve_device(name, "--device")


def _load_noise(path: str) -> np.ndarray:
    if not Path(path).is_file() or not path.endswith(".npy"):
        raise CmkitError(f"--noise must be an existing .npy file, got {path!r}")
    from .safe_io import load_npy
    noise = load_npy(path)
    if noise.dtype.kind != "f" or noise.ndim < 2 or not np.isfinite(noise).all():
        raise CmkitError(f"noise file {path} must hold finite floats of shape (n, *sample_shape), "
                         f"got {noise.dtype} {noise.shape}")
    return noise.astype(np.float32)


def cmd_export(args) -> None:
    from .run import load_run

    run = load_run(args.checkpoint)
    if args.format == "diffusers":
        from .export.diffusers_io import describe_export, export_diffusers
        if args.levels is not None and args.levels < 2:
            raise CmkitError(f"--levels must be at least 2, got {args.levels}")
        out = export_diffusers(run, args.out, levels=args.levels, clip_denoised=args.clip_denoised, force=args.force)
        if not args.quiet:
            print(describe_export(out))
        return
    if args.max_diff is not None and not args.max_diff >= 0:
        raise CmkitError(f"--max-diff must be >= 0, got {args.max_diff}")
    if args.format == "web":
        from .export.web import export_web
        out = export_web(run, args.out, precision=args.precision, max_diff=args.max_diff, seed=args.seed,
                         ort_web=args.ort_web, force=args.force)
        if not args.quiet:
            print(f"wrote the site {out}: serve it with the headers in {out / '_headers'} (cross-origin isolation "
                  f"for threads), e.g. cmkit serve-site {out}")
            if args.precision != "fp32":  # the same check as export onnx's
                from .export.precision import check_lines
                report = json.loads((out / "model.json").read_text())["precision_check"]
                print("\n".join(check_lines(args.precision, report)))
        return
    from .export.onnx import export_onnx, onnx_parity
    paths = export_onnx(run, args.out, with_f=args.with_f, guidance=args.guidance, precision=args.precision,
                        max_diff=args.max_diff, seed=args.seed, force=args.force)
    if not args.quiet:
        print(f"wrote {', '.join(map(str, paths))}")
    if args.precision != "fp32":
        if not args.quiet:
            from .export.precision import check_lines
            print("\n".join(check_lines(args.precision, json.loads(paths[1].read_text())["precision_check"])))
    elif not args.no_check:
        error = onnx_parity(run, paths[0], guidance=args.guidance)
        if error > 1e-4:
            raise CmkitError(f"onnxruntime differs from torch by {error:.2e} (relative); the export is not usable")
        if not args.quiet:
            print(f"onnxruntime matches torch at batch 1, 3 and 16 (max relative difference {error:.1e})")


def _serve_token(args) -> str | None:
    """The API token from --token, --token-file or the environment (one of them at most)."""
    from .safe_io import read_text
    given = [name for name, value in (("--token", args.token), ("--token-file", args.token_file),
                                      (f"${TOKEN_ENV}", os.environ.get(TOKEN_ENV))) if value]
    if len(given) > 1:
        raise CmkitError(f"give the token one way, not {' and '.join(given)}")
    token = args.token or (read_text(args.token_file, "token file", 4096).strip() if args.token_file else
                           os.environ.get(TOKEN_ENV))
    if token is not None and (len(token) < 16 or not token.isascii() or not token.isprintable() or " " in token):
        raise CmkitError("the token must be at least 16 printable ASCII characters without spaces "
                         "(python -c 'import secrets; print(secrets.token_urlsafe())' makes one)")
    return token


def _serve_access(args):
    """The `Access` of `serve` and `serve-site`: the token (`_serve_token`) and the host names
    answered besides loopback; a non-loopback --host needs a token or --insecure. Also checks the
    connection options."""
    import ipaddress

    from .serve.guard import Access
    from .validate import check_float, check_int
    check_int("--max-connections", args.max_connections, 1)
    check_float("--header-timeout", args.header_timeout, 0.1)
    token = _serve_token(args)
    try:
        address = ipaddress.ip_address(args.host.strip("[]"))
        loopback, wildcard = address.is_loopback, address.is_unspecified
    except ValueError:
        loopback, wildcard = args.host == "localhost", False
    if not loopback and token is None and not args.insecure:
        raise CmkitError(f"serving {args.host} reaches other machines: give a token (--token-file, ${TOKEN_ENV}) "
                         "or, on a network you trust, --insecure")
    allowed = tuple(args.allowed_host) + (() if loopback or wildcard else (args.host.strip("[]").lower(),))
    if wildcard and not args.allowed_host:
        print(f"cmkit: note: bound to {args.host}; clients must use a loopback name unless you add "
              "--allowed-host NAME for the names they reach this machine by", file=sys.stderr)
    return Access(token, allowed)


@contextlib.contextmanager
def _serve_extra(command: str):
    """Imports of the server's modules: a missing package is a one-line error."""
    try:
        yield
    except ImportError as e:
        raise CmkitError(f"cmkit {command} needs its extra: pip install 'cmkit[serve]' ({e.name} is missing)") from None


def cmd_serve(args) -> None:
    with _serve_extra("serve"):
        from .serve.app import create_app
        from .serve.engine import Limits
        from .serve.server import serve
    from .run import load_run
    from .validate import check_float, check_int

    check_int("--port", args.port, 1, 65535)
    check_int("--max-n", args.max_n, 1)
    check_int("--queue", args.queue, 1)
    check_float("--window-ms", args.window_ms, 0, 1000)
    check_float("--read-timeout", args.read_timeout, 0.1)
    check_float("--idle-timeout", args.idle_timeout, 0.1)
    check_float("--drain-timeout", args.drain_timeout, 0)
    access = _serve_access(args)
    run = load_run(args.checkpoint, device=_device(args.device))
    if args.preview_vae:
        run.use_preview(args.preview_vae)
    app = create_app(run, limits=Limits(max_n=args.max_n), access=access, window=args.window_ms / 1000,
                     max_queue=args.queue, read_timeout=args.read_timeout, docs=args.docs)
    where = f"http://{args.host}:{args.port}"
    print(f"cmkit: serving {args.checkpoint} on {where}" + (f" (open {where}/#token=YOUR_TOKEN)" if access.token
                                                             else ""), file=sys.stderr)
    serve(app, host=args.host, port=args.port, drain_timeout=args.drain_timeout, max_connections=args.max_connections,
          header_timeout=args.header_timeout, idle_timeout=args.idle_timeout)
    _exit_now()


def _exit_now() -> None:
    """Exit 0 without the interpreter's teardown: a stopped server has nothing left to write, and
    unloading torch and diffusers takes over a second of a stop that should be prompt."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def cmd_tune_sigmas(args) -> None:
    from .run import load_run
    from .tune import tune_sigmas

    run = load_run(args.checkpoint, device=_device(args.device))
    result = tune_sigmas(run, args.steps, data=args.data, n=args.n, seed=args.seed, metric=args.metric,
                         iterations=args.iterations, write=not args.dry_run)
    if not args.quiet:
        levels = lambda xs: ",".join(f"{x:.4g}" for x in xs)
        print(f"default {levels(result['default_sigmas'])}: {result['metric']} {result['default_score']:.4g}")
        print(f"tuned   {levels(result['sigmas'])}: {result['metric']} {result['score']:.4g} "
              f"({result['evaluations']} evaluations)")
        if not args.dry_run:
            print(f"stored in {Path(args.checkpoint) / 'config.json'}: `cmkit sample --steps {args.steps}` uses them")


def cmd_eval(args) -> None:
    from .evaluate import evaluate_run, format_results
    from .outputs import refuse_to_clobber

    if args.out:
        refuse_to_clobber(Path(args.out), args.checkpoint)
    import os
    result = evaluate_run(args.checkpoint, data=args.data, steps=args.steps, n=args.n, seed=args.seed,
                          guidance=args.guidance, metrics=args.metric, device=_device(args.device),
                          inception_weights=args.inception_weights or os.environ.get(INCEPTION_ENV),
                          progress=not args.quiet and not args.json)
    text = json.dumps(result, indent=2)
    if args.out:
        from .checkpoint import atomic_write_text
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), text + "\n")
    print(text if args.json else format_results(result))  # --quiet silences progress, never the result


def cmd_train_classifier(args) -> None:
    from .metrics.classifier import train_classifier

    if args.epochs < 1:
        raise CmkitError(f"--epochs must be positive, got {args.epochs}")
    result = train_classifier(args.out, root=args.root, epochs=args.epochs, seed=args.seed,
                              progress=not args.quiet)
    print(json.dumps(result, indent=2))


def cmd_data(args) -> None:
    from .data.tools import check_source, pack_folder

    if args.data_command == "encode":
        from .data.latent_cache import encode_source
        if args.batch_size < 1:
            raise CmkitError(f"--batch-size must be positive, got {args.batch_size}")
        out = encode_source(args.source, args.out, pipeline=args.pipeline, vae=args.vae,
                            captions=False if args.no_captions else None, caption_template=args.caption_template,
                            resolution=args.resolution, fit=args.fit, holdout_fraction=args.holdout_fraction,
                            seed=args.seed, batch_size=args.batch_size, text_embeddings=args.text_embeddings,
                            shard_mb=args.shard_mb, force=args.force)
        print(f"wrote the latent data set {out}")
        return 0
    if args.data_command == "pack":
        shards, skipped = pack_folder(args.folder, args.out, shard_size=args.shard_size, prefix=args.prefix,
                                      skip_bad=args.skip_bad)
        for where, why in skipped:
            print(f"skipped {where}: {why}", file=sys.stderr)
        last = shards[-1].name if len(shards) > 1 else ""
        print(f"wrote {len(shards)} shard(s) to {args.out}: {shards[0].name}{' .. ' + last if last else ''}"
              + (f" ({len(skipped)} unreadable image(s) left out)" if skipped else ""))
        return 0
    if args.limit is not None and args.limit < 1:
        raise CmkitError(f"--limit must be positive, got {args.limit}")
    report = check_source(args.source, limit=args.limit, grid=args.grid, seed=args.seed)
    print("\n".join(report.lines()))
    if args.grid:
        print(f"grid: {args.grid}")
    return 1 if report.bad else 0  # a script can tell a clean source from one with problems


def cmd_edit(args) -> None:
    from .editing.cli import cmd_edit as run_edit

    run_edit(args, _device(args.device))


def cmd_demo(args) -> None:
    from .demo import run_demo

    out = args.out or f"runs/demo-{args.data}"
    run_demo(out, data=args.data, seed=args.seed, force=args.force, resume=args.resume, progress=not args.quiet,
             own_signals=args.own_signals, steps=None if args.steps is None else tuple(args.steps))


def cmd_serve_site(args) -> None:
    with _serve_extra("serve-site"):
        from .serve.static_site import serve_site
    from .validate import check_int

    check_int("--port", args.port, 0, 65535)
    access = _serve_access(args)
    serve_site(args.site, args.host, args.port, access=access, max_connections=args.max_connections,
               header_timeout=args.header_timeout)
    _exit_now()


COMMANDS = {"serve-site": cmd_serve_site, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export, "tune-sigmas": cmd_tune_sigmas, "serve": cmd_serve, "train-classifier": cmd_train_classifier,
            "edit": cmd_edit, "demo": cmd_demo, "data": cmd_data}


def _rank_tag() -> str:
    """' (rank N)' in a torchrun worker other than rank 0, so that its messages can be told apart."""
    import os
    rank = os.environ.get("RANK", "0")
    return f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and rank != "0" else ""


def main(argv: list[str] | None = None, *, own_signals: bool = False) -> int:
    """Run a command; the exit status. ``own_signals`` (the `cmkit` program itself, `entry`): a
    stopped training run returns 128 + the signal, and Ctrl-C returns 130. Called from Python
    (a script, a test), SIGINT and SIGTERM reach the caller as they would without cmkit."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        args = (build_parser() if command in COMMAND_HELP else summary_parser()).parse_args(argv)
        args.own_signals = own_signals
        status = COMMANDS[args.command](args)  # an int reports findings (data check: 1 for problems)
    except CmkitError as e:
        one_line = str(e).replace("\r", "\\r").replace("\n", "\\n")
        print(f"cmkit: error{_rank_tag()}: {one_line}", file=sys.stderr)
        return 2
    except Stopped as e:  # pre-emption: a checkpoint was saved
        if not _rank_tag():  # every rank stops at the same step: rank 0 says so
            print(f"cmkit: {e}; a checkpoint was saved there: continue with --resume", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # `cmkit ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # unwritable --out, a full disk, a path that is a directory
        print(f"cmkit: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not own_signals:
            raise
        print("cmkit: interrupted; a training run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0


def entry() -> None:
    """The `cmkit` program."""
    raise SystemExit(main(own_signals=True))
