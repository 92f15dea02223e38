"""Shared settings for tests that run the real command line on tiny problems."""

import contextlib
import hashlib
import json
from pathlib import Path

from cmkit.cli import main
from cmkit.training import VOLATILE_METRICS

TINY_TRAIN = ["--set", "data.n=400", "--set", "data.n_holdout=200", "--set", "train.log_every=1",
              "--batch-size", "32", "--quiet"]
TINY = ["--set", "model.width=32", "--set", "model.depth=1", "--set", "model.emb_dim=16", *TINY_TRAIN]


def cli(*args) -> int:
    return main([str(a) for a in args])


def refused(capsys, *args) -> str:
    """The error of a command that must be refused: exit status 2 and one line, no traceback."""
    capsys.readouterr()
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cmkit: error: "), err
    return err


def _content(path: Path) -> bytes:
    """A file's bytes; for metrics.jsonl, less the timing and memory fields no two runs share."""
    if path.name != "metrics.jsonl":
        return path.read_bytes()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return "\n".join(json.dumps({k: v for k, v in r.items() if k not in VOLATILE_METRICS}) for r in records).encode()


def tree_digest(path: Path) -> dict:
    """{relative path: sha256} of every file under ``path``."""
    return {str(p.relative_to(path)): hashlib.sha256(_content(p)).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


def local_client(app, **kwargs):
    """An in-process client of a `cmkit serve` app as a script on this machine calls it: Host
    localhost, and the header that marks a request as not coming from a web form."""
    from fastapi.testclient import TestClient
    return TestClient(app, base_url="http://localhost", headers={"X-Cmkit-Client": "test"}, **kwargs)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a real server in a test)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """A real server of ``app`` on 127.0.0.1 in a thread, on cmkit's hardened uvicorn stack
    (`cmkit.serve.server`), for the block: yields its URL."""
    import threading
    import time

    from cmkit.serve.server import DrainingServer, config
    port = free_port()
    server = DrainingServer(config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def chromium():
    """(a headless Chromium driven by Selenium, its console logged, or None, the reason there is none)."""
    import os
    import shutil
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not browser or not os.path.exists(driver):
        return None, "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options), None
