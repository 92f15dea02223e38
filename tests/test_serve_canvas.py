"""The serve page's live canvas in headless Chromium: pointer events on the canvas bring frames
over the WebSocket, the frames follow the drawing, and the page shows its frame rate and latency;
for a pixel model and a latent text model."""

import os
import shutil

import pytest

import cmkit
from cmkit.serve.app import create_app
from cmkit.serve.engine import Limits
from helpers import chromium, serving
from tiny_sd import save_sd

DRAW = """
const [x0, y0, x1, y1, done] = arguments;
(async () => {
  const canvas = document.getElementById('live-canvas'), box = canvas.getBoundingClientRect();
  const at = (type, x, y) => canvas.dispatchEvent(new PointerEvent(type, {pointerId: 9, pointerType: 'pen',
    isPrimary: true, clientX: box.left + x * box.width, clientY: box.top + y * box.height, bubbles: true,
    button: 0, buttons: type === 'pointerup' ? 0 : 1}));
  at('pointerdown', x0, y0);
  for (let i = 1; i <= 20; i++) {
    at('pointermove', x0 + (x1 - x0) * i / 20, y0 + (y1 - y0) * i / 20);
    await new Promise((resolve) => setTimeout(resolve, 16));
  }
  at('pointerup', x1, y1);
  return true;
})().then(done, (e) => done({error: String(e)}));
"""


def _frame(browser):
    return browser.execute_script("const c = document.getElementById('live-frame');"
                                  "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["pixel", "latent text"])
def test_drawing_on_the_page_brings_frames_that_follow_it(model, image_run, tmp_path):
    if os.environ.get("CMKIT_REQUIRE_BROWSER") != "1" and not shutil.which("chromium"):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    run = cmkit.load_run(image_run if model == "pixel" else save_sd(tmp_path / "sd"))
    browser, reason = chromium()
    assert browser is not None, reason
    with serving(create_app(run, limits=Limits(max_n=8))) as url:
        try:
            browser.set_script_timeout(60)
            browser.get(url)
            wait = WebDriverWait(browser, 60)
            wait.until(lambda b: b.find_element(By.ID, "live-section").is_displayed())
            wait.until(lambda b: b.execute_script("return window.cmkitLive.connections") >= 1)
            if model != "pixel":
                browser.find_element(By.ID, "prompt").send_keys("a photo of a digit two")
            before = browser.execute_script("return window.cmkitLive.frames")
            assert browser.execute_async_script(DRAW, 0.2, 0.2, 0.8, 0.8) is True
            wait.until(lambda b: b.execute_script("return window.cmkitLive.frames") > before)
            wait.until(lambda b: b.execute_script("const l = window.cmkitLive; return l.lastSeq >= l.sent"))
            first = _frame(browser)
            frames = browser.execute_script("return window.cmkitLive.frames")
            assert browser.execute_async_script(DRAW, 0.8, 0.1, 0.1, 0.9) is True
            wait.until(lambda b: b.execute_script("return window.cmkitLive.frames") > frames)
            wait.until(lambda b: b.execute_script("const l = window.cmkitLive; return l.lastSeq >= l.sent"))
            assert _frame(browser) != first  # the frame follows the drawing
            stats = browser.find_element(By.ID, "live-stats").text
            assert "fps" in stats and "p50" in stats, stats
            assert browser.execute_script("return window.cmkitLive.errors.length") == 0
        finally:
            browser.quit()
