"""`cmkit serve` for a text-conditioned latent model: prompts through the API (checked like any
user input), the same images as `Run.sample`, and the page's real-time prompt box in a browser
(debounced, the newest request wins)."""

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import cmkit
from cmkit.serve.app import create_app
from cmkit.serve.engine import Limits
from helpers import chromium, local_client, serving
from tiny_sd import save_sd

PROMPT = "a photo of a digit two"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("serve-sd") / "sd")


def _decode(url: str) -> np.ndarray:
    import base64
    import io
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))


def test_prompts_through_the_api(teacher):
    run = cmkit.load_run(teacher)
    with local_client(create_app(run, limits=Limits(max_n=8))) as c:
        info = c.get("/api/info").json()
        assert info["prompt"]["max_tokens"] == 8 and info["shape"] == [1, 8, 8]
        assert info["edit_tasks"] == ["inpaint", "stroke"]  # through the VAE; the others constrain pixels
        body = {"n": 3, "seed": 4, "steps": 2, "guidance": 3.0, "prompt": PROMPT, "format": "json"}
        out = c.post("/api/generate", json=body)
        assert out.status_code == 200, out.text
        served = np.stack([_decode(u) for u in out.json()["images"]])
        direct = run.sample(3, steps=2, seed=4, guidance=3.0, prompt=PROMPT)[:, 0]
        assert np.array_equal(served, direct)
        other = c.post("/api/generate", json={**body, "prompt": "a photo of a digit zero"}).json()["images"]
        assert other != out.json()["images"]  # the prompt reaches the network
        for bad, status, words in [("a" * 1001, 400, "1000"), ("a photo\x07", 400, "control"),
                                   (7, 400, "string")]:
            r = c.post("/api/generate", json={**body, "prompt": bad})
            assert r.status_code == status and words in r.json()["error"], r.text
        r = c.post("/api/generate", json={**body, "class": "1"})
        assert r.status_code == 400 and "takes a prompt, not class labels" in r.json()["error"], r.text
        r = c.post("/api/edit/colorize", files={"image": ("i.png", b"\x89PNG")})
        assert r.status_code == 400 and "latents" in r.json()["error"]


@pytest.mark.slow
def test_the_page_regenerates_as_the_prompt_is_typed(teacher):
    if os.environ.get("CMKIT_REQUIRE_BROWSER") != "1" and not shutil.which("chromium"):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = create_app(cmkit.load_run(teacher), limits=Limits(max_n=8))
    browser, reason = chromium()
    assert browser is not None, reason
    with serving(app) as url:
        try:
            browser.get(url)
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#grid img")) == 8)
            first = browser.execute_script("return window.cmkitState.generation")
            box = browser.find_element(By.ID, "prompt")
            box.send_keys(PROMPT)  # one input event per character, faster than the 150 ms debounce
            wait.until(lambda b: b.execute_script(
                "const s = window.cmkitState; return s.generation > %d && s.shown === s.generation" % first))
            time.sleep(0.5)  # nothing more arrives once typing stopped
            generations = browser.execute_script("return window.cmkitState.generation") - first
            assert 1 <= generations < len(PROMPT) // 2, generations
            shown = browser.execute_script("return Array.from(document.querySelectorAll('#grid img')).map(i => i.src)")
            expected = httpx.post(f"{url}/api/generate", headers={"X-Cmkit-Client": "test"}, json={
                "n": 8, "seed": 0, "steps": 1, "prompt": PROMPT, "format": "json"}).json()["images"]
            assert shown == expected  # the grid shows the last prompt's images, not a stale answer
        finally:
            browser.quit()
