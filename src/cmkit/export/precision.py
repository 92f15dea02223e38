"""fp16 and int8 variants of an exported ONNX generator, each checked against fp32 on shared noise.

- fp16: onnxruntime's float16 converter with float32 inputs and outputs kept, so one runtime
  (and one page) takes every variant. Measured on the tiny and small presets, no op needed to be
  kept in float beyond the converter's own list (at most 0.11 levels from fp32, docs/benchmarks.md).
- int8: static QDQ quantization with onnxruntime's quantization tools, weights per channel (int8),
  activations uint8 (the fast path on x86 with VNNI), only Conv, MatMul and Gemm quantized: the
  other ops gained no speed and doubled the error (docs/design.md). The first and last convolution
  stay in float: they carry the image itself, and on the digits model leaving them cut the mean
  pixel error from 0.93 to 0.76 levels for 0.4% of the file. Calibration is seeded noise: the
  one-step graph sees noise at sigma_max only; the f graph sees the fp32 one-step samples
  re-noised to each of its multistep levels.

`OnnxSampler` samples from the graphs as `examples/onnx_sample.py` and the web page do; `check`
compares a variant with fp32 through it, and a NaN or a difference above the bound is an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path

import numpy as np

from ..errors import CmkitError

PRECISIONS = ("fp32", "fp16", "int8")
# The default bounds on the mean absolute pixel difference from fp32 (0..255 levels), above what
# was measured (docs/benchmarks.md: fp16 at most 0.11, int8 at most 1.63 on the digits and
# Fashion-MNIST models) and below a broken calibration's (4.7 with all-zero inputs).
MAX_MEAN_DIFF = {"fp32": 0.0, "fp16": 0.5, "int8": 2.5}
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
CHECK_SAMPLES = 64
CALIBRATION_BATCHES, CALIBRATION_BATCH = 8, 16


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's own warnings (unused initializers) are not the user's
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxSampler:
    """The exported graphs of ``meta`` (the export's JSON) in ``folder``: ``sample(noises, labels)``
    with one standard-normal array per step, as the page and examples/onnx_sample.py sample.
    Images come back in 0..255 floats (clipped, unrounded)."""

    def __init__(self, folder: Path, meta: dict, generator: str, f: str | None = None, threads: int | None = None):
        self.meta = meta
        self.generator = _session(Path(folder) / generator, threads)
        self.f = _session(Path(folder) / f, threads) if f else None

    def _labels(self, feeds: dict, labels) -> dict:
        if self.meta["num_classes"]:
            feeds["class_labels"] = np.asarray(labels, dtype=np.int64)
        return feeds

    def sample(self, noises: list[np.ndarray], labels=None) -> np.ndarray:
        steps = len(noises)
        x = self.generator.run(None, self._labels({"noise": noises[0]}, labels))[0]
        if steps > 1:
            if self.f is None:
                raise CmkitError("sampling in more than one step needs the consistency function (--with-f)")
            sigmas = self.meta["multistep_sigmas"][str(steps)]
            x = x / 127.5 - 1
            for sigma, z in zip(sigmas[1:], noises[1:]):
                xs = (x + math.sqrt(sigma**2 - self.meta["sigma_min"] ** 2) * z).astype(np.float32)
                feeds = self._labels({"x": xs, "sigma": np.full(len(xs), sigma, np.float32)}, labels)
                x = self.f.run(None, feeds)[0]
            x = (x + 1) * 127.5
        return np.clip(x, 0, 255)


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime's quantizer logs a warning per node through the root logger; a user gets the
    check's numbers instead."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def float_nodes(path: Path) -> list[str]:
    """The nodes int8 leaves in float: the first and the last convolution."""
    import onnx

    convs = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"]
    return sorted({convs[0], convs[-1]}) if convs else []


def quantize_int8(src: Path, dst: Path, calibration: list[dict]) -> list[str]:
    """``src`` quantized into ``dst`` (QDQ, per channel) with ``calibration`` as the activations'
    inputs; returns the nodes left in float."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    with _quiet_quantizer():
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
            keep = float_nodes(prepared)
            quantize_static(str(prepared), str(dst), Feeds(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=list(QUANTIZED_OPS), nodes_to_exclude=keep)
        finally:
            prepared.unlink(missing_ok=True)
    return keep


def noise(meta: dict, n: int, steps: int, seed: int) -> tuple[list[np.ndarray], np.ndarray | None]:
    """(one standard-normal array per step, labels cycling over the classes) from ``seed``."""
    rng = np.random.default_rng([seed, 11])
    noises = [rng.standard_normal((n, *meta["shape"])).astype(np.float32) for _ in range(steps)]
    labels = np.arange(n) % meta["num_classes"] if meta["num_classes"] else None
    return noises, labels


def generator_calibration(meta: dict, seed: int) -> list[dict]:
    """The one-step graph's calibration feeds: seeded noise (it sees sigma_max only)."""
    feeds = []
    for b in range(CALIBRATION_BATCHES):
        noises, labels = noise(meta, CALIBRATION_BATCH, 1, seed + 1000 + b)
        feeds.append({"noise": noises[0], **({"class_labels": labels} if labels is not None else {})})
    return feeds


def f_calibration(meta: dict, fp32: OnnxSampler, seed: int) -> list[dict]:
    """The f graph's: the fp32 one-step samples from seeded noise, re-noised to each multistep level."""
    levels = sorted({s for k, sigmas in meta["multistep_sigmas"].items() for s in sigmas[1:]})
    feeds = []
    for b in range(CALIBRATION_BATCHES):
        noises, labels = noise(meta, CALIBRATION_BATCH, 2, seed + 2000 + b)
        x0 = fp32.sample(noises[:1], labels) / 127.5 - 1
        sigma = levels[b % len(levels)]
        x = (x0 + math.sqrt(sigma**2 - meta["sigma_min"] ** 2) * noises[1]).astype(np.float32)
        feeds.append({"x": x, "sigma": np.full(len(x), sigma, np.float32),
                      **({"class_labels": labels} if labels is not None else {})})
    return feeds


def check(reference: OnnxSampler, candidate: OnnxSampler, *, precision: str, bound: float, seed: int = 0) -> dict:
    """The candidate's samples against the fp32 reference's on the same noise (1 step, and 2 with
    the f graph): {"steps": {k: {"max", "mean"}}, "bound"}; a NaN or a mean difference above
    ``bound`` is an error."""
    meta, report = reference.meta, {}
    for steps in (1, 2) if reference.f is not None else (1,):
        noises, labels = noise(meta, CHECK_SAMPLES, steps, seed)
        a, b = reference.sample(noises, labels), candidate.sample(noises, labels)
        if not np.isfinite(a).all():
            raise CmkitError(f"the fp32 model itself gives NaN or inf at {steps} step(s): the run is not usable")
        if not np.isfinite(b).all():
            raise CmkitError(f"the {precision} model gives NaN or inf at {steps} step(s) where fp32 does not: it "
                             "is not usable (nothing written)")
        diff = np.abs(a - b)
        report[str(steps)] = {"max": round(float(diff.max()), 4), "mean": round(float(diff.mean()), 4)}
        if not diff.mean() <= bound:
            raise CmkitError(f"the {precision} model's pixels differ from fp32's by {diff.mean():.2f} levels on "
                             f"average at {steps} step(s) (max {diff.max():.1f}), above the bound {bound} "
                             "(--max-diff): nothing written")
    return {"samples": CHECK_SAMPLES, "bound_mean": bound, "steps": report}


def check_lines(precision: str, report: dict) -> list[str]:
    """What an export prints of its `check` report: one line per step count. The bound is on the
    mean; the largest difference is one pixel's, not bounded (int8 can move a few pixels far)."""
    return [f"{precision} against fp32 at {steps} step(s), {report['samples']} samples: mean pixel difference "
            f"{d['mean']:.3f} (the bound {report['bound_mean']} is on this mean), largest on one pixel {d['max']:.2f} "
            "(0..255 levels)" for steps, d in report["steps"].items()]


__all__ = ["MAX_MEAN_DIFF", "OnnxSampler", "PRECISIONS", "check", "check_lines", "quantize_int8", "to_fp16"]
