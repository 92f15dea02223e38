"""`cmkit serve` live: work nobody waits for is dropped, the WebSocket channel keeps only the newest
input, and the live channel answers what the library computes.

One real server (cmkit's hardened uvicorn stack, in a thread) for the module; its generation lane
runs a slowed model that records which requests reached it, so a test can count model calls."""

import asyncio
import base64
import io
import json
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

import cmkit
from cmkit.editing import tasks
from cmkit.serve.app import create_app
from cmkit.serve.engine import Limits
from cmkit.serve.guard import Access
from helpers import serving

TOKEN = "a-long-enough-live-token-0123"
LIMITS = Limits(max_n=8, max_upload_bytes=4000, max_json_bytes=2048)
SLOW = 0.4  # seconds per slowed model call


@pytest.fixture(scope="module")
def run(image_run):
    return cmkit.load_run(image_run)


@pytest.fixture(scope="module")
def server(run):
    """(url, app, calls): ``calls`` lists the seeds of every generation the model computed."""
    app = create_app(run, limits=LIMITS, access=Access(TOKEN), warmup=False)
    calls, lane = [], app.state.batcher
    compute = lane.run_group

    def slowed(work):
        calls.append([w.seed for w in work])
        if any(w.seed >= 1000 for w in work):  # seeds from 1000: the slow requests
            time.sleep(SLOW)
        return compute(work)
    lane.run_group = slowed
    with serving(app) as url:
        yield url, app, calls


def _headers(**extra):
    return {"Authorization": f"Bearer {TOKEN}", **extra}


def _generate(url, seed, session=None, **body):
    import httpx
    headers = _headers(**({"X-Cmkit-Session": session} if session else {}))
    return httpx.post(f"{url}/api/generate", json={"n": 1, "seed": seed, "format": "json", "class": "1", **body},
                      headers=headers, timeout=60)


def _metric(app, name, **labels):
    value = app.state.metrics.registry.get_sample_value(name, labels)
    return 0 if value is None else value


def test_superseded_requests_never_reach_the_model(server):
    url, app, calls = server
    calls.clear()
    results = {}

    def ask(seed):
        results[seed] = _generate(url, seed, session="tab-1")
    first = threading.Thread(target=ask, args=(1000,))
    first.start()
    time.sleep(SLOW / 4)  # the first is computing; the rest wait, each superseding the one before
    later = [threading.Thread(target=ask, args=(seed,)) for seed in (1001, 1002, 1003)]
    for t in later:
        t.start()
        time.sleep(0.03)
    for t in (first, *later):
        t.join()
    assert results[1000].status_code == 200 and results[1003].status_code == 200
    for seed in (1001, 1002):
        assert results[seed].status_code == 409 and "superseded" in results[seed].json()["error"]
    assert sorted(s for call in calls for s in call) == [1000, 1003]  # the dropped ones cost no model call
    assert _metric(app, "cmkit_dropped_total", lane="generate", reason="superseded") >= 2
    # The newest is what the library computes for its seed.
    want = app.state.engine.run.sample(1, seed=1003, class_labels="1")
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(results[1003].json()["images"][0].split(",")[1]))))
    assert np.array_equal(got, want[0, 0])


def test_a_client_that_disconnects_while_queued_costs_no_model_call(server):
    url, app, calls = server
    calls.clear()
    images = _metric(app, "cmkit_images_total")
    busy = threading.Thread(target=_generate, args=(url, 2000))
    busy.start()
    time.sleep(SLOW / 4)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"n": 1, "seed": 2001, "format": "json", "class": "1"}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(0.05)
    sock.close()  # gone while the first request computes
    busy.join()
    time.sleep(SLOW)
    assert [s for call in calls for s in call] == [2000]
    assert _metric(app, "cmkit_dropped_total", lane="generate", reason="disconnected") >= 1
    assert _metric(app, "cmkit_images_total") == images + 1  # only the delivered image counts


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _connect(url, token=TOKEN, host=None, **kwargs):
    """A WebSocket to /api/live as a browser opens it (the token as a subprotocol); ``host``: the
    name in the Host header (the connection still goes to the server)."""
    from websockets.sync.client import connect
    protocols = ["cmkit"] + ([f"cmkit.bearer.{base64.urlsafe_b64encode(token.encode()).decode().rstrip('=')}"]
                             if token else [])
    port = int(url.rsplit(":", 1)[1])
    return connect(f"ws://{host or '127.0.0.1'}:{port}/api/live", sock=socket.create_connection(("127.0.0.1", port)),
                   subprotocols=protocols, open_timeout=30, **kwargs)


