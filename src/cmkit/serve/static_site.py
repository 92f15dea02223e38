"""`cmkit serve-site SITE`: a folder written by `cmkit export web`, served as a static host should.

The cross-origin isolation headers (COOP, COEP) let the page use WebAssembly threads; JavaScript
modules and WebAssembly get their MIME types; folders are not listed; only files under SITE are
served (the standard library's path translation, which drops ``..``). Each request is recorded in
``requests`` (for tests: what the page asked for).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from starlette.exceptions import HTTPException

from ..errors import CmkitError
from ..export.web import ISOLATION_HEADERS, check_web_model, export_web, find_ort_web

TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".html": "text/html; charset=utf-8"}


class SiteHandler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, **TYPES}

    def __init__(self, *args, requests: collections.deque, **kwargs):
        self.requests = requests
        super().__init__(*args, **kwargs)

    def end_headers(self) -> None:
        for name, value in {**ISOLATION_HEADERS, "Cross-Origin-Resource-Policy": "same-origin",
                            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}.items():
            self.send_header(name, value)
        super().end_headers()

    def send_head(self):
        try:
            return super().send_head()
        except ValueError:  # a NUL byte in the path: no such file
            self.send_error(404, "not found")
            return None

    def list_directory(self, path):
        self.send_error(404, "no listing")
        return None

    def log_request(self, code="-", size="-") -> None:  # recorded, not printed per request
        self.requests.append(self.path)

    def log_message(self, format, *args) -> None:
        pass


def site_server(site: str | Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server of ``site`` (not started); ``server.requests`` holds the paths asked for (the
    newest 10,000)."""
    site = Path(site)
    if not (site / "index.html").is_file() or not (site / "model.json").is_file():
        raise CmkitError(f"{site} is not a site written by cmkit export web (no index.html and model.json)")
    requests: collections.deque = collections.deque(maxlen=10_000)  # the newest, for tests
    handler = functools.partial(SiteHandler, directory=str(site), requests=requests)
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        raise CmkitError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    server.requests = requests
    return server


def serve_site(site: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    server = site_server(site, host, port)
    print(f"serving {site} at http://{host}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(site: str | Path) -> tuple[ThreadingHTTPServer, str]:
    """(the server, its URL) on a free loopback port, serving from a daemon thread."""
    server = site_server(site, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


class BrowserSite:
    """`cmkit serve`'s in-browser mode: the run's web page (as `cmkit export web` writes it), built
    in a temporary folder at the first request and kept for the server's life. The build runs once,
    whoever waits for it (a waiter that leaves does not cancel it); if it fails, the mode is off."""

    def __init__(self, run):
        self.run, self.build, self._tmp = run, None, None
        try:
            check_web_model(run)
            find_ort_web()
            self.reason = None
        except CmkitError as e:
            self.reason = str(e)

    def unavailable(self) -> str | None:
        """Why this run has no in-browser mode, or None."""
        return self.reason

    async def file(self, path: str) -> Path:
        if self.reason is not None:
            raise HTTPException(404, f"no in-browser mode here: {self.reason}")
        if self.build is None:
            self.build = asyncio.ensure_future(asyncio.to_thread(self._build))
        try:
            folder = await asyncio.shield(self.build)
        except CmkitError as e:
            self.reason = f"the export failed: {e}"
            raise HTTPException(404, f"no in-browser mode here: {self.reason}") from None
        except Exception:
            logging.getLogger("cmkit.serve").exception("building the in-browser page failed")
            self.reason = "the export failed (the server log has the details)"
            raise HTTPException(404, f"no in-browser mode here: {self.reason}") from None
        if "\x00" in path:
            raise HTTPException(404, "not found")
        file = (folder / path).resolve()
        if not file.is_relative_to(folder) or not file.is_file():
            raise HTTPException(404, "not found")
        return file

    def _build(self) -> Path:
        from ..run import load_run

        self._tmp = tempfile.TemporaryDirectory(prefix="cmkit-site-")
        run = load_run(self.run.path)  # a copy on the CPU: the served model stays where it is
        return export_web(run, Path(self._tmp.name) / "site").resolve()


__all__ = ["BrowserSite", "serve_in_thread", "serve_site", "site_server"]
