"""Running the app under uvicorn with a graceful stop.

SIGTERM or SIGINT: stop accepting connections, let requests in flight finish for up to
``drain_timeout`` seconds (then cancel them), run the app's shutdown, exit 0. A second signal
exits at once. (Plain uvicorn ignores a second SIGTERM and re-raises the first signal after its
shutdown, so a drained server would still die of it.)
"""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def serve(app, *, host: str, port: int, drain_timeout: float = 30.0, max_connections: int | None = None,
          log_level: str = "warning") -> None:
    """Serve ``app`` until stopped. ``max_connections``: more concurrent connections get uvicorn's
    plain-text 503 before the app sees them."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                            limit_concurrency=max_connections, server_header=False)
    DrainingServer(config).run()
