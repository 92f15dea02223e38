"""A screenshot of the `cmkit serve` page after generating and painting an inpainting mask
(headless Chromium through Selenium; Debian: apt-get install chromium chromium-driver).

    python bench/serve_screenshot.py --checkpoint runs/digits-cd --out docs/img/serve-page.png
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import cmkit
from cmkit.serve.app import create_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(cmkit.load_run(args.checkpoint)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        browser.set_window_size(1000, 760)
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#grid img"))
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys(str(args.seed))
        browser.find_element(By.ID, "generate").click()
        time.sleep(1)
        browser.find_elements(By.CSS_SELECTOR, "#grid img")[1].click()
        wait.until(lambda b: b.execute_script("return window.cmkitState.source !== null"))
        editor = browser.find_element(By.ID, "editor")
        ActionChains(browser).move_to_element_with_offset(editor, -50, -20).click_and_hold() \
            .move_by_offset(100, 0).move_by_offset(0, 40).release().perform()
        wait.until(lambda b: b.execute_script("return window.cmkitState.result !== null"))
        time.sleep(0.5)
        browser.save_screenshot(args.out)
    finally:
        browser.quit()
        server.should_exit = True
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
