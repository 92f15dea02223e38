"""The server's front door: an ASGI middleware that every request passes before any route sees it.

In order, it
- refuses a ``Host`` header outside the allow-list (loopback names, the bound address and
  ``--allowed-host``): a DNS-rebinding page cannot talk to a server on 127.0.0.1;
- checks the bearer token (constant-time) on everything but the page and /healthz, when the
  server has one;
- refuses state-changing requests that a web page could forge: a POST must carry a JSON body or a
  header no HTML form can send (``X-Cmkit-Client`` or ``Authorization``), and an ``Origin``, when
  sent, must be the server's own;
- refuses a body over its route's limit, from Content-Length at once, else while it streams (the
  count runs on every chunk, so nothing larger is ever buffered or spooled), and a body whose
  chunks stop arriving for ``read_timeout`` seconds;
- answers HEAD wherever GET is answered (the GET route runs; its body is not sent);
- turns an unexpected exception into the API's 500 (logged, never sent to the client);
- adds security headers to every answer, 500s included, and counts every answer in the metrics.

A WebSocket handshake passes the same checks: Host, Origin (a browser always sends one), and the
token, as ``Authorization: Bearer`` or, from a browser (which cannot set headers on a WebSocket),
as the subprotocol ``cmkit.bearer.<base64url(token)>``; refused, it gets 403 before it opens.

Its refusals use the API's one error shape, ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import time
from dataclasses import dataclass, field

from starlette.exceptions import HTTPException

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
TOKEN_PROTOCOL = "cmkit.bearer."  # a browser's WebSocket carries the token as a subprotocol
log = logging.getLogger("cmkit.serve")
CLIENT_HEADER = "x-cmkit-client"
OPEN_PATHS = ("/", "/healthz")  # no token: the page holds no data, and probes have none
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


@dataclass(frozen=True)
class Access:
    """Who may call: ``token`` (None: anyone who reaches the port) and the host names the server
    answers to besides loopback (``"*"``: any)."""

    token: str | None = None
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)

    def host_allowed(self, host: str) -> bool:
        return "*" in self.allowed_hosts or is_loopback(host) or host in self.allowed_hosts

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or given is not None and hmac.compare_digest(given.encode(), self.token.encode())


def is_loopback(host: str) -> bool:
    """localhost, or any loopback address (all of 127.0.0.0/8, ::1)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer(headers: dict) -> str | None:
    scheme, _, credential = headers.get("authorization", "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else None


def protocol_token(headers: dict) -> str | None:
    """The token a browser sent as the WebSocket subprotocol ``cmkit.bearer.<base64url>``."""
    for offered in headers.get("sec-websocket-protocol", "").split(","):
        offered = offered.strip()
        if offered.startswith(TOKEN_PROTOCOL):
            encoded = offered[len(TOKEN_PROTOCOL):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return None
    return None


class Refused(HTTPException):
    """A request stopped at the door, or while its body streams: an HTTPException, so that a
    route reading the body passes it on to the app's error handler unchanged."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(status, message, headers or {})


def host_name(authority: str) -> str:
    """The host of a Host header or an Origin's authority: lowercase, without port or brackets."""
    authority = authority.strip().lower()
    if authority.startswith("["):  # [::1]:8000
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


class Guard:
    """``body_limit(path) -> bytes`` gives each route its largest body."""

    def __init__(self, app, *, access: Access, body_limit, read_timeout: float, metrics=None, head_as_get: bool = True):
        self.app, self.access, self.body_limit = app, access, body_limit
        self.read_timeout, self.metrics = read_timeout, metrics
        self.head_as_get = head_as_get  # False: the app answers HEAD itself (static files, without reading them)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await self.websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [None]  # the answer's status, once it has started
        head = scope["method"] == "HEAD" and self.head_as_get
        if head:  # answered as the GET, without its body
            scope = {**scope, "method": "GET"}

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                names = {name.lower() for name, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []),
                                                  *(h for h in SECURITY_HEADERS if h[0] not in names)]}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            self.check(scope, headers)
            await self.app(scope, self.limited(scope, headers, receive), send_with_headers)
        except Refused as e:
            if status[0] is not None:  # the answer is on its way: nothing better to do than stop
                raise
            await self.refuse(e, send_with_headers)
        except Exception:
            log.exception("request failed")
            if status[0] is not None:
                raise
            await self.refuse(Refused(500, "internal error; the server log has the details"), send_with_headers)
        finally:
            if self.metrics is not None:
                self.metrics.observe_request(scope["path"], status[0] or 500, time.perf_counter() - start)

    async def websocket(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check_host(headers)
            self.check_origin(headers)
            if not self.access.token_ok(bearer(headers) or protocol_token(headers)):
                raise Refused(401, "missing or wrong token")
        except Refused:
            await send({"type": "websocket.close", "code": 1008})  # before the handshake: HTTP 403
            return
        await self.app(scope, receive, send)

    def check_host(self, headers: dict) -> None:
        host = headers.get("host")
        if host is None or not self.access.host_allowed(host_name(host)):
            raise Refused(400, f"Host {host!r} is not served here; start the server with --allowed-host NAME "
                               "to answer to another name")

    def check_origin(self, headers: dict) -> None:
        """An Origin, when sent, must be the server's own or an allowed host's."""
        origin = headers.get("origin")
        if origin is None:
            return
        scheme, _, authority = origin.partition("://")
        if origin == "null" or host_name(authority) != host_name(headers.get("host", "")) and \
                not self.access.host_allowed(host_name(authority)):
            raise Refused(403, f"cross-origin request from {origin} refused")

    def check(self, scope, headers: dict) -> None:
        self.check_host(headers)
        if scope["path"] not in OPEN_PATHS and not self.access.token_ok(bearer(headers)):
            raise Refused(401, "missing or wrong token: send 'Authorization: Bearer TOKEN'",
                          {"www-authenticate": "Bearer"})
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            self.check_origin(headers)
            json_body = headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
            if not (json_body or CLIENT_HEADER in headers or "authorization" in headers):
                raise Refused(403, "a form POST is refused: send a JSON body or the X-Cmkit-Client header")
        limit = self.body_limit(scope["path"])
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refused(400, "invalid Content-Length")
            if int(declared) > limit:
                raise Refused(413, f"the request body is over the limit of {limit} bytes")

    def limited(self, scope, headers: dict, receive):
        """``receive`` that counts body bytes against the route's limit and times out slow bodies."""
        limit, timeout = self.body_limit(scope["path"]), self.read_timeout
        seen, done = [0], [False]

        async def receive_limited():
            if done[0]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                raise Refused(408, f"the request body stalled for {timeout:g} s") from None
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > limit:
                    raise Refused(413, f"the request body is over the limit of {limit} bytes")
                done[0] = not message.get("more_body", False)
            return message

        return receive_limited

    async def refuse(self, e: Refused, send) -> None:
        body = error_body(e.detail)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close"), *((k.encode(), v.encode()) for k, v in e.headers.items())]
        await send({"type": "http.response.start", "status": e.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