def _frames(ws, until_seq):
    """(meta, image) of every frame up to the one for ``until_seq``, and the errors."""
    frames, errors = [], []
    while True:
        meta = json.loads(ws.recv(timeout=60))
        if meta["type"] == "error":
            errors.append(meta)
            if meta["seq"] >= until_seq:
                return frames, errors
            continue
        frames.append((meta, np.asarray(Image.open(io.BytesIO(ws.recv(timeout=60))))))
        if meta["seq"] >= until_seq:
            return frames, errors


def test_live_frames_equal_the_library_and_the_newest_input_wins(server, run):
    url, app, calls = server
    canvas = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    with _connect(url) as ws:
        assert ws.subprotocol == "cmkit"  # the token's subprotocol is never echoed
        ws.send(json.dumps({"seed": 5, "class": "3", "steps": 2}))
        (meta, image), = _frames(ws, 1)[0]
        assert np.array_equal(image, run.sample(1, seed=5, steps=2, class_labels="3")[0, 0])
        assert set(meta["timings"]) >= {"network", "decode", "png"} and meta["latency_ms"] > 0
        ws.send(_png(canvas))
        (meta, image), = _frames(ws, 2)[0]
        want = tasks.stroke(run, canvas[None, None], sigmas=tasks.strength_levels(run, 0.6, 2), seed=5,
                            class_labels="3")
        assert np.array_equal(image, want[0, 0])
        computed = app.state.edits.computed
        for seed in range(100):  # a burst: only the newest input matters
            ws.send(json.dumps({"seed": seed, "strength": 0.5}))
        frames, errors = _frames(ws, 102)
        assert errors == [] and 1 <= len(frames) <= 5 and app.state.edits.computed - computed == len(frames)
        want = tasks.stroke(run, canvas[None, None], sigmas=tasks.strength_levels(run, 0.5, 2), seed=99,
                            class_labels="3")
        assert np.array_equal(frames[-1][1], want[0, 0])
        ws.send(json.dumps({"strength": 7}))  # a bad input is answered, the connection stays
        assert "strength" in _frames(ws, 103)[1][0]["error"]
        ws.send(b"")  # no canvas: generation again
        assert np.array_equal(_frames(ws, 104)[0][-1][1], run.sample(1, seed=99, steps=2, class_labels="3")[0, 0])


def test_the_live_channel_is_guarded(server):
    from websockets.exceptions import ConnectionClosed, InvalidStatus
    url, app, _ = server
    for kwargs in ({"token": None}, {"token": "wrong-token-wrong-token"},
                   {"origin": "http://evil.example"}, {"host": "evil.example"}):
        with pytest.raises(InvalidStatus) as refused:
            _connect(url, **kwargs).close()
        assert refused.value.response.status_code == 403, kwargs
    with _connect(url, origin=url) as ws:  # the page's own origin is fine
        ws.send(json.dumps({"seed": 1, "class": "1"}))
        assert _frames(ws, 1)[0]
    for oversized in (b"\x89PNG" + b"\0" * LIMITS.max_upload_bytes, json.dumps({"prompt": "a" * 3000})):
        with _connect(url) as ws:
            ws.send(oversized)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=30)
            assert closed.value.rcvd.code == 1009
    held = [_connect(url) for _ in range(LIMITS.max_live_sessions)]
    try:  # one more than the limit: told so with 1013 (after the handshake, so the code reaches it)
        with _connect(url) as extra, pytest.raises(ConnectionClosed) as closed:
            extra.recv(timeout=30)
        assert closed.value.rcvd.code == 1013
    finally:
        for ws in held:
            ws.close()
    deadline = time.monotonic() + 10
    while _metric(app, "cmkit_live_sessions") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    with _connect(url) as ws:  # faster than the rate limit: closed with a policy violation
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(int(LIMITS.max_live_rate) * 10):  # far past the rate, even on a loaded machine
                ws.send(json.dumps({"seed": 1}))
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1008


def test_idle_connections_do_not_starve_an_authorised_client(server):
    """300 connections that never finish their headers: the server closes the oldest idle ones to
    make room, so a real request is answered at its usual latency."""
    url, app, _ = server
    port = int(url.rsplit(":", 1)[1])
    start = time.perf_counter()
    assert _generate(url, 7).status_code == 200
    normal = time.perf_counter() - start
    idle = []
    for _ in range(300):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: local")
        idle.append(s)
    try:
        for _ in range(3):
            start = time.perf_counter()
            assert _generate(url, 7).status_code == 200
            assert time.perf_counter() - start < 2 * normal + 0.25
    finally:
        for s in idle:
            s.close()


def test_malformed_requests_and_head_get_proper_answers(server):
    url, _, _ = server
    import httpx
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GARBAGE\r\n\r\n")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400") and b'"error"' in answer and b"x-content-type-options" in answer
    head = httpx.head(f"{url}/api/info", headers=_headers())
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == httpx.get(f"{url}/api/info", headers=_headers()).headers["content-length"]
