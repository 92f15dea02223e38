"""Evaluate a run's samples against held-out data, beside the data-vs-data floor.

The floor (training data scored against the same held-out reference) depends only on the data,
the reference size, the seed and the metrics, not on the model, and it is often most of the
time an evaluation takes. It is cached in the run directory (FLOOR_CACHE), keyed by all of those
and by a fingerprint of the data's content.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager

import numpy as np
import torch

from .checkpoint import FLOOR_CACHE, atomic_write_text
from .data import TOY_TRUTH, ImageData, LatentData, load_dataset, load_vectors
from .errors import CmkitError, warn
from .metrics import energy_distance, sliced_wasserstein
from .run import Run, load_run


def reference_data(run: Run, data: str | None):
    """The data to compare against: the run's own train/held-out split, or that of ``data``."""
    d = run.config["data"]
    own = data is None or data == d["name"]
    vectors = load_vectors(d["name"] if own else data, n=d["n"], n_holdout=d["n_holdout"],
                           holdout_fraction=d["holdout_fraction"], seed=d["seed"])
    if vectors.dim != run.dim:
        raise CmkitError(f"data has {vectors.dim} dimensions but the run generates {run.dim}")
    return vectors


def sample_metrics(samples: np.ndarray, reference: np.ndarray, truth=None, seed: int = 0) -> dict:
    out = {"sw1": sliced_wasserstein(samples, reference, seed=seed),
           "energy": energy_distance(samples, reference)}
    if truth is not None:  # exact: the true density of the samples
        out["true_nll"] = float(-truth.log_prob(torch.from_numpy(samples)).mean())
    return out


FLOOR_DRAWS = 5


def floor_metrics(vectors, reference: np.ndarray, truth, seed: int) -> dict:
    """Training data vs the held-out reference, at the reference's size: what a perfect model
    would score. The median over FLOOR_DRAWS training subsets (single draws vary by 2x at
    n = 5,000 on moons), with the SW1 range beside it."""
    rng = np.random.default_rng([seed, 3])
    draws = [sample_metrics(vectors.train[rng.permutation(len(vectors.train))[:len(reference)]],
                            reference, truth, seed) for _ in range(FLOOR_DRAWS)]
    floor = {key: float(np.median([d[key] for d in draws])) for key in draws[0]}
    floor["sw1_range"] = [min(d["sw1"] for d in draws), max(d["sw1"] for d in draws)]
    return floor


def cached_floor(run: Run, key: dict, compute) -> dict:
    """``compute()``, or the value cached for ``key`` in the run directory (unreadable or
    unwritable caches are ignored: the floor is recomputed)."""
    from .safe_io import read_json
    path, text = run.path / FLOOR_CACHE, json.dumps(key, sort_keys=True)
    try:
        cache = read_json(path, "floor cache") if path.is_file() else {}
    except CmkitError:
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(text), dict):
        return cache[text]
    value = compute()
    cache = {**(cache if isinstance(cache, dict) else {}), text: value}
    try:
        atomic_write_text(path, json.dumps(cache, indent=1) + "\n")
    except OSError:  # a read-only run (an imported folder): no cache
        pass
    return value


def _digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


class _Stages:
    """A progress bar over an evaluation's stages (the floor, then each step count), with tqdm's
    estimate of the time left; silent when ``progress`` is off."""

    def __init__(self, total: int, progress: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=total, disable=not progress, desc="eval", unit="stage", dynamic_ncols=True)

    @contextmanager
    def stage(self, name: str):
        self.bar.set_postfix_str(name)
        yield
        self.bar.update(1)

    def close(self):
        self.bar.close()


def format_results(result: dict) -> str:
    """An evaluation as a table: the floor, then one row per step count."""
    skip = {"steps", "nfe", "seconds", "class_accuracy_per_class", "sw1_range"}
    keys = [k for k in result["results"][0] if k not in skip] if result["results"] else []
    widths = [max(14, len(k) + 2) for k in keys]  # a space before every header, however long
    head = f"{'':<16}{'NFE':>5}{'seconds':>9}" + "".join(f"{k:>{w}}" for k, w in zip(keys, widths))
    fmt = lambda v, w: f"{v:>{w}.4g}" if isinstance(v, (int, float)) else f"{'-':>{w}}"  # noqa: E731
    rows = [f"{'data (floor)':<16}{'-':>5}{'-':>9}" + "".join(fmt(result["floor"].get(k), w)
                                                            for k, w in zip(keys, widths))]
    for r in result["results"]:
        rows.append(f"{str(r['steps']) + ' step' + ('s' if r['steps'] > 1 else ''):<16}{r['nfe']:>5}"
                    f"{r['seconds']:>9.2f}" + "".join(fmt(r.get(k), w) for k, w in zip(keys, widths)))
    title = f"{result['method']} on {result['data']}, {result['n']} samples against as many held-out ones"
    return "\n".join([title, head, *rows])


