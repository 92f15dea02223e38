"""`cmkit serve`: the HTTP API through an in-process client (every endpoint, limits, bad input),
micro-batching, a load test against a real server on 127.0.0.1, and a headless-browser test of
the page."""

import asyncio
import io
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

import cmkit
from cmkit.serve.app import create_app
from cmkit.serve.batcher import MicroBatcher
from cmkit.serve.engine import Limits
from helpers import chromium, cli, local_client, serving

@pytest.fixture(scope="module")
def client(image_run):
    with local_client(create_app(cmkit.load_run(image_run), limits=Limits(max_n=16, max_upload_bytes=20000))) as c:
        yield c


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def decode(url: str) -> np.ndarray:
    import base64
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_info_and_page(client):
    info = client.get("/api/info").json()
    assert info["shape"] == [1, 8, 8] and info["num_classes"] == 10 and info["has_null_label"]
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "/api/generate" in client.get("/openapi.json").json()["paths"]
    import re
    links = re.findall(r'href="(/[^"]*)"', page.text)
    assert links and all(client.get(link).status_code == 200 for link in links), links  # no link to a 404


def test_generate_equals_the_command_line(client, image_run, tmp_path):
    """A request's images come from its own seed, as `cmkit sample --seed` draws them."""
    out = client.post("/api/generate", json={"n": 3, "seed": 5, "steps": 2, "class": "1,2,3", "format": "json"})
    assert out.status_code == 200 and float(out.headers["X-Latency-Ms"]) > 0
    served = np.stack([decode(u) for u in out.json()["images"]])
    assert cli("sample", "--checkpoint", image_run, "--n", 3, "--seed", 5, "--steps", 2, "--class", "1,2,3",
               "--out", tmp_path / "x.npy", "--quiet") == 0
    expected = np.load(tmp_path / "x.npy")[..., 0]
    assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    grid = client.post("/api/generate", json={"n": 4, "seed": 5})
    assert grid.headers["content-type"] == "image/png"
    assert np.asarray(Image.open(io.BytesIO(grid.content))).shape == (16, 16)  # a 2x2 grid of 8x8


@pytest.mark.parametrize("body, status, words", [
    ({"n": 0}, 400, "n must be in [1, 16]"),
    ({"n": 17}, 400, "n must be in [1, 16]"),
    ({"n": 2, "steps": 99}, 400, "steps must be in [1, 8]"),
    ({"n": 2, "sigmas": [0.5, 80.0]}, 400, "sigmas must be strictly decreasing"),
    ({"n": 1, "sigmas": ["NaN"]}, 400, "sigmas.0"),  # a string is not a number (NaN itself: test_serve_guard)
    ({"n": 1, "guidance": "NaN"}, 400, "guidance"),
    ({"n": 2, "class": "giraffe"}, 400, "giraffe"),
    ({"n": 2, "guidance": 2.0}, 400, "guidance"),
    ({"n": "many"}, 400, "n:"),
    ({"n": 2, "seed": -1}, 400, "seed"),
    ({"n": 2, "format": "gif"}, 400, "format"),
])
def test_bad_generate_requests_are_json_errors(client, body, status, words):
    out = client.post("/api/generate", json=body)
    assert out.status_code == status and words in out.json()["error"], out.text
    assert client.get("/api/info").status_code == 200  # the server is still up


