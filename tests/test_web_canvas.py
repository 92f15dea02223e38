"""The exported site's live canvas: stroke editing (SDEdit) in the browser with onnxruntime-web.

- The algorithm is Python's (a grey model reading the canvas's luminance as Pillow does): a plain transcription with onnxruntime on model-f.onnx equals
  `cmkit.editing.tasks.stroke` on the torch model given the same noise (and its levels
  `strength_levels`), and in headless Chromium `window.cmkit.stroke` equals the transcription.
- Drawing on the canvas with pointer events makes result frames arrive and change (the seed locked:
  the change is the drawing's), the last frame is the last canvas's, undo and clear work, and the
  page shows frames per second and the latency's p50.
- Latest wins: 50 changes made faster than a frame computes cost a couple of computations, not 50.
"""

import functools
import json
import math
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import cmkit
from cmkit.editing import tasks
from cmkit.export.web import ISOLATION_HEADERS
from helpers import chromium, cli
from test_edge import _run_js, ort_web  # noqa: F401  (ort_web: the fixture, installed from the lockfile when missing)

STRENGTHS = (0.3, 0.9)
TOLERANCE = 1e-4 * 255  # 0..255 levels, before rounding


@pytest.fixture(scope="module")
def site(tmp_path_factory, ort_web):  # noqa: F811
    """A class-conditional ECT model of 8x8 digits (tiny preset, a few steps: equality needs no
    quality) and its exported site."""
    tmp = tmp_path_factory.mktemp("canvas")
    assert cli("train", "--method", "ect", "--data", "digits", "--set", "model.preset=tiny", "--steps", 20,
               "--batch-size", 64, "--out", tmp / "ect", "--quiet", "--set", "train.sample_every=0") == 0
    assert cli("export", "web", "--checkpoint", tmp / "ect", "--out", tmp / "site", "--quiet") == 0
    return tmp


def _canvas_and_noise(meta: dict, n: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, *meta["shape"]), dtype=np.uint8)
    noises = rng.standard_normal((steps, n, *meta["shape"])).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) * 3 % meta["num_classes"]
    return pixels, noises, labels


def onnx_stroke(folder: Path, meta: dict, pixels, noises, labels, strength: float, steps: int) -> np.ndarray:
    """Stroke editing transcribed with onnxruntime: y = pixels / 127.5 - 1; Karras levels from
    ``strength`` down; x = y + sigma_0 z_0; x0 = clip(f(x, sigma_i), -1, 1), re-noised to the next
    level with sqrt(sigma_{i+1}^2 - sigma_min^2) z_{i+1}; (x0 + 1) 127.5, unrounded."""
    import onnxruntime as ort
    f = ort.InferenceSession(str(folder / meta["consistency_function"]), providers=["CPUExecutionProvider"])
    rho = meta.get("rho", 7.0)
    lo, hi = meta["sigma_min"] ** (1 / rho), meta["sigma_max"] ** (1 / rho)
    levels = [(lo + strength * (1 - i / steps) * (hi - lo)) ** rho for i in range(steps)]
    x = (pixels.astype(np.float32) / 127.5 - 1 + levels[0] * noises[0]).astype(np.float32)
    for i, sigma in enumerate(levels):
        feeds = {"x": x, "sigma": np.full(len(x), sigma, np.float32)}
        if meta["num_classes"]:
            feeds["class_labels"] = np.asarray(labels, np.int64)
        x0 = np.clip(f.run(None, feeds)[0], -1, 1)
        if i + 1 < steps:
            x = (x0 + math.sqrt(levels[i + 1] ** 2 - meta["sigma_min"] ** 2) * noises[i + 1]).astype(np.float32)
    return (x0 + 1) * 127.5


class _Unrounded:
    """The run's image map with the result left in 0..255 floats (tasks.stroke takes a ``scaler``)."""
    to_model = staticmethod(lambda images: images.float() / 127.5 - 1)
    to_data = staticmethod(lambda x: ((x + 1) * 127.5).clamp(0, 255).double().numpy())


