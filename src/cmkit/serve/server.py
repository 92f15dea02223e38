"""Running an app under uvicorn, hardened for an open port, with a graceful stop.

One stack for `cmkit serve` and `cmkit serve-site`. uvicorn's HTTP/1.1 protocol (h11) gets the
limits a public server needs and plain uvicorn lacks:
- a **header timeout**: a connection must finish its request's headers within
  ``header_timeout`` seconds of its first byte (or of opening); slow-loris clients are closed;
- **connection limits that cannot lock clients out**: at ``max_connections`` open connections a
  new one evicts the oldest connection with no request in flight (idle keep-alive, unfinished
  headers), and gets a 503 only when every connection is busy computing an answer;
- malformed requests get a JSON 400 with the security headers, like every other answer.

SIGTERM or SIGINT: stop accepting connections, close idle ones at once, let requests in flight
finish for up to ``drain_timeout`` seconds (then cancel them), run the app's shutdown, exit 0. A
second signal exits at once. (Plain uvicorn ignores a second SIGTERM and re-raises the first
signal after its shutdown, so a drained server would still die of it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import SECURITY_HEADERS, error_body

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
HEADER_TIMEOUT = 10.0  # seconds to send a request's headers
IDLE_TIMEOUT = 5.0  # seconds a keep-alive connection may wait for its next request
MAX_CONNECTIONS = 256


def _raw_answer(status: int, reason: str, message: str) -> bytes:
    body = error_body(message)
    head = [f"HTTP/1.1 {status} {reason}".encode(), b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(), b"connection: close",
            *(name + b": " + value for name, value in SECURITY_HEADERS)]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, eviction of idle connections at the limit and
    JSON 400s. Class attributes set by `protocol_class`."""

    header_timeout: float = HEADER_TIMEOUT
    max_connections: int | None = MAX_CONNECTIONS
    header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened = self.loop.time()
        self._arm_header_timer()
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._make_room()

    def _make_room(self) -> None:
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11) and c.idle()]
        if idle:
            oldest = min(idle, key=lambda c: c.opened)
            oldest.transport.close()
            oldest.connections.discard(oldest)
            return
        self.transport.write(_raw_answer(503, "Service Unavailable", "the server has too many connections, all "
                                                                    "busy; retry shortly"))
        self.transport.close()
        self.connections.discard(self)

    def idle(self) -> bool:
        """No request in flight: waiting for (the rest of) a request's headers, or kept alive."""
        return self.cycle is None or self.cycle.response_complete and self.conn.their_state is h11.IDLE

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        """Run the timer while a request's headers are incomplete: from the connection's first
        byte (or its opening) until they are in. A kept-alive connection between requests has
        uvicorn's idle timer instead."""
        if self.transport is None or self.transport.is_closing():
            return self._cancel_header_timer()
        receiving = self.conn.their_state is h11.IDLE and (self.cycle is None or self.timeout_keep_alive_task is None)
        if receiving and self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)
        elif not receiving:
            self._cancel_header_timer()

    def _cancel_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_raw_answer(408, "Request Timeout", f"the request's headers did not arrive "
                                                                         f"within {self.header_timeout:g} s"))
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_raw_answer(400, "Bad Request", "malformed HTTP request"))
        self.transport.close()


def protocol_class(header_timeout: float = HEADER_TIMEOUT, max_connections: int | None = MAX_CONNECTIONS) -> type:
    return type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout, "max_connections": max_connections})


class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig, frame) -> None:
        if self.should_exit:  # the second signal: stop waiting for anything
            self.force_exit = True
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def config(app, *, host: str, port: int, drain_timeout: float = 30.0, max_connections: int | None = MAX_CONNECTIONS,
           header_timeout: float = HEADER_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
           ws_max_bytes: int = 5 * 2**20, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's configuration of the hardened stack (`GuardedH11`; WebSocket messages over
    ``ws_max_bytes`` close their connection)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                          http=protocol_class(header_timeout, max_connections), ws="websockets-sansio",
                          ws_max_size=ws_max_bytes, timeout_keep_alive=idle_timeout, server_header=False,
                          date_header=False)


def serve(app, *, host: str, port: int, **options) -> None:
    """Serve ``app`` until stopped (options: `config`'s)."""
    DrainingServer(config(app, host=host, port=port, **options)).run()


def serve_in_thread(app, **options) -> tuple[DrainingServer, str]:
    """(the server, its URL) on a free loopback port, serving from a daemon thread (tests, benches,
    notebooks). ``server.should_exit = True`` stops it."""
    import socket
    import time

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = DrainingServer(config(app, host="127.0.0.1", port=port, **options))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}/"
