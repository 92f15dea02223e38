"""The edge: fp16 and int8 ONNX exports checked against fp32, and the exported web page generating
in headless Chromium what onnxruntime generates in Python.

- fp16 and int8 exports of a trained digits model: smaller files, pixel differences from fp32
  (recomputed here, not read from the export's report) and FD within the bounds; a broken
  calibration (all-zero inputs) is caught by the export's own check and nothing is written.
- The site, served from loopback with the isolation headers: crossOriginIsolated, its
  `window.cmkit.generate` equal to Python onnxruntime on the same noise (fp32 within 1e-4 of
  the pixel range, int8 within its bound), no request to another origin, no console errors, and
  errors (a class out of range, a model that does not load) shown on a page that stays usable.
- Refusals in one line: a teacher, a vector model, an unknown precision, missing onnxruntime-web.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cmkit
from cmkit.data import load_images
from cmkit.errors import CmkitError
from cmkit.export import precision
from helpers import TINY, chromium, cli, refused

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """A class-conditional ECT model of 8x8 digits (tiny preset, 100 steps), and its fp32, fp16 and
    int8 exports with the f graph."""
    tmp = tmp_path_factory.mktemp("edge")
    assert cli("train", "--method", "ect", "--data", "digits", "--set", "model.preset=tiny", "--steps", 100,
               "--batch-size", 64, "--out", tmp / "ect", "--quiet", "--set", "train.sample_every=0") == 0
    for p in precision.PRECISIONS:
        assert cli("export", "onnx", "--checkpoint", tmp / "ect", "--out", tmp / f"{p}.onnx", "--with-f",
                   "--precision", p, "--quiet") == 0
    return tmp


def _sampler(folder: Path, name: str) -> precision.OnnxSampler:
    meta = json.loads((folder / f"{name}.json").read_text())
    return precision.OnnxSampler(folder, meta, f"{name}.onnx", meta["consistency_function"])


def test_fp16_and_int8_are_smaller_and_within_their_bounds(digits):
    from cmkit.evaluate import ImageScorer
    size = {p: (digits / f"{p}.onnx").stat().st_size for p in precision.PRECISIONS}
    assert size["fp16"] < 0.7 * size["fp32"] and size["int8"] < 0.6 * size["fp32"]  # tiny: graph overhead
    reference = _sampler(digits, "fp32")
    data = load_images("digits")
    scorer = ImageScorer(data.holdout, ["fd"], None, None, "cpu")
    noises, labels = precision.noise(reference.meta, len(data.holdout), 2, seed=5)
    fd32 = scorer.score(reference.sample(noises[:1], labels).round().astype(np.uint8))["fd"]
    for p in ("fp16", "int8"):
        meta = json.loads((digits / f"{p}.json").read_text())
        assert meta["precision"] == p
        lowered = _sampler(digits, p)
        for steps in (1, 2):
            diff = np.abs(reference.sample(noises[:steps], labels) - lowered.sample(noises[:steps], labels))
            assert np.isfinite(diff).all() and diff.mean() <= precision.MAX_MEAN_DIFF[p], (p, steps, diff.mean())
        fd = scorer.score(lowered.sample(noises[:1], labels).round().astype(np.uint8))["fd"]
        assert abs(fd - fd32) <= 0.1 * fd32, (p, fd, fd32)
    int8 = json.loads((digits / "int8.json").read_text())["precision_check"]
    assert int8["float_nodes"] == ["/model/backbone/unet/conv_in/Conv", "/model/backbone/unet/conv_out/Conv"]
    assert 0 < int8["steps"]["1"]["mean"] <= int8["bound_mean"] == precision.MAX_MEAN_DIFF["int8"]


def test_a_broken_calibration_is_caught_and_nothing_is_written(digits, tmp_path, capsys, monkeypatch):
    zeros = lambda feeds: [{k: np.zeros_like(v) for k, v in f.items()} for f in feeds]  # noqa: E731
    good_g, good_f = precision.generator_calibration, precision.f_calibration
    monkeypatch.setattr(precision, "generator_calibration", lambda meta, seed: zeros(good_g(meta, seed)))
    monkeypatch.setattr(precision, "f_calibration", lambda meta, ref, seed: zeros(good_f(meta, ref, seed)))
    capsys.readouterr()
    assert cli("export", "onnx", "--checkpoint", digits / "ect", "--out", tmp_path / "m.onnx", "--with-f",
               "--precision", "int8") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "above the bound" in err and "nothing written" in err, err
    assert list(tmp_path.iterdir()) == []


def test_int8_exports_print_their_check_and_force_replaces_them(digits, tmp_path, capsys):
    """export onnx and export web print the same check, saying which figure the bound is on; an
    earlier export is replaced with --force, which the refusal without it names."""
    from cmkit.export.web import ORT_FILES
    ort = tmp_path / "ort-web"  # stand-ins for onnxruntime-web: the page is not opened here
    ort.mkdir()
    for name in ORT_FILES:
        (ort / name).write_text("")
    for kind, out, extra in (("onnx", tmp_path / "m.onnx", []), ("web", tmp_path / "site", ["--ort-web", ort])):
        command = ["export", kind, "--checkpoint", digits / "ect", "--out", out, *extra]
        capsys.readouterr()
        assert cli(*command, "--precision", "int8") == 0
        printed = capsys.readouterr().out
        meta = out.with_suffix(".json") if kind == "onnx" else out / "model.json"
        report = json.loads(meta.read_text())["precision_check"]
        assert list(report["steps"]) == (["1"] if kind == "onnx" else ["1", "2"])  # the site has f(x, sigma)
        for steps, d in report["steps"].items():
            line = (f"int8 against fp32 at {steps} step(s), 64 samples: mean pixel difference {d['mean']:.3f} "
                    f"(the bound 2.5 is on this mean), largest on one pixel {d['max']:.2f}")
            assert line in printed, printed
        assert cli(*command) == 2
        assert "pass --force" in capsys.readouterr().err
        assert cli(*command, "--force", "--quiet") == 0
        assert json.loads(meta.read_text())["precision"] == "fp32"


def test_edge_refusals_are_one_line(digits, tmp_path, tiny_teacher, capsys):
    vectors = tmp_path / "cd"
    assert cli("train", "--method", "cd", "--data", "moons", "--teacher", tiny_teacher, *TINY[6:], "--steps", 2,
               "--out", vectors) == 0
    assert "35 calls" in refused(capsys, "export", "web", "--checkpoint", tiny_teacher, "--out", tmp_path / "s")
    assert "makes vectors" in refused(capsys, "export", "web", "--checkpoint", vectors, "--out", tmp_path / "s")
    assert "for image models" in refused(capsys, "export", "onnx", "--checkpoint", vectors, "--out",
                                         tmp_path / "v.onnx", "--precision", "int8")
    assert "invalid choice" in refused(capsys, "export", "onnx", "--checkpoint", digits / "ect", "--out",
                                       tmp_path / "m.onnx", "--precision", "int4")
    err = refused(capsys, "export", "web", "--checkpoint", digits / "ect", "--out", tmp_path / "s", "--ort-web",
                  tmp_path / "nowhere")
    assert "npm ci --prefix web" in err
    assert not any(tmp_path.glob("s*")) and not any(tmp_path.glob("*.onnx"))


@pytest.fixture(scope="session")
def ort_web():
    """onnxruntime-web's files from the repository's npm lockfile, installed here when missing."""
    from cmkit.export.web import find_ort_web
    try:
        return find_ort_web()
    except CmkitError as e:
        missing = str(e)
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CMKIT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"npm is needed for the web tests ({missing})")
        pytest.skip(f"needs npm (apt-get install npm): {missing}")
    subprocess.run([npm, "ci", "--prefix", str(REPO / "web"), "--no-audit", "--no-fund", "--loglevel=error"],
                   check=True, timeout=600)
    return find_ort_web()


def _run_js(browser, script: str, *args):
    """The value of an async script (its last argument resolves it); a rejection comes back as {"error"}."""
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"(async () => {{ {script} }})().then(done, (e) => done({{error: String(e.message || e)}}));", *args)


def _wait_text(browser, element_id: str, words: str, timeout: float = 60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout).until(lambda b: words in b.find_element(By.ID, element_id).text)


@pytest.mark.slow
def test_the_site_generates_in_chromium_what_onnxruntime_does(digits, tmp_path, ort_web):
    from selenium.webdriver.common.by import By
    from cmkit.serve.static_site import serve_in_thread
    for p in ("fp32", "int8"):
        assert cli("export", "web", "--checkpoint", digits / "ect", "--out", tmp_path / p, "--precision", p,
                   "--quiet") == 0
    assert sorted(os.listdir(tmp_path / "fp32")) == ["_headers", "cmkit.js", "index.html", "model-f.onnx",
                                                     "model.json", "model.onnx", "ort"]
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "fp32", broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    browser, reason = chromium()
    assert browser is not None, reason
    servers = []
    try:
        browser.set_script_timeout(120)
        for p, bound in (("fp32", 1e-4 * 255), ("int8", precision.MAX_MEAN_DIFF["int8"])):
            server, url = serve_in_thread(tmp_path / p)
            servers.append(server)
            browser.get(url + "?threads=2")
            _wait_text(browser, "status", "image(s)")
            assert browser.execute_script("return crossOriginIsolated") is True
            assert "2 thread(s)" in browser.find_element(By.ID, "about").text
            python = _sampler(tmp_path / p, "model")
            for steps in (1, 2):
                noises, labels = precision.noise(python.meta, 5, steps, seed=steps)
                got = _run_js(browser, "return Array.from(await window.cmkit.generate(arguments[0], arguments[1], "
                              "arguments[2]));", np.concatenate([z.ravel() for z in noises]).tolist(),
                              labels.tolist(), steps)
                assert not isinstance(got, dict), got
                want = python.sample(noises, labels)
                diff = np.abs(np.asarray(got, np.float32).reshape(want.shape) - want)
                assert (diff.max() if p == "fp32" else diff.mean()) <= bound, (p, steps, diff.max(), diff.mean())
            # Errors show on the page, which stays usable.
            field = browser.find_element(By.ID, "class")
            field.clear()
            field.send_keys("99")
            browser.find_element(By.ID, "go").click()
            _wait_text(browser, "error", "out of range")
            field.clear()
            field.send_keys("3")
            browser.find_element(By.ID, "go").click()
            _wait_text(browser, "status", "image(s)")
            assert browser.find_element(By.ID, "error").text == ""
            resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
            origin = url.rstrip("/")
            assert resources and all(r.startswith(origin + "/") for r in resources), resources
            assert "/model.onnx" in server.requests and "/ort/ort-wasm-simd-threaded.wasm" in server.requests
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
        server, url = serve_in_thread(broken)
        servers.append(server)
        browser.get(url)
        _wait_text(browser, "error", "cannot load the model")
        shutil.copyfile(tmp_path / "fp32" / "model.onnx", broken / "model.onnx")  # fixed: the button retries
        browser.find_element(By.ID, "go").click()
        _wait_text(browser, "status", "image(s)")
    finally:
        browser.quit()
        for server in servers:
            server.should_exit = True


def test_cmkit_serve_offers_the_in_browser_mode(digits, ort_web):
    """/local/ is the exported site, built at the first request and sent with the isolation headers;
    the page links to it; nothing outside the site is served, and with a token it is not offered."""
    from cmkit.serve.app import create_app
    from cmkit.serve.guard import Access
    from helpers import local_client
    run = cmkit.load_run(digits / "ect")
    with local_client(create_app(run, warmup=False)) as client:
        assert client.get("/api/info").json()["in_browser"] is True
        assert 'href="/local/"' in client.get("/").text
        page = client.get("/local/")
        assert page.status_code == 200 and "One-step generation" in page.text and "cmkit.js" in page.text
        assert page.headers["cross-origin-opener-policy"] == "same-origin"
        assert page.headers["cross-origin-embedder-policy"] == "require-corp"
        meta = client.get("/local/model.json").json()
        assert meta["precision"] == "fp32" and meta["shape"] == [1, 8, 8]
        wasm = client.get("/local/ort/ort-wasm-simd-threaded.wasm")
        assert wasm.headers["content-type"] == "application/wasm" and wasm.content[:4] == b"\0asm"
        for path in ("/local/../config.json", "/local/%2e%2e/%2e%2e/config.json", "/local/nothing.js"):
            assert client.get(path).status_code == 404, path
    token = "t" * 32
    with local_client(create_app(run, warmup=False, access=Access(token=token))) as client:
        assert client.get("/local/").status_code == 401
        assert client.get("/api/info", headers={"Authorization": f"Bearer {token}"}).json()["in_browser"] is False


def test_hostile_requests_to_a_site_are_404s(digits, tmp_path, ort_web):
    """serve-site and /local/: no file outside the site, no traceback for a NUL byte; a site folder
    that holds the current directory is not overwritten."""
    import http.client
    from cmkit.serve.static_site import serve_in_thread
    site = tmp_path / "site"
    assert cli("export", "web", "--checkpoint", digits / "ect", "--out", site, "--quiet") == 0
    (tmp_path / "secret.txt").write_text("not for the web")
    server, url = serve_in_thread(site)
    try:
        for path in ("/%00", "/../secret.txt", "/%2e%2e/secret.txt", "/ort/", "/model.json%00.txt"):
            port = int(url.rstrip("/").rsplit(":", 1)[1])
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 404 and b"not for the web" not in response.read(), path
            connection.close()
    finally:
        server.should_exit = True
    from cmkit.serve.app import create_app
    from helpers import local_client
    with local_client(create_app(cmkit.load_run(digits / "ect"), warmup=False)) as client:
        assert client.get("/local/%00").status_code == 404
    old = os.getcwd()
    os.chdir(site)
    try:
        assert cli("export", "web", "--checkpoint", digits / "ect", "--out", ".", "--force", "--quiet") == 2
    finally:
        os.chdir(old)
    assert (site / "model.onnx").is_file()