@pytest.mark.slow  # its fixture trains and exports a model: the quick loop keeps under 3 minutes
def test_the_transcription_is_cmkits_stroke_editing(site, monkeypatch):
    """On the torch model with the same noise (torch.randn replaced for the call), tasks.stroke at
    strength_levels gives what the ONNX transcription gives; model.json carries rho."""
    meta = json.loads((site / "site" / "model.json").read_text())
    run = cmkit.load_run(site / "ect")
    assert meta["rho"] == run.noise_range.rho == 7
    for steps in (1, 2):
        for strength in STRENGTHS:
            pixels, noises, labels = _canvas_and_noise(meta, 2, steps, seed=steps)
            handed = []

            def randn(shape, generator=None, dtype=None, **kwargs):
                z = noises[len(handed)]
                assert tuple(shape) == z.shape and len(handed) < steps
                handed.append(z)
                return torch.from_numpy(z.copy()).to(dtype or torch.float32)

            with monkeypatch.context() as m:
                m.setattr(torch, "randn", randn)
                got = tasks.stroke(run, pixels, strength=strength, steps=steps, class_labels=labels.tolist(),
                                   scaler=_Unrounded())
            assert len(handed) == steps
            want = onnx_stroke(site / "site", meta, pixels, noises, labels, strength, steps)
            assert np.abs(got - want).max() <= TOLERANCE, (steps, strength, np.abs(got - want).max())
            assert np.abs(want - pixels).mean() > 1  # the edit changed the canvas: not equal by doing nothing


class _SiteHandler(SimpleHTTPRequestHandler):
    """The site with the isolation headers (cmkit serve-site's are being reworked: the test serves its own)."""
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                      ".js": "text/javascript", ".wasm": "application/wasm"}

    def end_headers(self):
        for name, value in {**ISOLATION_HEADERS, "Cross-Origin-Resource-Policy": "same-origin",
                            "Cache-Control": "no-cache"}.items():
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def page(site):
    """Headless Chromium on the site (2 threads), its first live frame drawn."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_SiteHandler, directory=str(site / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    browser, reason = chromium()
    assert browser is not None, reason
    try:
        browser.set_script_timeout(120)
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/?threads=2")
        assert _run_js(browser, "await window.cmkit.ready; while (!window.cmkit.live.frames) "
                       "await new Promise((r) => setTimeout(r, 20)); return window.cmkit.live.frames;") >= 1
        assert browser.execute_script("return crossOriginIsolated") is True
        yield browser
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
    finally:
        browser.quit()
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_stroke_in_chromium_equals_onnxruntime(site, page):
    meta = json.loads((site / "site" / "model.json").read_text())
    run = cmkit.load_run(site / "ect")
    for steps in (1, 2):
        for strength in STRENGTHS:
            levels = page.execute_script("return window.cmkit.strengthLevels(arguments[0], arguments[1])",
                                         strength, steps)
            assert np.allclose(levels, tasks.strength_levels(run, strength, steps), rtol=1e-12)
            pixels, noises, labels = _canvas_and_noise(meta, 2, steps, seed=10 * steps)
            got = _run_js(page, "return Array.from(await window.cmkit.stroke(arguments[0], arguments[1], "
                          "arguments[2], arguments[3], arguments[4]));",
                          pixels.ravel().tolist(), noises.ravel().tolist(), labels.tolist(), strength, steps)
            assert not isinstance(got, dict), got
            want = onnx_stroke(site / "site", meta, pixels, noises, labels, strength, steps)
            diff = np.abs(np.asarray(got, np.float32).reshape(want.shape) - want)
            assert diff.max() <= TOLERANCE, (steps, strength, diff.max())
    for steps in (1, 2):
        ms = _run_js(page, "return await window.cmkit.benchmarkStroke(arguments[0], 20);", steps)
        assert isinstance(ms, (int, float)) and 0 < ms < 1000, ms
        print(f"in-browser stroke frame, {steps} step(s), 8x8 tiny, 2 threads: {ms:.2f} ms (median of 20)")
    err = _run_js(page, "return await window.cmkit.stroke(new Array(64).fill(300), new Array(64).fill(0), [0]);")
    assert "0 to 255" in err["error"]
    # A grey model reads the canvas's luminance as Pillow's convert("L") (cmkit serve's and cmkit edit's).
    from PIL import Image
    colours = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    got = page.execute_script("""
        const rgb = arguments[0], canvas = document.getElementById('canvas');
        const image = new ImageData(8, 8);
        for (let p = 0; p < 64; p++) image.data.set([...rgb.slice(3 * p, 3 * p + 3), 255], 4 * p);
        canvas.getContext('2d').putImageData(image, 0, 0);
        return Array.from(window.cmkit.canvasPixels());""", colours.ravel().tolist())
    assert got == np.asarray(Image.fromarray(colours).convert("L")).ravel().tolist()


def _settle(browser) -> dict:
    """The live canvas's counters once no frame is computing or pending."""
    return _run_js(browser, "await window.cmkit.live.idle(); const l = window.cmkit.live; return {computations: "
                   "l.computations, frames: l.frames, result: Array.from(l.result), canvas: Array.from("
                   "window.cmkit.canvasPixels()), seed: Number(document.getElementById('live-seed').value)};")