def test_edit_endpoints(client):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 3:7] = 255
    out = client.post("/api/edit/inpaint", files={"image": ("i.png", png(image)), "mask": ("m.png", png(mask))},
                      data={"seed": "1", "format": "json", "class": "null"})
    assert out.status_code == 200, out.text
    result = decode(out.json()["images"][0])
    known = mask == 0
    np.testing.assert_array_equal(result[known], image[known])  # data consistency: known pixels kept
    assert not np.array_equal(result[~known], image[~known])
    for task, files, extra in [("stroke", {"image": ("i.png", png(image))}, {}),
                               ("denoise", {"image": ("i.png", png(image))}, {"sigma": "0.3"}),
                               ("superres", {"image": ("i.png", png(image[:4, :4]))}, {"factor": "2"})]:
        out = client.post(f"/api/edit/{task}", files=files, data={"format": "png", **extra})
        assert out.status_code == 200 and out.headers["content-type"] == "image/png", (task, out.text)
    out = client.post("/api/interpolate", json={"seed_a": 0, "seed_b": 1, "frames": 4, "class": 3})
    assert out.status_code == 200 and len(out.json()["images"]) == 4


@pytest.mark.parametrize("case, status, words", [
    ("unknown task", 404, "unknown task"),
    ("no image", 400, "needs an image upload"),
    ("not an image", 400, "cannot read image"),
    ("too large", 413, "upload limit"),
    ("bomb", 400, "pixels"),
    ("colour on grey", 400, "RGB model"),
])
def test_bad_edit_requests(client, case, status, words):
    from test_hostile_input import png_declaring
    image = ("i.png", png(np.zeros((8, 8), np.uint8)))
    mask = ("m.png", png(np.zeros((8, 8), np.uint8)))
    task, files = "inpaint", {"image": image, "mask": mask}
    if case == "unknown task":
        task = "teleport"
    elif case == "no image":
        files = {"mask": mask}
    elif case == "not an image":
        files = {"image": ("i.png", b"not a png"), "mask": mask}
    elif case == "too large":
        files = {"image": ("i.png", b"\0" * 30000), "mask": mask}
    elif case == "bomb":
        files = {"image": ("i.png", png_declaring(200_000, 200_000)), "mask": mask}
    else:
        task = "colorize"
    out = client.post(f"/api/edit/{task}", files=files, data={"class": "null"})
    assert out.status_code == status and words in out.json()["error"], out.text
    assert "Traceback" not in out.text


def test_internal_errors_are_generic_json_and_the_server_stays_up(image_run, monkeypatch):
    run = cmkit.load_run(image_run)
    with local_client(create_app(run), raise_server_exceptions=False) as c:
        monkeypatch.setattr(type(run.model), "forward", lambda *a, **k: 1 / 0)
        out = c.post("/api/generate", json={"n": 1})
        assert out.status_code == 500 and out.json() == {"error": "internal error; the server log has the details"}
        monkeypatch.undo()
        assert c.post("/api/generate", json={"n": 1}).status_code == 200


def test_requests_arriving_together_share_network_calls():
    calls = []

    def run_group(payloads):
        calls.append(len(payloads))
        time.sleep(0.01)
        return [p * 10 for p in payloads]

    async def scenario():
        batcher = MicroBatcher(run_group, window=0.05, max_batch=64, max_queue=4)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit("same", 1, i) for i in range(4)))
        with pytest.raises(Exception, match="busy"):  # a full queue answers at once
            await asyncio.gather(*(batcher.submit("same", 1, i) for i in range(9)))
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [0, 10, 20, 30]
    assert calls[0] == 4  # four requests, one call



@pytest.fixture(scope="module")
def live_server(image_run):
    """A real uvicorn server on 127.0.0.1 in a thread."""
    app = create_app(cmkit.load_run(image_run), limits=Limits(max_n=16), max_queue=16)
    with serving(app) as url:
        yield url, app