def reference_labels(run: Run, labels, index) -> torch.Tensor | None:
    """The labels to sample a conditional run with: those of the reference points, so that the
    samples' class mix is the reference's (random classes when the reference has none)."""
    if not run.num_classes or labels is None:
        return None
    return torch.as_tensor(labels)[torch.as_tensor(index)]


def evaluate_run(checkpoint: str, *, data: str | None = None, steps: list[int] | None = None,
                 n: int = 10000, seed: int = 0, metrics: list[str] | None = None,
                 inception_weights: str | None = None, device: str = "cpu", guidance: float | None = None,
                 progress: bool = False) -> dict:
    """Sample the run at each step count and score the samples against held-out data, beside
    the score of real training data (the floor). Vector runs: SW1, energy distance (and the exact
    NLL on toys). Image runs: ``metrics`` out of fd, pr, fid (default fd); conditional Fashion-MNIST
    runs also the feature classifier's accuracy on the samples' requested classes. A conditional
    run samples with the reference's labels, at classifier-free guidance ``guidance``."""
    if n < 2:
        raise CmkitError(f"--n must be at least 2, got {n}")
    run = load_run(checkpoint, device=device)
    if run.is_image:
        return evaluate_image_run(run, data=data, steps=steps, n=n, seed=seed, metrics=metrics or ["fd"],
                                  inception_weights=inception_weights, guidance=guidance, progress=progress)
    if metrics:
        raise CmkitError("--metric applies to image runs; vector runs report sw1, energy (and true_nll on toys)")
    vectors = reference_data(run, data)
    if len(vectors.holdout) < 2:
        raise CmkitError(f"{vectors.name} holds out {len(vectors.holdout)} row(s); evaluation needs at least 2")
    truth = TOY_TRUTH.get(vectors.name)
    index = np.random.default_rng([seed, 4]).permutation(len(vectors.holdout))[:n]
    reference = vectors.holdout[index]
    labels = reference_labels(run, vectors.holdout_labels, index)
    steps = steps or ([18] if run.is_diffusion else [1, 2])
    stages = _Stages(len(steps) + 1, progress)
    key = {"data": vectors.name, "n": len(reference), "seed": seed, "content": _digest(vectors.train, reference)}
    with stages.stage("floor"):
        floor = cached_floor(run, key, lambda: floor_metrics(vectors, reference, truth, seed))
    result = {"checkpoint": str(checkpoint), "method": run.method, "data": vectors.name,
              "n": len(reference), "floor": floor, "results": []}
    if guidance is not None:
        result["guidance"] = guidance
    for s in steps:
        with stages.stage(f"{s} step(s)"):
            start = time.perf_counter()
            samples = run.sample(len(reference), steps=s, seed=seed, class_labels=labels, guidance=guidance)
            seconds = time.perf_counter() - start
            nfe = 2 * s - 1 if run.is_diffusion else s
            result["results"].append({"steps": s, "nfe": nfe, "seconds": round(seconds, 4),
                                      **sample_metrics(samples, reference, truth, seed)})
    stages.close()
    return result


IMAGE_METRICS = ("fd", "pr", "fid")


class ImageScorer:
    """Features of real held-out images computed once; scores any uint8 image set against them."""

    def __init__(self, reference: np.ndarray, metrics: list[str], native_size: int | None,
                 inception_weights: str | None = None, device: str = "cpu"):
        from .metrics.classifier import extract_features, load_classifier

        unknown = sorted(set(metrics) - set(IMAGE_METRICS))
        if unknown:
            raise CmkitError(f"unknown metric {unknown[0]!r}; image metrics: {', '.join(IMAGE_METRICS)}")
        self.metrics, self.native_size = metrics, native_size
        self.classifier = load_classifier() if {"fd", "pr"} & set(metrics) else None
        self._extract = lambda images: extract_features(self.classifier, images, native_size)
        self.inception = None
        if "fid" in metrics:
            from .metrics.inception import load_fid_inception
            self.inception = load_fid_inception(inception_weights).to(device)
        self.reference = self._features(reference)

    def _features(self, images) -> dict:
        out = {}
        if self.classifier is not None:
            out["classifier"] = self._extract(images)
        if self.inception is not None:
            from .metrics.inception import inception_features
            out["inception"] = inception_features(self.inception, images)
        return out

    def score(self, images) -> dict:
        from .metrics import frechet_distance_features, precision_recall

        feats, ref, out = self._features(images), self.reference, {}
        if "fd" in self.metrics:
            out["fd"] = frechet_distance_features(feats["classifier"], ref["classifier"])
        if "pr" in self.metrics:
            out.update(precision_recall(ref["classifier"], feats["classifier"], k=3))
        if "fid" in self.metrics:
            out["fid"] = frechet_distance_features(feats["inception"], ref["inception"])
        return out


# Below a feature space's dimension the sample covariance is singular: a Frechet distance then
# measures the sample size more than the model, and k-NN precision/recall is as unsettled.
MIN_SAMPLES = {"fd": 128, "pr": 128, "fid": 2048}  # classifier features: 128 dims; Inception's: 2048


