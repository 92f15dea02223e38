"""The server's Prometheus metrics (prometheus_client, its own registry per app, so two servers in
one process, as in tests, do not share counters).

    cmkit_requests_total{route, status}        requests answered
    cmkit_request_seconds{route}               latency histogram, request start to response start
    cmkit_batch_size{lane}                     samples per network call (generate) or per edit call
    cmkit_queue_depth{lane}                    requests waiting for the worker
    cmkit_images_total                         samples delivered to clients; rate(cmkit_images_total[1m]) is images/s
    cmkit_dropped_total{lane, reason}          requests dropped before they ran: "disconnected" (the client
                                               left), "superseded" (a newer request of its live session came)
    cmkit_live_sessions                        open live (WebSocket) connections
    cmkit_live_frames_total                    frames sent on live connections (also in cmkit_images_total)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROUTES = ("/", "/api/info", "/api/generate", "/api/edit", "/api/interpolate", "/api/live", "/healthz", "/metrics",
          "/openapi.json", "/docs")


def route_label(path: str) -> str:
    """A bounded label for a request path: unknown paths are all "other" (a scanner must not
    create a time series per URL it tries)."""
    if path.startswith("/api/edit/"):
        return "/api/edit"
    return path if path in ROUTES else "other"


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("cmkit_requests", "HTTP requests answered", ["route", "status"], registry=registry)
        self.latency = Histogram("cmkit_request_seconds", "time from request to response", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("cmkit_batch_size", "samples per model call", ["lane"], buckets=BATCH_BUCKETS,
                                    registry=registry)
        self.queue_depth = Gauge("cmkit_queue_depth", "requests waiting for the model", ["lane"], registry=registry)
        self.images = Counter("cmkit_images", "samples delivered to clients", registry=registry)
        self.dropped = Counter("cmkit_dropped", "requests dropped before they ran", ["lane", "reason"],
                               registry=registry)
        self.live_sessions = Gauge("cmkit_live_sessions", "open live connections", registry=registry)
        self.live_frames = Counter("cmkit_live_frames", "frames sent on live connections", registry=registry)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