@pytest.mark.slow
def test_load_no_request_lost(live_server):
    """16 concurrent clients for 3 seconds: every request answers 200 or the documented 503;
    batching makes fewer network calls than requests. p50/p99 are printed."""
    import httpx
    url, app = live_server
    stop = time.monotonic() + 3
    calls_before = app.state.batcher.calls

    def client(i):
        codes, latencies = [], []
        with httpx.Client(timeout=30) as c:
            while time.monotonic() < stop:
                start = time.perf_counter()
                r = c.post(f"{url}/api/generate", json={"n": 1, "seed": i, "format": "json"})
                latencies.append(time.perf_counter() - start)
                codes.append(r.status_code)
                assert r.status_code in (200, 503), r.text
                if r.status_code == 503:
                    assert "busy" in r.json()["error"]
        return codes, latencies

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client, range(16)))
    codes = [c for cs, _ in results for c in cs]
    latencies = sorted(l for _, ls in results for l in ls)
    ok = codes.count(200)
    p50, p99 = statistics.median(latencies), latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\nload: {len(codes)} requests, {ok} ok, {codes.count(503)} busy, p50 {1000 * p50:.1f} ms, "
          f"p99 {1000 * p99:.1f} ms, {app.state.batcher.calls - calls_before} network batches")
    assert ok > 16 and app.state.batcher.calls - calls_before < ok


@pytest.mark.slow
def test_page_generates_and_inpaints_in_a_browser(live_server):
    if os.environ.get("CMKIT_REQUIRE_BROWSER") != "1" and not shutil.which("chromium"):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser, reason = chromium()
    assert browser is not None, reason
    url, _ = live_server
    try:
        browser.set_window_size(1200, 1000)
        browser.get(url)
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#grid img")) == 8)
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.ID, "seed").send_keys("3")
        first = browser.find_elements(By.CSS_SELECTOR, "#grid img")[0]
        browser.find_element(By.ID, "generate").click()
        # The new grid replaces the old one: wait for that, not for any image (clicking one of the
        # old grid's images as it goes was a flaky StaleElementReferenceException).
        wait.until(expected_conditions.staleness_of(first))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#grid img")) == 8)
        assert "ms" in browser.find_element(By.ID, "latency").text
        browser.find_elements(By.CSS_SELECTOR, "#grid img")[0].click()
        wait.until(lambda b: b.execute_script("return window.cmkitState.source !== null"))
        editor = browser.find_element(By.ID, "editor")
        ActionChains(browser).move_to_element_with_offset(editor, -40, -40).click_and_hold() \
            .move_by_offset(60, 30).move_by_offset(20, 40).release().perform()
        wait.until(lambda b: b.execute_script("return window.cmkitState.result !== null"))
        # Known pixels (outside the painted mask) of the result equal the source's.
        differing, painted = browser.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const s = window.cmkitState, load = (u) => new Promise((r) => { const i = new Image(); i.onload = () => r(i); i.src = u; });
            Promise.all([load(s.source), load(s.result)]).then(([a, b]) => {
              const W = a.width, H = a.height, c = document.createElement('canvas'); c.width = W; c.height = H;
              const x = c.getContext('2d'); x.drawImage(a, 0, 0); const pa = x.getImageData(0, 0, W, H).data;
              x.clearRect(0, 0, W, H); x.drawImage(b, 0, 0); const pb = x.getImageData(0, 0, W, H).data;
              const md = window.cmkitMask();
              let differing = 0, painted = 0;
              for (let i = 0; i < pa.length; i += 4) {
                if (md[i] > 127) { painted++; continue; }
                if (pa[i] !== pb[i]) differing++;
              }
              done([differing, painted]);
            });""")
        assert painted > 0, "the drag painted no mask pixels"
        assert differing == 0
    finally:
        browser.quit()


@pytest.mark.parametrize("fmt", ["eps", "tiff", "webp", "gif"])
def test_uploads_decode_only_png_and_jpeg(client, fmt, no_external_programs):
    """By content: an EPS named i.png must not reach Pillow's EPS reader (which runs Ghostscript)."""
    from test_hostile_input import OTHER_FORMATS
    files = {"image": ("i.png", OTHER_FORMATS[fmt]()), "mask": ("m.png", png(np.zeros((8, 8), np.uint8)))}
    out = client.post("/api/edit/inpaint", files=files, data={"class": "null"})
    assert out.status_code == 400 and "cannot read image" in out.json()["error"], out.text