def _small_sample_note(n: int, metrics: list[str]) -> str | None:
    short = [m for m in metrics if n < MIN_SAMPLES[m]]
    if not short:
        return None
    need = max(MIN_SAMPLES[m] for m in short)
    return (f"{', '.join(short)} from {n} held-out images: below {need} (the features' dimension) the scores "
            "mostly measure the sample size; read them only beside the floor, or evaluate on more images "
            "(10,000 for numbers to publish)")


def evaluate_image_run(run: Run, *, data: str | None, steps: list[int] | None, n: int, seed: int,
                       metrics: list[str], inception_weights: str | None = None, guidance: float | None = None,
                       progress: bool = False) -> dict:
    d = run.config["data"]
    images = load_dataset(d, name=data)
    latent = isinstance(images, LatentData)
    if not isinstance(images, (ImageData, LatentData)) or images.shape != run.shape:
        got = images.shape if isinstance(images, (ImageData, LatentData)) else f"vectors of {images.dim} dimensions"
        raise CmkitError(f"reference data has shape {got} but the run generates {run.shape}")
    recorded = run.config.get("data_fingerprint")
    if (data is None or data == d["name"]) and recorded is not None and images.fingerprint() != recorded:
        raise CmkitError(f"{images.name} changed since the run trained on it (other images, or another held-out "
                         "split): its held-out images may have been trained on; pass --data for other reference data")
    rng = np.random.default_rng([seed, 4])
    index = torch.from_numpy(rng.permutation(len(images.holdout))[:n])
    # A latent set: samples are decoded and compared with the held-out images themselves.
    reference = images.holdout_images[index] if latent else images.holdout[index]
    labels = reference_labels(run, images.holdout_labels, index)
    prompts = None
    if latent and run.takes_text:  # the held-out images' own captions
        prompts = [images.captions[int(i)] for i in images.holdout_text_ids[index]]
    n = len(reference)
    if n < 4:
        raise CmkitError(f"{images.name} holds out only {n} images; image metrics need more")
    small_n = _small_sample_note(n, metrics)
    steps = steps or ([18] if run.is_diffusion else [1, 2])
    stages = _Stages(len(steps) + 1, progress)
    with stages.stage("reference features and floor"):
        native_size = images.meta.get("native_size") if latent else images.native_size
        scorer = ImageScorer(reference, metrics, native_size, inception_weights, run.device)
        train = images.train[torch.from_numpy(rng.permutation(len(images.train))[:n])]
        if latent:  # the floor: training latents through the decoder (what a perfect latent model reaches)
            train = torch.from_numpy(run.scaler.to_data(train))
        key = {"data": images.name, "n": n, "seed": seed, "metrics": sorted(metrics),
               "content": _digest(np.asarray(train), np.asarray(reference))}
        floor = cached_floor(run, key, lambda: scorer.score(train))
    result = {"checkpoint": str(run.path), "method": run.method, "data": images.name, "n": n,
              "floor": floor, "results": []}
    if len(train) < n:
        result["floor_note"] = f"floor from {len(train)} training images, fewer than n"
    if small_n:
        result["n_note"] = small_n
        warn(small_n)
    if guidance is not None:
        result["guidance"] = guidance
    # The feature classifier knows Fashion-MNIST's classes only. A text run's prompts name the class of
    # the held-out image they caption: the classifier's agreement with it is prompt agreement.
    source = images.meta.get("source") if latent else images.name
    if prompts is not None and images.holdout_labels is not None:
        judged = images.holdout_labels[index]
    else:
        judged = labels
    judge_classes = judged is not None and source == "fashion-mnist" and scorer.classifier is not None
    for s in steps:
        with stages.stage(f"{s} step(s)"):
            start = time.perf_counter()
            samples = run.sample(n, steps=s, seed=seed, class_labels=labels, guidance=guidance, prompt=prompts)
            seconds = time.perf_counter() - start
            nfe = 2 * s - 1 if run.is_diffusion else s
            row = {"steps": s, "nfe": nfe, "seconds": round(seconds, 4), **scorer.score(samples)}
            if judge_classes:
                row.update(class_accuracy(scorer.classifier, samples, judged, native_size,
                                          run.num_classes or len(images.class_names or []) or 10))
            result["results"].append(row)
    stages.close()
    return result


def class_accuracy(classifier, samples, labels: torch.Tensor, native_size: int | None, num_classes: int) -> dict:
    """How often the classifier sees the requested class: overall and per class."""
    from .metrics.classifier import predict

    hit = (predict(classifier, torch.from_numpy(samples), native_size) == labels).float()
    per_class = [round(float(hit[labels == k].mean()), 4) if bool((labels == k).any()) else None
                 for k in range(num_classes)]
    return {"class_accuracy": round(float(hit.mean()), 4), "class_accuracy_per_class": per_class}
