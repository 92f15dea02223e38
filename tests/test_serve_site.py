"""`cmkit serve-site` as a browser, an attacker and an operator meet it: only the site's own files
(no symlink out, no listing, long names a 404), the Host allow-list and the token (header or
cookie), the headers and MIME types on every answer, HEAD, a JSON 400 for garbage, no traceback
when a client leaves mid-download, a prompt SIGTERM, and one-line errors for bad input.

One real server per module (`served`); token checks run in-process on the same app."""

import asyncio
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from starlette.testclient import TestClient

from cmkit.export.web import ISOLATION_HEADERS
from cmkit.serve import static_site
from cmkit.serve.guard import Access
from cmkit.serve.static_site import BrowserSite, serve_in_thread, site_app
from helpers import refused

TOKEN = "a-long-enough-site-token-0123"
LONG = "a" * 300
FILES = {"index.html": ("text/html", b"<!doctype html><title>site</title>"),
         "cmkit.js": ("text/javascript", b"export const x = 1;"),
         "ort/ort.wasm.min.mjs": ("text/javascript", b"export default 1;"),
         "ort/ort-wasm-simd-threaded.wasm": ("application/wasm", b"\0asm\1\0\0\0"),
         "model.onnx": ("application/octet-stream", b"\x08\x07onnx"),
         "model.json": ("application/json", b'{"shape": [1, 8, 8]}')}
