"""`cmkit export web`: a static site that generates in the visitor's browser with onnxruntime-web.

    cmkit export web --checkpoint runs/fm-ect --out runs/site/ [--precision int8] [--force]

writes
    site/index.html, site/cmkit.js   the page and its module (window.cmkit.generate and .stroke for scripts)
    site/model.onnx, model-f.onnx    the one-step generator and f(x, sigma) (two steps, the live canvas)
    site/model.json                  what the page needs: shapes, levels and rho, classes, precision
    site/ort/                        onnxruntime-web's module and WebAssembly files, copied in
    site/_headers                    the cross-origin isolation headers, for hosts that read it

The page generates a grid of samples and has a live canvas: what the visitor draws is edited by
the model as they draw (stroke editing, `cmkit.editing.tasks.stroke` at a strength and 1 to 4
steps, computed in the browser with f(x, sigma); docs/edge.md).

Nothing is fetched from elsewhere: onnxruntime-web comes from the npm package pinned in the
repository (web/package.json and its lockfile), and the page's Content-Security-Policy allows its
own origin only. WebAssembly threads need cross-origin isolation (the COOP and COEP headers);
without them the page runs on one thread.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

from ..errors import CmkitError
from ..outputs import whole_folder
from ..safe_io import read_json
from .onnx import export_onnx

ORT_ENV = "CMKIT_ORT_WEB"
# The two builds the page picks from: WebGPU where the browser has an adapter, plain WebAssembly
# otherwise (the WebGPU build also runs on CPU, but its WebAssembly is twice the size and slower).
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
             "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")
PAGE_FILES = ("index.html", "cmkit.js")
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


def _repository_web() -> Path:
    return Path(__file__).resolve().parents[3] / "web"


def find_ort_web(given: str | Path | None = None) -> Path:
    """onnxruntime-web's dist folder: ``given``, $CMKIT_ORT_WEB, or the repository's web/node_modules."""
    candidates = [Path(given)] if given else ([Path(os.environ[ORT_ENV])] if os.environ.get(ORT_ENV) else
                                               [_repository_web() / "node_modules" / "onnxruntime-web" / "dist",
                                                Path("node_modules") / "onnxruntime-web" / "dist"])
    for folder in candidates:
        if all((folder / name).is_file() for name in ORT_FILES):
            return folder
    where = candidates[0]
    raise CmkitError(f"onnxruntime-web's files are not in {where}: run `npm ci --prefix web` in the cmkit repository "
                     f"(npm comes with Node.js), or pass --ort-web DIR (a node_modules/onnxruntime-web/dist folder)")


def ort_version(dist: Path) -> str | None:
    package = dist.parent / "package.json"
    return read_json(package, "onnxruntime-web package.json").get("version") if package.is_file() else None


def check_web_model(run) -> None:
    """What the page can run: a pixel-space consistency model (one network call per step)."""
    if getattr(run, "is_latent", False):
        raise CmkitError("export web runs pixel-space models; a latent model's VAE decoder is not exported yet")
    if "onnx" not in run.export_formats:
        raise CmkitError(f"export web takes a consistency model (one network call per step); this {run.method} "
                         "teacher needs 35 calls per image: distil it first (--method cd or ect)")
    if run.config["standardizer"].get("kind") != "image":
        raise CmkitError("export web writes a page that draws images; this model makes vectors")


def export_web(run, out: str | Path, *, precision: str = "fp32", max_diff: float | None = None, seed: int = 0,
               ort_web: str | Path | None = None, force: bool = False) -> Path:
    """Write the site to ``out`` (a new folder, or an old site with ``force``); return it."""
    check_web_model(run)
    dist = find_ort_web(ort_web)
    out = Path(out).resolve()
    if Path.cwd().resolve().is_relative_to(out):
        raise CmkitError(f"--out {out} holds the current directory: choose a new folder for the site")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (force and (out / "model.json").is_file()):
            raise CmkitError(f"{out} already exists" + (": pass --force to replace the site" if
                                                        (out / "model.json").is_file() else
                                                        " and is not a cmkit site: choose another --out"))
    with whole_folder(out) as tmp:
        export_onnx(run, tmp / "model.onnx", with_f=True, precision=precision, max_diff=max_diff, seed=seed)
        meta = json.loads((tmp / "model.json").read_text())
        meta.update(ort_web=ort_version(dist), default_steps=1, max_batch=64)
        (tmp / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
        site = resources.files("cmkit.export") / "site"
        for name in PAGE_FILES:
            (tmp / name).write_bytes((site / name).read_bytes())
        (tmp / "ort").mkdir()
        for name in ORT_FILES:
            shutil.copyfile(dist / name, tmp / "ort" / name)
        headers = "".join(f"  {k}: {v}\n" for k, v in ISOLATION_HEADERS.items())
        (tmp / "_headers").write_text(f"/*\n{headers}")  # Netlify's and Cloudflare Pages' format
    return out


__all__ = ["ISOLATION_HEADERS", "check_web_model", "export_web", "find_ort_web"]
