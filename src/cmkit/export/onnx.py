"""ONNX export: the one-step generator, and optionally the consistency function for multistep.

    cmkit export onnx --checkpoint runs/cd --out cd.onnx [--with-f]

writes
    cd.onnx      noise (B, *shape) float32 [, class_labels (B,) int64]  ->  samples in data units
                 (vectors: the data's units; images: 0..255 floats, NCHW)
    cd-f.onnx    x (B, *shape), sigma (B,) [, class_labels]  ->  f(x, sigma) in model units
    cd.json      what a runtime needs besides: shapes, sigma_min/max and rho (the Karras axis), the
                 data map, default levels, the precision and its check against fp32

with a dynamic batch axis. ``--precision fp16|int8`` writes smaller graphs with the same float32
inputs and outputs (`precision.py`), checked against fp32 before they are written.
examples/onnx_sample.py samples with onnxruntime and numpy alone.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..condition import Condition
from ..data import scaler_from_state
from ..errors import CmkitError
from ..run import default_consistency_sigmas
from . import precision as precision_tools

OPSET = 17  # GroupNorm as a single op; onnxruntime 1.14+ runs it


class OneStepGenerator(nn.Module):
    """noise -> f(sigma_max noise, sigma_max) -> data units (the run's own scaler, unrounded)."""

    def __init__(self, model: nn.Module, sigma_max: float, scaler_state: dict):
        super().__init__()
        self.model, self.sigma_max = model, float(sigma_max)
        self.scaler = scaler_from_state(scaler_state)

    def forward(self, noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = torch.full((noise.shape[0],), self.sigma_max, dtype=noise.dtype, device=noise.device)
        return self.scaler.to_data_tensor(self.model(noise * self.sigma_max, sigma, Condition(labels=class_labels)))


class ConsistencyStep(nn.Module):
    """(x, sigma) -> f(x, sigma), model units."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, sigma, class_labels=None):
        return self.model(x, sigma, Condition(labels=class_labels))


def _export(module: nn.Module, args: tuple, names: list[str], path: Path) -> None:
    axes = {name: {0: "batch"} for name in [*names, "output"]}
    kwargs = dict(input_names=names, output_names=["output"], dynamic_axes=axes, opset_version=OPSET)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        try:  # the TorchScript exporter: seconds, no onnxscript needed (torch >= 2.5 takes dynamo=)
            torch.onnx.export(module, args, str(path), dynamo=False, **kwargs)
        except TypeError:
            torch.onnx.export(module, args, str(path), **kwargs)


def export_onnx(run, out: str | Path, *, with_f: bool = False, guidance: float | None = None,
                precision: str = "fp32", max_diff: float | None = None, seed: int = 0,
                force: bool = False) -> list[Path]:
    """Write the run's one-step generator (and with ``with_f`` its f(x, sigma)) at ``precision``;
    return the paths. fp16 and int8 are checked against fp32 before anything is written: a mean
    pixel difference above ``max_diff`` (default `precision.MAX_MEAN_DIFF`) or a NaN is an error.
    Existing files are replaced (each by a rename) only with ``force``."""
    if getattr(run, "is_latent", False):
        raise CmkitError("export onnx writes pixel-space generators; a latent run's decoder and prompt encoder are "
                         "not exported yet (export diffusers writes a text-conditioned one for diffusers)")
    if "onnx" not in run.export_formats:
        raise CmkitError("export onnx takes a consistency model (one network call per step); this is an "
                         f"{run.method} teacher")
    if precision not in precision_tools.PRECISIONS:
        raise CmkitError(f"--precision must be one of {', '.join(precision_tools.PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and run.config["standardizer"].get("kind") != "image":
        raise CmkitError(f"--precision {precision} is for image models; this one makes vectors (its fp32 file is "
                         "small already)")
    out = Path(out)
    if out.suffix != ".onnx":
        raise CmkitError(f"--out must end in .onnx, got {out.name!r}")
    paths = [out, out.with_name(out.stem + ".json")] + ([out.with_name(out.stem + "-f.onnx")] if with_f else [])
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CmkitError(f"refusing to overwrite {', '.join(existing)}: pass --force to replace them, or another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.stem}.") as tmp:
        tmp = Path(tmp)
        meta = _export_fp32(run, tmp, with_f, guidance)
        graphs = ["fp32.onnx", "fp32-f.onnx" if with_f else None]
        if precision != "fp32":
            graphs, meta["precision_check"] = _lower_precision(meta, tmp, graphs, precision, max_diff, seed)
        meta.update(precision=precision, consistency_function=paths[2].name if with_f else None)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for name, path in zip([graphs[0], "meta.json", graphs[1]], paths):
            os.replace(tmp / name, path)
    return paths


def _export_fp32(run, folder: Path, with_f: bool, guidance: float | None) -> dict:
    """fp32.onnx (and fp32-f.onnx) in ``folder``; returns the export's JSON."""
    model = run.network(guidance, None).cpu().eval()
    conditional = run.num_classes > 0
    batch = 2
    noise = torch.randn(batch, *run.shape)
    labels = (torch.arange(batch) % run.num_classes,) if conditional else ()
    names = ["noise", "class_labels"][:1 + conditional]
    _export(OneStepGenerator(model, run.noise_range.sigma_max, run.config["standardizer"]).eval(), (noise, *labels),
            names, folder / "fp32.onnx")
    if with_f:
        sigma = torch.full((batch,), 1.0)
        _export(ConsistencyStep(model).eval(), (noise, sigma, *labels), ["x", "sigma", *names[1:]],
                folder / "fp32-f.onnx")
    return {"method": run.method, "shape": list(run.shape), "inputs": names, "sigma_min": run.noise_range.sigma_min,
            "sigma_max": run.noise_range.sigma_max, "rho": run.noise_range.rho, "num_classes": run.num_classes,
            "class_names": run.class_names,
            "standardizer": run.config["standardizer"],
            "multistep_sigmas": {str(k): default_consistency_sigmas(k, run.noise_range, run.sampling_floor)
                                 for k in (2, 3, 4)}}


def _lower_precision(meta: dict, folder: Path, fp32: list, precision: str, max_diff: float | None,
                     seed: int) -> tuple[list, dict]:
    """The fp16 or int8 graphs beside the fp32 ones, checked against them: (their names, the check)."""
    reference = precision_tools.OnnxSampler(folder, meta, *fp32)
    lowered = [f"{precision}.onnx", f"{precision}-f.onnx" if fp32[1] else None]
    kept = []
    for src, dst, kind in zip(fp32, lowered, ("generator", "f")):
        if src is None:
            continue
        if precision == "fp16":
            precision_tools.to_fp16(folder / src, folder / dst)
            continue
        feeds = (precision_tools.generator_calibration(meta, seed) if kind == "generator" else
                 precision_tools.f_calibration(meta, reference, seed))
        kept += precision_tools.quantize_int8(folder / src, folder / dst, feeds)
    bound = precision_tools.MAX_MEAN_DIFF[precision] if max_diff is None else max_diff
    report = precision_tools.check(reference, precision_tools.OnnxSampler(folder, meta, *lowered),
                                   precision=precision, bound=bound, seed=seed)
    if precision == "int8":
        report["float_nodes"] = sorted(set(kept))
    return lowered, report


def onnx_parity(run, path: str | Path, batch_sizes=(1, 3, 16), guidance: float | None = None, seed: int = 0) -> float:
    """Largest relative difference between onnxruntime and torch over ``batch_sizes`` (needs
    onnxruntime)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CmkitError("checking an ONNX export needs onnxruntime: pip install 'cmkit[onnx]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    torch_model = OneStepGenerator(run.network(guidance, None).cpu().eval(), run.noise_range.sigma_max,
                                   run.config["standardizer"])
    gen, worst = torch.Generator().manual_seed(seed), 0.0
    for b in batch_sizes:
        noise = torch.randn(b, *run.shape, generator=gen)
        feeds = {"noise": noise.numpy()}
        labels = None
        if run.num_classes:
            labels = torch.randint(0, run.num_classes, (b,), generator=gen)
            feeds["class_labels"] = labels.numpy()
        with torch.no_grad():
            ref = torch_model(noise, labels).numpy()
        got = session.run(None, feeds)[0]
        worst = max(worst, float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)))
    return worst