SITE_HEADERS = {**ISOLATION_HEADERS, "Cross-Origin-Resource-Policy": "same-origin",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder shaped like `cmkit export web`'s, a secret beside it and a symlink to the secret."""
    root = tmp_path_factory.mktemp("serve-site")
    for name, (_, body) in FILES.items():
        (root / "site" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "site" / name).write_bytes(body)
    (root / "secret.txt").write_text("not for the web")
    (root / "site" / "leak.txt").symlink_to(root / "secret.txt")
    (root / "site" / "ort" / "up").symlink_to(root)
    return root / "site"


@pytest.fixture(scope="module")
def served(site):
    server, url = serve_in_thread(site)
    yield server, url
    server.should_exit = True


def _port(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


def _get(url: str, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, lower-case headers, body) of one raw request: the path is sent exactly as given."""
    connection = http.client.HTTPConnection("127.0.0.1", _port(url), timeout=10)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _assert_site_headers(headers: dict, what) -> None:
    for name, value in SITE_HEADERS.items():
        assert headers.get(name.lower()) == value, (what, name, headers)


def test_files_get_their_types_and_the_headers(served):
    server, url = served
    for name, (media_type, body) in FILES.items():
        status, headers, got = _get(url, "/" + name)
        assert status == 200 and got == body, name
        assert headers["content-type"].split(";")[0] == media_type, (name, headers["content-type"])
        _assert_site_headers(headers, name)
    status, headers, got = _get(url, "/")
    assert status == 200 and got == FILES["index.html"][1]
    assert "/model.onnx" in server.requests and "/ort/ort-wasm-simd-threaded.wasm" in server.requests


def test_a_symlink_out_of_the_site_and_traversal_are_404(served):
    _, url = served
    for path in ("/leak.txt", "/ort/up/secret.txt", "/../secret.txt", "/%2e%2e/secret.txt", "/ort/../../secret.txt"):
        status, headers, body = _get(url, path)
        assert status == 404 and b"not for the web" not in body, path
        _assert_site_headers(headers, path)


@pytest.mark.parametrize("path", ["/ort/", "/ort", "/%00", "/model.json%00.txt", "/nothing.js", "/" + LONG,
                                  "/ort/" + LONG + "/x.wasm", "/" + "b/" * 3000])
def test_no_listing_and_odd_names_are_json_404s_with_the_headers(served, path):
    status, headers, body = _get(served[1], path)
    assert status == 404 and headers["content-type"] == "application/json" and b'"error"' in body, (path, body)
    _assert_site_headers(headers, path)


def test_head_works_where_get_does(served):
    _, url = served
    for name in FILES:
        get_status, get_headers, body = _get(url, "/" + name)
        status, headers, empty = _get(url, "/" + name, "HEAD")
        assert (status, empty) == (get_status, b"") and headers["content-length"] == str(len(body)), name
        assert headers["content-type"] == get_headers["content-type"], name
        _assert_site_headers(headers, name)
    assert _get(url, "/missing", "HEAD")[0] == 404


def test_a_foreign_host_is_refused(served):
    """DNS rebinding: a page whose own name points at 127.0.0.1 sends its name as Host."""
    _, url = served
    status, headers, body = _get(url, "/model.json", headers={"Host": f"rebind.example:{_port(url)}"})
    assert status == 400 and b"--allowed-host" in body
    _assert_site_headers(headers, "foreign host")
    assert _get(url, "/model.json", headers={"Host": f"localhost:{_port(url)}"})[0] == 200
    status, headers, _ = _get(url, "/model.json", "POST", headers={"Content-Type": "application/json"})
    assert status == 405 and headers["allow"] == "GET, HEAD"
    _assert_site_headers(headers, "POST")


def test_malformed_request_gets_a_json_400(served):
    with socket.create_connection(("127.0.0.1", _port(served[1])), timeout=10) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b'"error"' in body
    assert b"x-content-type-options: nosniff" in head.lower()


def test_with_a_token_every_path_needs_it_as_header_or_cookie(site):
    app = site_app(site, Access(TOKEN, ("site.lan",)))
    with TestClient(app, base_url="http://localhost", follow_redirects=False) as client:
        for path in ("/", "/index.html", "/model.onnx", "/ort/ort-wasm-simd-threaded.wasm"):
            out = client.get(path)
            assert out.status_code == 401 and out.headers["www-authenticate"] == "Bearer", path
            assert out.headers["cross-origin-embedder-policy"] == "require-corp"
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        assert client.get("/?token=wrong-token-of-some-length").status_code == 401
        assert client.get("/model.json", headers={"Cookie": "cmkit_token=wrong"}).status_code == 401
        assert not client.cookies
        out = client.get(f"/?token={TOKEN}")
        assert out.status_code == 303 and out.headers["location"] == "/"
        cookie = out.headers["set-cookie"]
        assert cookie.startswith(f"cmkit_token={TOKEN};") and all(
            part in cookie for part in ("HttpOnly", "SameSite=Strict", "Path=/")), cookie
        for path in ("/", "/model.onnx", "/ort/ort.wasm.min.mjs"):  # the page's own loads carry the cookie
            assert client.get(path).status_code == 200, path
        assert client.get("/model.json", headers={"Host": "site.lan"}).status_code == 200
        assert client.get("/model.json", headers={"Host": "other.lan"}).status_code == 400  # before the token


def test_long_names_are_404s_in_cmkit_serves_local_site(tmp_path, monkeypatch):
    """`cmkit serve`'s /local/ (BrowserSite.file): a name too long for the OS, a NUL, a way out."""
    from starlette.exceptions import HTTPException
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "index.html").write_text("page")
    monkeypatch.setattr(static_site, "check_web_model", lambda run: None)
    monkeypatch.setattr(static_site, "find_ort_web", lambda: None)
    monkeypatch.setattr(BrowserSite, "_build", lambda self: folder.resolve())
    browser = BrowserSite(run=None)
    assert asyncio.run(browser.file("index.html")) == (folder / "index.html").resolve()
    for path in (LONG, f"ort/{LONG}/x.wasm", "\x00", "../site/../../etc/passwd", "nothing"):
        with pytest.raises(HTTPException) as refusal:
            asyncio.run(browser.file(path))
        assert refusal.value.status_code == 404, path


@pytest.mark.parametrize("argv, words", [
    (["{missing}"], "not a site written by cmkit export web"),
    (["{site}", "--port", "70000"], "--port"),
    (["{site}", "--port", "-1"], "--port"),
    (["{site}", "--host", "0.0.0.0"], "give a token"),
    (["{site}", "--token", "short"], "at least 16"),
    (["{site}", "--max-connections", "0"], "--max-connections"),
    (["{site}", "--header-timeout", "nan"], "finite"),
])
def test_bad_input_is_a_one_line_error(argv, words, capsys, site):
    argv = [a.format(site=site, missing=site.parent / "missing") for a in argv]
    assert words in refused(capsys, "serve-site", *argv)


def _start(site, *args, env=None) -> tuple[subprocess.Popen, str]:
    """`python -m cmkit serve-site` on a free port: the process and the URL it prints."""
    process = subprocess.Popen([sys.executable, "-m", "cmkit", "serve-site", str(site), "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = process.stdout.readline()
    match = re.search(r"serving .* at (http://127\.0\.0\.1:\d+/) \(Ctrl-C stops\)", line)
    if match is None:
        process.kill()
        raise AssertionError(f"no URL line: {line!r} {process.stderr.read()}")
    return process, match.group(1)


def _stop(process: subprocess.Popen) -> tuple[int, float, str]:
    """SIGTERM: (exit status, seconds it took, stderr)."""
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        rc = process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    return rc, time.monotonic() - start, process.stderr.read()


@pytest.mark.slow
def test_a_client_leaving_mid_download_prints_no_traceback(site, tmp_path):
    big = tmp_path / "big"
    for name in ("index.html", "model.json"):
        big.mkdir(exist_ok=True)
        (big / name).write_bytes((site / name).read_bytes())
    with open(big / "model.onnx", "wb") as f:
        f.truncate(256 * 2**20)  # sparse: reads as zeros, costs no disk
    process, url = _start(big)
    try:
        for linger in (False, True):  # a plain close, then a reset
            sock = socket.create_connection(("127.0.0.1", _port(url)), timeout=10)
            sock.sendall(b"GET /model.onnx HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            if linger:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            sock.close()
        time.sleep(1)
        assert _get(url, "/model.json")[0] == 200  # still serving
    finally:
        rc, _, err = _stop(process)
    assert rc == 0 and "Traceback" not in err and "Error" not in err, err


@pytest.mark.slow
def test_a_real_server_takes_the_token_times_out_headers_and_stops_on_sigterm(site):
    """The command's wiring ($CMKIT_SERVE_TOKEN, --header-timeout), then SIGTERM while idle: < 2 s."""
    process, url = _start(site, "--header-timeout", "0.5", env={**os.environ, "CMKIT_SERVE_TOKEN": TOKEN})
    try:
        assert _get(url, "/")[0] == 401
        status, headers, _ = _get(url, f"/?token={TOKEN}")
        assert status == 303
        assert _get(url, "/model.onnx", headers={"Cookie": headers["set-cookie"].split(";")[0]})[0] == 200
        with socket.create_connection(("127.0.0.1", _port(url)), timeout=10) as silent:
            start = time.monotonic()
            assert silent.recv(65536).startswith(b"HTTP/1.1 408") and time.monotonic() - start < 3
        idle = socket.create_connection(("127.0.0.1", _port(url)))  # a connected client does not hold it up
    finally:
        rc, took, err = _stop(process)
    idle.close()
    assert rc == 0 and took < 2, (rc, took, err)


@pytest.mark.slow
def test_chromium_with_the_token_cookie_loads_modules_workers_and_fetches(tmp_path):
    """The cookie design works where it must: a page's module, module worker and fetch all carry it."""
    from cmkit.serve.server import serve_in_thread as serve_app
    from helpers import chromium
    (tmp_path / "index.html").write_text('<!doctype html><title>start</title><script type="module" src="m.mjs">'
                                         '</script>')
    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "m.mjs").write_text(
        'const r = await fetch("model.json");\n'
        'const w = new Worker(new URL("w.mjs", import.meta.url), {type: "module"});\n'
        'w.onmessage = (e) => { document.title = `fetch ${r.status} worker ${e.data} ${crossOriginIsolated}`; };\n')
    (tmp_path / "w.mjs").write_text('postMessage((await fetch("model.json")).status);\n')
    server, url = serve_app(site_app(tmp_path, Access(TOKEN)))
    browser, reason = chromium()
    assert browser is not None, reason
    try:
        browser.get(url)
        assert browser.title != "start"  # the 401: no page without the token
        browser.get(f"{url}?token={TOKEN}")
        deadline = time.monotonic() + 30
        while not browser.title.startswith("fetch") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert browser.current_url == url and browser.title == "fetch 200 worker 200 true", browser.title
    finally:
        browser.quit()
        server.should_exit = True
