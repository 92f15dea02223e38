"""The edge, measured side by side in one run: for the tiny and small UNet presets on 8x8 digits and
28x28 Fashion-MNIST, an EDM teacher and an ECT student from it (CPU-sized budgets below), then the
student exported by `cmkit export web` at fp32, fp16 and int8, and for each precision:

- the file size of the one-step graph (and its ratio to fp32);
- latency at batch 1 and 16: onnxruntime on the CPU with 1 and 2 threads, and headless Chromium's
  WebAssembly with 1 and 2 threads, timed by the page itself (window.cmkit.benchmark: median of
  10 runs after 2 warm-ups, 5 at batch 16);
- FD (cmkit's classifier features) at 1 and 2 steps against held-out images, beside the teacher's
  (18 Heun steps, 35 NFE) at the same n, and the pixel difference from fp32 the export measured;
- the time from opening the page to its first images (8 per page, 2 threads).

    python bench/edge.py [--out bench/out/edge] [--only digits-tiny,...] [--screenshot docs/edge-page.png]

About 45 minutes on 2 cores; needs chromium, chromium-driver and `npm ci --prefix web`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "tests"))

from cmkit.data import load_images  # noqa: E402
from cmkit.evaluate import ImageScorer, evaluate_run  # noqa: E402
from cmkit.export import precision  # noqa: E402

# (data, preset): teacher steps, student steps, batch, FD samples. Fashion-MNIST's small UNet costs
# about 5 s a step at batch 64 on 2 cores, so its models are barely trained: read its FD for the
# precisions' effect, not for quality.
CONFIGS = {
    "digits-tiny": ("digits", "tiny", 1500, 800, 128, 180),
    "digits-small": ("digits", "small", 300, 200, 64, 180),
    "fashion-mnist-tiny": ("fashion-mnist", "tiny", 1000, 500, 64, 1000),
    "fashion-mnist-small": ("fashion-mnist", "small", 120, 80, 32, 300),
}
PRECISIONS = ("fp32", "fp16", "int8")


def cmkit(*args) -> None:
    subprocess.run([sys.executable, "-m", "cmkit", *map(str, args)], check=True)


def train(out: Path, data: str, preset: str, teacher_steps: int, student_steps: int, batch: int) -> tuple[Path, Path]:
    teacher, student = out / "teacher", out / "ect"
    common = ["--data", data, "--batch-size", batch, "--quiet", "--set", "train.sample_every=0", "--seed", 0]
    if not (teacher / "latest").exists():
        cmkit("train", "--method", "edm", *common, "--set", f"model.preset={preset}", "--steps", teacher_steps,
              "--out", teacher, "--force")
    if not (student / "latest").exists():
        cmkit("train", "--method", "ect", *common, "--init", teacher, "--steps", student_steps, "--out", student,
              "--force")
    return teacher, student


def python_latency(site: Path, meta: dict, batch: int, threads: int, runs: int) -> float:
    session = precision._session(site / "model.onnx", threads)
    noises, labels = precision.noise(meta, batch, 1, seed=1)
    feeds = {"noise": noises[0], **({"class_labels": labels} if labels is not None else {})}
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        session.run(None, feeds)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def browser_measure(browser, url: str, threads: int) -> dict:
    browser.get(f"{url}?threads={threads}&backend=wasm")
    script = ("const done = arguments[arguments.length - 1]; (async () => { await window.cmkit.ready; "
              "const first = window.cmkit.firstImagesMs; const b1 = await window.cmkit.benchmark(1, 1, 10); "
              "const b16 = await window.cmkit.benchmark(16, 1, 5); return {first, b1, b16, "
              "isolated: crossOriginIsolated}; })().then(done, (e) => done({error: String(e)}));")
    result = browser.execute_async_script(script)
    if "error" in result or not result["isolated"]:
        raise RuntimeError(f"the page failed: {result}")
    return result


def fd_rows(site: Path, meta: dict, scorer: ImageScorer, n: int) -> dict:
    sampler = precision.OnnxSampler(site, meta, "model.onnx", meta["consistency_function"])
    noises, labels = precision.noise(meta, n, 2, seed=3)
    return {steps: scorer.score(sampler.sample(noises[:steps], labels).round().astype(np.uint8))["fd"]
            for steps in (1, 2)}


def measure(name: str, out: Path, browser, screenshot: Path | None) -> list[dict]:
    from cmkit.serve.static_site import serve_in_thread

    data, preset, teacher_steps, student_steps, batch, n = CONFIGS[name]
    out = out / name
    start = time.time()
    teacher, student = train(out, data, preset, teacher_steps, student_steps, batch)
    trained = time.time() - start
    holdout = load_images(data).holdout
    n = min(n, len(holdout))
    scorer = ImageScorer(holdout[:n], ["fd"], None, None, "cpu")
    teacher_fd = evaluate_run(str(teacher), steps=[18], n=n, metrics=["fd"])["results"][0]["fd"]
    rows = []
    for p in PRECISIONS:
        site = out / f"site-{p}"
        if not (site / "model.json").exists():
            cmkit("export", "web", "--checkpoint", student, "--out", site, "--precision", p, "--quiet", "--force")
        meta = json.loads((site / "model.json").read_text())
        row = {"config": name, "precision": p, "bytes": (site / "model.onnx").stat().st_size,
               "teacher_fd": teacher_fd, "n": n, "train_s": round(trained),
               "check": meta.get("precision_check", {}).get("steps")}
        for threads in (1, 2):
            for b, runs in ((1, 10), (16, 5)):
                row[f"ort_b{b}_t{threads}"] = python_latency(site, meta, b, threads, runs)
        server, url = serve_in_thread(site)
        try:
            for threads in (1, 2):
                page = browser_measure(browser, url, threads)
                row[f"web_b1_t{threads}"], row[f"web_b16_t{threads}"] = page["b1"], page["b16"]
                if threads == 2:
                    row["first_images_ms"] = page["first"]
                    if screenshot is not None and p == "int8" and name == "fashion-mnist-tiny":
                        browser.get(f"{url}?threads=2")
                        browser.execute_async_script("const done = arguments[arguments.length - 1]; "
                                                     "window.cmkit.ready.then(done, done);")
                        browser.save_screenshot(str(screenshot))
        finally:
            server.should_exit = True
        row["fd"] = fd_rows(site, meta, scorer, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    fp32 = {r["config"]: r for r in rows if r["precision"] == "fp32"}
    lines = ["| model | precision | file | ORT b1 1t / 2t (ms) | ORT b16 1t / 2t (ms) | web b1 1t / 2t (ms) | "
             "web b16 1t / 2t (ms) | web/ORT b16 1t, 2t | FD 1 / 2 steps (teacher) | mean px diff 1 / 2 | "
             "first images (ms) |", "|" + " --- |" * 11]
    for r in rows:
        base = fp32[r["config"]]
        size = f"{r['bytes'] / 1e6:.2f} MB" + ("" if r is base else f" ({r['bytes'] / base['bytes']:.2f}x)")
        speed = "" if r is base else f" ({base['ort_b16_t1'] / r['ort_b16_t1']:.2f}x, " \
                                     f"{base['ort_b16_t2'] / r['ort_b16_t2']:.2f}x)"
        check = r["check"] or {}
        diff = " / ".join(f"{check[k]['mean']:.2f}" for k in ("1", "2")) if check else "-"
        lines.append(
            f"| {r['config']} | {r['precision']} | {size} | {r['ort_b1_t1']:.1f} / {r['ort_b1_t2']:.1f} | "
            f"{r['ort_b16_t1']:.1f} / {r['ort_b16_t2']:.1f}{speed} | {r['web_b1_t1']:.1f} / {r['web_b1_t2']:.1f} | "
            f"{r['web_b16_t1']:.1f} / {r['web_b16_t2']:.1f} | {r['web_b16_t1'] / r['ort_b16_t1']:.1f}x, "
            f"{r['web_b16_t2'] / r['ort_b16_t2']:.1f}x | {r['fd'][1]:.1f} / {r['fd'][2]:.1f} "
            f"({r['teacher_fd']:.1f}) | {diff} | {r['first_images_ms']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    from helpers import chromium

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "edge")
    p.add_argument("--only", default=",".join(CONFIGS), help="comma list of " + ", ".join(CONFIGS))
    p.add_argument("--screenshot", type=Path, help="save the Fashion-MNIST tiny int8 page here")
    args = p.parse_args()
    names = args.only.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown --only {unknown}")
    if shutil.which("chromium") is None:
        p.error("needs chromium and chromium-driver (apt-get install chromium chromium-driver)")
    browser, reason = chromium()
    if browser is None:
        p.error(reason)
    browser.set_script_timeout(600)
    rows = []
    try:
        for name in names:
            rows += measure(name, args.out, browser, args.screenshot)
            print(table(rows), flush=True)
    finally:
        browser.quit()
    (args.out / "edge.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
