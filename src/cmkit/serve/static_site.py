"""`cmkit serve-site SITE`: a folder written by `cmkit export web`, served as a static host should.

The same stack and front door as `cmkit serve` (`server.py`, `guard.py`): header and idle
timeouts, a connection limit, JSON 400s for malformed requests, a Host allow-list against DNS
rebinding, HEAD wherever GET works. On top of those, every answer (404s and refusals too) carries
the cross-origin isolation headers (COOP, COEP: WebAssembly threads), CORP, nosniff and
``Cache-Control: no-cache``; modules and WebAssembly get their MIME types; folders are not listed;
only files that resolve inside SITE are served (a symlink out of it is a 404).

With a token, every path needs it: as ``Authorization: Bearer TOKEN``, or as the ``cmkit_token``
cookie that ``GET /?token=TOKEN`` sets (a page's module and WebAssembly loads cannot send a
header, but they do send a same-origin cookie).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import cookie_parser
from starlette.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from ..errors import CmkitError
from ..export.web import ISOLATION_HEADERS, check_web_model, export_web, find_ort_web
from .guard import Access, Guard, Refused, bearer
from .server import DrainingServer, config
from .server import serve_in_thread as serve_app_in_thread

TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".onnx": "application/octet-stream", ".html": "text/html; charset=utf-8"}
SITE_HEADERS = {**ISOLATION_HEADERS, "Cross-Origin-Resource-Policy": "same-origin",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
TOKEN_COOKIE = "cmkit_token"
DRAIN_TIMEOUT = 10.0  # seconds downloads in flight may take to finish after SIGTERM


class SiteFiles(StaticFiles):
    """Starlette's StaticFiles with ``follow_symlink=False`` (a path that resolves outside the folder
    is not found), cmkit's MIME types, and a 404 for any name the OS refuses (too long, a symlink
    loop, no permission), not a 500 or StaticFiles' 401."""

    def lookup_path(self, path: str):
        try:
            return super().lookup_path(path)
        except OSError:
            return "", None

    def file_response(self, full_path, stat_result, scope, status_code: int = 200):
        response = super().file_response(full_path, stat_result, scope, status_code)
        media_type = TYPES.get(Path(full_path).suffix)
        if media_type is not None and isinstance(response, FileResponse):
            response.headers["content-type"] = media_type
        return response


class SiteHeaders:
    """Adds `SITE_HEADERS` to every answer, replacing the guard's ``Cache-Control: no-store``."""

    encoded = [(k.lower().encode(), v.encode()) for k, v in SITE_HEADERS.items()]
    names = {name for name, _ in encoded}

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message = {**message, "headers": kept + self.encoded}
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class TokenGate:
    """With a token, every request needs it: ``Authorization: Bearer`` or the `TOKEN_COOKIE`.
    ``GET /?token=TOKEN`` (checked in constant time) sets that cookie and redirects to ``/``. Runs
    inside the guard, so the Host check comes first and a refusal gets the guard's JSON 401."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.access.token is None:  # a WebSocket: StaticFiles closes it
            return await self.app(scope, receive, send)
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
        if scope["path"] == "/" and given:
            if not self.access.token_ok(given[-1]):
                raise Refused(401, "wrong token")
            cookie = f"{TOKEN_COOKIE}={quote(given[-1], safe='')}; HttpOnly; SameSite=Strict; Path=/"
            return await RedirectResponse("/", 303, headers={"set-cookie": cookie})(scope, receive, send)
        headers = Headers(scope=scope)
        cookie = cookie_parser(headers.get("cookie", "")).get(TOKEN_COOKIE)
        if not (self.access.token_ok(bearer(headers)) or cookie and self.access.token_ok(unquote(cookie))):
            raise Refused(401, "missing or wrong token: open /?token=TOKEN once, or send 'Authorization: Bearer "
                               "TOKEN'", {"www-authenticate": "Bearer"})
        await self.app(scope, receive, send)


class Recorder:
    """Appends each request's path to ``requests`` (what a page asked for, for tests and benches)."""

    def __init__(self, app, requests: collections.deque):
        self.app, self.requests = app, requests

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            self.requests.append(scope["path"])
        await self.app(scope, receive, send)


async def _json_error(request, e: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))


def check_site(site: str | Path) -> Path:
    site = Path(site)
    if not (site / "index.html").is_file() or not (site / "model.json").is_file():
        raise CmkitError(f"{site} is not a site written by cmkit export web (no index.html and model.json)")
    return site


def site_app(site: str | Path, access: Access = Access()) -> Starlette:
    """The ASGI app serving ``site``; ``app.state.requests`` holds the paths asked for (the newest
    10,000). The guard gets the host list only: `TokenGate` checks the token, cookie included."""
    site = check_site(site)
    requests: collections.deque = collections.deque(maxlen=10_000)
    app = Starlette(routes=[Mount("/", SiteFiles(directory=site, html=True))],
                    middleware=[Middleware(Recorder, requests=requests), Middleware(SiteHeaders),
                                Middleware(Guard, access=dataclasses.replace(access, token=None),
                                           body_limit=lambda path: 0, read_timeout=30.0, head_as_get=False),
                                Middleware(TokenGate, access=access)],
                    exception_handlers={HTTPException: _json_error})
    app.state.requests = requests
    return app


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port): a refusal is a one-line error, and port 0 has its number
    before the URL is printed."""
    sock = None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # clients that come before uvicorn's loop runs wait in the backlog
    except OSError as e:
        if sock is not None:
            sock.close()
        raise CmkitError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve_site(site: str | Path, host: str = "127.0.0.1", port: int = 8000, *, access: Access = Access(),
               **options) -> None:
    """Serve ``site`` until SIGTERM or Ctrl-C (options: `server.config`'s, e.g. ``max_connections``)."""
    app = site_app(site, access)
    sock = _listen(host, port)
    name = host.strip("[]")
    url = f"http://{f'[{name}]' if ':' in name else name}:{sock.getsockname()[1]}/"
    print(f"serving {site} at {url} (Ctrl-C stops)" +
          (f"; open {url}?token=YOUR_TOKEN once per browser" if access.token else ""), flush=True)
    options.setdefault("drain_timeout", DRAIN_TIMEOUT)
    DrainingServer(config(app, host=host, port=port, **options)).run(sockets=[sock])


def serve_in_thread(site: str | Path) -> tuple[DrainingServer, str]:
    """(the server, its URL) on a free loopback port, serving from a daemon thread; ``server.requests``
    holds the paths asked for, ``server.should_exit = True`` stops it."""
    app = site_app(site)
    server, url = serve_app_in_thread(app)
    server.requests = app.state.requests
    return server, url
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
        try:
            file = (folder / path).resolve()
            found = file.is_relative_to(folder) and file.is_file()
        except (OSError, ValueError):  # a name too long, a NUL byte: no such file
            found = False
        if not found:
            raise HTTPException(404, "not found")
        return file

    def _build(self) -> Path:
        from ..run import load_run

        self._tmp = tempfile.TemporaryDirectory(prefix="cmkit-site-")
        run = load_run(self.run.path)  # a copy on the CPU: the served model stays where it is
        return export_web(run, Path(self._tmp.name) / "site").resolve()


__all__ = ["BrowserSite", "check_site", "serve_in_thread", "serve_site", "site_app"]