def _fresh_frame(browser) -> list:
    """A frame computed now from the canvas and the page's settings, as the live loop computes it."""
    return _run_js(browser, """
        const $ = (id) => document.getElementById(id);
        const steps = Number($('live-steps').value), size = window.cmkit.canvasPixels().length;
        return Array.from(await window.cmkit.stroke(window.cmkit.canvasPixels(),
            window.cmkit.gaussians(Number($('live-seed').value), steps * size), [Number($('class').value)],
            Number($('strength').value), steps));""")


@pytest.mark.slow
def test_drawing_makes_frames_that_follow_the_canvas(page):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    canvas = page.find_element(By.ID, "canvas")
    page.find_element(By.ID, "lock").click()  # the seed fixed: what changes the result is the drawing
    before = _settle(page)
    size = canvas.size["width"]
    actions = ActionChains(page).move_to_element_with_offset(canvas, -size // 4, -size // 4).click_and_hold()
    for dx, dy in ((20, 0), (20, 10), (0, 30), (-15, 20), (10, 10)):
        actions = actions.move_by_offset(dx, dy)
    actions.release().perform()
    after = _settle(page)
    assert after["seed"] == before["seed"]
    assert after["frames"] >= before["frames"] + 2 and after["frames"] == after["computations"]
    assert after["canvas"] != before["canvas"] and after["result"] != before["result"]
    assert np.abs(np.subtract(_fresh_frame(page), after["result"])).max() == 0  # the last frame: the last canvas
    stats = page.find_element(By.ID, "live-stats").text
    assert re.search(r"\d+ fps .*latency p50 \d+\.\d ms", stats), stats
    # Unlocked, a stroke takes a new seed; undo takes the stroke back; clear leaves it blank.
    page.find_element(By.ID, "lock").click()
    ActionChains(page).move_to_element(canvas).click_and_hold().move_by_offset(15, 15).release().perform()
    stroked = _settle(page)
    assert stroked["seed"] == after["seed"] + 1 and stroked["canvas"] != after["canvas"]
    page.find_element(By.ID, "undo").click()
    assert _settle(page)["canvas"] == after["canvas"]
    page.find_element(By.ID, "clear").click()
    assert set(_settle(page)["canvas"]) == {0}
    page.find_element(By.ID, "undo").click()
    assert _settle(page)["canvas"] == after["canvas"]


@pytest.mark.slow
def test_latest_wins(page):
    """50 pointer moves in a burst (faster than a frame): the running frame, then one for the
    newest canvas; never one per change."""
    before = _settle(page)
    _run_js(page, """
        const canvas = document.getElementById('canvas'), r = canvas.getBoundingClientRect();
        const at = (type, i) => canvas.dispatchEvent(new PointerEvent(type, {pointerId: 7, pointerType: 'pen',
            bubbles: true, clientX: r.left + r.width * (0.1 + 0.8 * i / 50), clientY: r.top + r.height * (i % 7) / 7}));
        at('pointerdown', 0);
        for (let i = 1; i < 50; i++) at('pointermove', i);
        at('pointerup', 49);""")
    after = _settle(page)
    assert 1 <= after["computations"] - before["computations"] <= 3, (before["computations"], after["computations"])
    assert after["canvas"] != before["canvas"]
    assert np.abs(np.subtract(_fresh_frame(page), after["result"])).max() == 0
