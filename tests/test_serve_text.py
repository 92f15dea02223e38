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
        r = c.post("/api/edit/stroke", files={"image": ("i.png", _png(np.zeros((16, 16), np.uint8)))},
                   data={"class": "1"})
        assert r.status_code == 400 and "takes a prompt, not class labels" in r.json()["error"], r.text


# Real text: an emoji joined by ZWJ, Persian with a ZWNJ, a soft hyphen, a code point newer than
# Python's Unicode table; refused: C0/C1 controls and an unpaired surrogate.
REAL_TEXT = ["family \U0001F468\u200D\U0001F469\u200D\U0001F467", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
             "co\u00adoperate", "new \U0001FAE9 glyph"]
NOT_TEXT = ["bell \u0007", "c1 \u0085", "del \u007f", "lone \ud800"]


def test_the_prompt_rule_keeps_real_text_and_refuses_controls(teacher):
    from cmkit.text import check_prompt
    for text in REAL_TEXT:
        assert check_prompt(text) == text
    for text in NOT_TEXT:
        with pytest.raises(ValueError, match="control character|unpaired surrogate"):
            check_prompt(text)
    run = cmkit.load_run(teacher)
    with local_client(create_app(run, limits=Limits(max_n=8), warmup=False)) as c:
        for text in REAL_TEXT:
            r = c.post("/api/generate", json={"n": 1, "prompt": text, "format": "json"})
            assert r.status_code == 200, (text, r.text)
        r = c.post("/api/generate", json={"n": 1, "prompt": "bell \u0007"})
        assert r.status_code == 400 and "U+0007" in r.json()["error"]


def _png(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_latent_inpainting_through_the_server_keeps_the_known_pixels(teacher):
    """The mask is on the image's grid, not the latents': the server keeps it there."""
    run = cmkit.load_run(teacher)
    c, h, w = run.image_shape
    assert run.shape[1:] != (h, w)
    picture = (np.random.default_rng(1).random((h, w)) * 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[2:5, 3:7] = 255
    with local_client(create_app(run, limits=Limits(max_n=8), warmup=False)) as c:
        r = c.post("/api/edit/inpaint", files={"image": ("i.png", _png(picture)), "mask": ("m.png", _png(mask))},
                   data={"seed": "2", "steps": "2"})
        assert r.status_code == 200, r.text
    out = np.asarray(Image.open(__import__("io").BytesIO(r.content)))
    assert np.array_equal(out[mask == 0], picture[mask == 0])
    direct = run_task_inpaint(run, picture, mask)
    assert np.array_equal(out, direct)


def run_task_inpaint(run, picture, mask):
    from cmkit.editing import tasks
    return tasks.inpaint(run, picture[None, None], mask > 127, steps=2, seed=2)[0, 0]


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
