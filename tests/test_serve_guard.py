"""`cmkit serve` as an attacker and a load tester meet it: access control (token, Host, forged
cross-site POSTs), one error shape, body limits enforced while the body streams, read timeouts,
separate lanes for edits and generations, NaN/inf in every numeric field, a hypothesis fuzz of
every endpoint, Prometheus metrics, and a graceful SIGTERM drain of a real server process."""

import io
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import cmkit
from cmkit.serve.app import create_app
from cmkit.serve.engine import Limits
from cmkit.serve.guard import Access
from helpers import cli, free_port, local_client

TOKEN = "a-long-enough-test-token-0123"
LIMITS = Limits(max_n=8, max_upload_bytes=20000, max_upload_pixels=4096, max_json_bytes=2048)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(image_run):
    return cmkit.load_run(image_run)


@pytest.fixture(scope="module")
def client(run):
    with local_client(create_app(run, limits=LIMITS)) as c:
        yield c


@pytest.fixture(scope="module")
def guarded(run):
    """An app with a token and one extra allowed host name."""
    app = create_app(run, limits=LIMITS, access=Access(TOKEN, ("cmkit.lan",)), warmup=False)
    with TestClient(app, base_url="http://localhost") as c:
        yield c


# --- access ---------------------------------------------------------------------------------


def test_the_token_is_required_on_every_api_call(guarded):
    for path in ("/api/info", "/metrics", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong-token-of-the-same-size!"},
                        {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
            out = guarded.get(path, headers=headers)
            assert out.status_code == 401 and "token" in out.json()["error"], (path, headers, out.text)
            assert out.headers["www-authenticate"] == "Bearer"
        assert guarded.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
    out = guarded.post("/api/generate", json={"n": 1})
    assert out.status_code == 401
    out = guarded.post("/api/generate", json={"n": 1, "format": "json"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert out.status_code == 200 and out.json()["n"] == 1
    # The page (no data in it) and the health probe need no token.
    assert guarded.get("/").status_code == 200 and guarded.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("host, status", [("localhost:8000", 200), ("127.0.0.1", 200), ("[::1]:8000", 200),
                                          ("127.0.0.2:8000", 200), ("127.255.0.9", 200), ("128.0.0.1", 400),
                                          ("cmkit.lan:8000", 200), ("evil.example", 400),
                                          ("localhost.evil.example", 400), ("", 400)])
def test_host_allow_list(guarded, host, status):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: that Host is refused."""
    out = guarded.get("/healthz", headers={"Host": host})
    assert out.status_code == status, out.text
    if status != 200:
        assert "Host" in out.json()["error"]


def test_forged_cross_site_posts_are_refused(client, run):
    image = png(np.zeros((8, 8), np.uint8))
    form = {"files": {"image": ("i.png", image), "mask": ("m.png", image)}, "data": {"class": "null"}}
    with TestClient(create_app(run, limits=LIMITS, warmup=False), base_url="http://localhost") as bare:
        forged_posts_refused(client, bare, form)


def forged_posts_refused(client, bare, form):
    """``bare`` sends no X-Cmkit-Client header."""    # An HTML form can POST multipart (or text/plain) anywhere, but cannot add a header.
    out = bare.post("/api/edit/inpaint", **form)
    assert out.status_code == 403 and "form POST" in out.json()["error"]
    out = bare.post("/api/generate", content=b'{"n": 1}', headers={"content-type": "text/plain"})
    assert out.status_code == 403
    # A page elsewhere sends its Origin: refused even with a JSON body or the header.
    for origin in ("http://evil.example", "null", "http://localhost.evil.example:8000"):
        out = client.post("/api/generate", json={"n": 1}, headers={"Origin": origin})
        assert out.status_code == 403 and "cross-origin" in out.json()["error"], origin
    # The page itself (same origin) and scripts (no Origin) pass.
    assert client.post("/api/edit/inpaint", headers={"Origin": "http://localhost"}, **form).status_code == 200
    assert bare.post("/api/generate", json={"n": 1}).status_code == 200


def test_one_error_shape_and_security_headers(client):
    for method, path, status in [("get", "/nope", 404), ("get", "/api/generate", 405), ("post", "/api/info", 405),
                                 ("get", "/docs", 404), ("post", "/api/edit/teleport", 404)]:
        out = getattr(client, method)(path)
        assert out.status_code == status and set(out.json()) == {"error"}, (path, out.text)
    for out in (client.get("/"), client.get("/nope"), client.post("/api/generate", json={"n": 1})):
        assert out.headers["x-content-type-options"] == "nosniff"
        assert out.headers["content-security-policy"] == "frame-ancestors 'none'"
        assert out.headers["referrer-policy"] == "no-referrer"
    assert "/api/generate" in client.get("/openapi.json").json()["paths"]  # docs: off; the schema: there
    head = client.head("/api/info")  # HEAD wherever GET is answered, without the body
    assert head.status_code == 200 and head.content == b"" and head.headers["x-content-type-options"] == "nosniff"


def test_a_failure_inside_is_a_500_with_the_security_headers(run, monkeypatch):
    app = create_app(run, limits=LIMITS, warmup=False)
    with local_client(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(app.state.engine, "generation", lambda **kw: 1 / 0)
        out = c.post("/api/generate", json={"n": 1})
    assert out.status_code == 500 and out.json() == {"error": "internal error; the server log has the details"}
    assert out.headers["x-content-type-options"] == "nosniff" and out.headers["x-frame-options"] == "DENY"
    assert "ZeroDivision" not in out.text


def test_a_guidance_that_overflows_the_model_is_an_error_not_black_images(image_run):
    teacher = cmkit.load_run(image_run.parent / "edm")
    with local_client(create_app(teacher, limits=LIMITS, warmup=False)) as c:
        out = c.post("/api/generate", json={"n": 1, "class": "1", "guidance": 1e38, "steps": 2})
        assert out.status_code == 400 and "not finite" in out.json()["error"] and "1e+38" in out.json()["error"]
        assert c.post("/api/generate", json={"n": 1, "class": "1", "guidance": 2.0, "steps": 2}).status_code == 200


def test_error_messages_carry_no_object_addresses(client):
    from cmkit.serve.app import client_message
    assert client_message("cannot read <_io.BytesIO object at 0x7f3a2c1b9e50>\nmore") == \
        "cannot read <_io.BytesIO object>"
    out = client.post("/api/edit/inpaint", files={"image": ("i.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 40),
                                                  "mask": ("m.png", b"junk")}, data={"class": "null"})
    assert out.status_code == 400 and "0x" not in out.text


@pytest.mark.parametrize("argv, words", [
    (["--host", "0.0.0.0"], "give a token"),
    (["--host", "192.0.2.7"], "give a token"),
    (["--host", "0.0.0.0", "--token", "short"], "at least 16"),
    (["--token", TOKEN, "--token-file", "t.txt"], "one way"),
    (["--port", "0"], "--port"),
    (["--drain-timeout", "nan"], "finite"),
])
def test_serve_command_refuses_unsafe_or_bad_settings(argv, words, capsys, tmp_path):
    assert cli("serve", "--checkpoint", tmp_path / "missing", *argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# --- validation -----------------------------------------------------------------------------

BAD_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "true", "2.5", '"7"x']
JSON_FIELDS = {"/api/generate": ["n", "seed", "steps", "guidance", "sigmas"],
               "/api/interpolate": ["seed_a", "seed_b", "frames", "guidance"]}
FORM_FIELDS = ["seed", "steps", "n", "guidance", "factor", "sigma"]


@pytest.mark.parametrize("path, field", [(p, f) for p, fields in JSON_FIELDS.items() for f in fields])
def test_every_json_number_refuses_nan_and_inf(client, path, field):
    for bad in BAD_NUMBERS:
        value = f"[2.0, {bad}]" if field == "sigmas" else bad
        body = f'{{"{field}": {value}, "format": "json"}}'.encode()
        out = client.post(path, content=body, headers={"content-type": "application/json"})
        assert out.status_code == 400 and set(out.json()) == {"error"}, (field, bad, out.text)


@pytest.mark.parametrize("field", FORM_FIELDS)
def test_every_form_number_refuses_nan_and_inf(client, field):
    image = png(np.full((8, 8), 128, np.uint8))
    task = {"factor": "superres", "sigma": "denoise"}.get(field, "inpaint")
    for bad in ["nan", "inf", "-inf", "1e999", "2.5x", ""]:
        if field in ("guidance", "sigma") and bad == "":
            continue  # an empty optional field is the default
        files = {"image": ("i.png", png(np.zeros((4, 4), np.uint8)) if task == "superres" else image),
                 "mask": ("m.png", image)}
        out = client.post(f"/api/edit/{task}", files=files, data={field: bad, "class": "null"})
        assert out.status_code == 400 and set(out.json()) == {"error"}, (field, bad, out.text)


def test_the_cli_shares_the_seed_check(capsys, tmp_path):
    from cmkit.errors import CmkitError
    from cmkit.validate import check_float, check_seed
    assert cli("sample", "--checkpoint", tmp_path, "--n", 1, "--seed", 2**63) == 2
    assert "seeds are integers in [0, 2^63)" in capsys.readouterr().err
    with pytest.raises(CmkitError, match="seeds are integers"):
        check_seed(2**63)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(CmkitError):
            check_float("x", bad)


# --- limits while streaming, lanes, queue entries ------------------------------------------


def test_a_declared_oversized_body_is_refused_before_reading(client):
    for path, limit in (("/api/generate", LIMITS.body_bytes(False)), ("/api/edit/inpaint", LIMITS.body_bytes(True))):
        out = client.post(path, content=b"x" * (limit + 1), headers={"content-type": "application/json"})
        assert out.status_code == 413 and "limit" in out.json()["error"], out.text


def test_too_many_files_or_fields_are_refused(client):
    image = png(np.zeros((8, 8), np.uint8))
    files = [("image", ("i.png", image)), ("mask", ("m.png", image)), ("extra", ("x.png", image))]
    out = client.post("/api/edit/inpaint", files=files)
    assert out.status_code == 400 and set(out.json()) == {"error"}
    out = client.post("/api/edit/inpaint", files={"image": ("i.png", image)}, data={"colour": "red"})
    assert out.status_code == 400 and "colour" in out.json()["error"]


def test_queue_entries_hold_the_request_not_its_noise(client, run):
    """The noise of a waiting generation is drawn when its batch runs."""
    import torch
    key, work = client.app.state.engine.generation(n=8, seed=3, steps=2, sigmas=None, class_spec="1",
                                                   guidance=None)
    sizes = [v.numel() for v in vars(work).values() if isinstance(v, torch.Tensor)]
    assert max(sizes) < 8 * run.dim  # levels and labels, no (n, C, H, W) tensor
    # and drawing it then still gives the command line's samples (seed 3, its own generator)
    [batched] = client.app.state.engine.run_group([work])
    np.testing.assert_array_equal(batched, run.sample(8, seed=3, steps=2, class_labels="1"))


def test_a_long_edit_does_not_hold_up_generations(run, monkeypatch):
    from cmkit.editing import tasks
    real = tasks.interpolate

    def slow(*args, **kwargs):
        time.sleep(3)
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks, "interpolate", slow)
    with local_client(create_app(run, limits=LIMITS, warmup=False)) as c:
        done = {}
        thread = threading.Thread(target=lambda: done.setdefault(
            "edit", c.post("/api/interpolate", json={"frames": 4, "class": 1}).status_code))
        thread.start()
        time.sleep(0.5)  # the interpolation is running
        start = time.perf_counter()
        out = c.post("/api/generate", json={"n": 2, "class": 1})
        took = time.perf_counter() - start
        assert out.status_code == 200 and "edit" not in done and took < 2, took
        thread.join()
    assert done["edit"] == 200


# --- fuzz -----------------------------------------------------------------------------------

def _any_value():
    return st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 40),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 100), max_size=4),
                     st.sampled_from(["png", "json", "null", "random", "1,2", "3", "sneaker"]))


FIELDS = ["n", "seed", "steps", "sigmas", "class", "guidance", "format", "seed_a", "seed_b", "frames", "bogus"]
FUZZ = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(path=st.sampled_from(["/api/generate", "/api/interpolate"]),
       body=st.dictionaries(st.sampled_from(FIELDS), _any_value(), max_size=5) | _any_value())
def test_fuzz_json_endpoints_never_fail_inside(client, path, body):
    out = client.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert out.status_code in (200, 400, 413, 503), (body, out.status_code, out.text)
    if out.status_code != 200:
        assert set(out.json()) == {"error"}, out.text


def _upload():
    images = st.sampled_from([png(np.zeros((8, 8), np.uint8)), png(np.zeros((4, 4, 3), np.uint8)),
                              png(np.zeros((70, 70), np.uint8))])
    return st.one_of(images, st.binary(max_size=64), images.map(lambda b: b[:30]),
                     images.map(lambda b: b[:20] + b"\xff" * 8 + b[28:]))


@FUZZ
@given(task=st.sampled_from(["inpaint", "colorize", "superres", "stroke", "denoise", "zoom"]),
       fields=st.dictionaries(st.sampled_from(["seed", "steps", "n", "class", "guidance", "factor", "sigma",
                                               "format", "extra"]),
                              st.one_of(st.text(max_size=8), st.integers(-3, 50).map(str),
                                        st.sampled_from(["nan", "inf", "-1e999", "0.3", "null", "2", "4"])),
                              max_size=4),
       image=st.none() | _upload(), mask=st.none() | _upload())
def test_fuzz_edit_endpoint_never_fails_inside(client, task, fields, image, mask):
    files = {name: (f"{name}.png", data) for name, data in (("image", image), ("mask", mask)) if data is not None}
    out = client.post(f"/api/edit/{task}", files=files or None, data=fields)
    assert out.status_code in (200, 400, 403, 404, 413, 503), (task, fields, out.status_code, out.text)
    if out.status_code != 200:
        assert set(out.json()) == {"error"}, out.text


# --- metrics --------------------------------------------------------------------------------


def _metrics(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    text = client.get("/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_images_and_batches(run):
    with local_client(create_app(run, limits=LIMITS, warmup=False)) as c:
        before = _metrics(c)
        for i in range(3):
            assert c.post("/api/generate", json={"n": 2, "seed": i}).status_code == 200
        assert c.post("/api/generate", json={"n": 99}).status_code == 400
        after = _metrics(c)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("cmkit_requests_total", route="/api/generate", status="200") == 3
    assert moved("cmkit_requests_total", route="/api/generate", status="400") == 1
    assert moved("cmkit_images_total") == 6
    assert moved("cmkit_batch_size_sum", lane="generate") == 6
    assert 1 <= moved("cmkit_batch_size_count", lane="generate") <= 3
    assert moved("cmkit_request_seconds_count", route="/api/generate") == 4
    assert ("cmkit_queue_depth", (("lane", "edit"),)) in after


# --- a real server: streamed limits, slow clients, SIGTERM ----------------------------------



def _wait_up(port: int, process=None, timeout: float = 90) -> None:
    import httpx
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the server exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("the server did not start")


def _raw_request(port: int, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(head)
    return sock


def _status(sock: socket.socket) -> tuple[int, bytes]:
    """(status, the whole answer): headers, then the body up to its Content-Length."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = re.search(rb"content-length: *(\d+)", head, re.I)
            if length is None or len(body) >= int(length.group(1)):
                break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split()[1]), data


@pytest.fixture(scope="module")
def live(run):
    """A server on cmkit's stack in this process (so the test can watch its temporary files)."""
    from cmkit.serve.server import DrainingServer, config
    port = free_port()
    app = create_app(run, limits=LIMITS, read_timeout=1.0, warmup=False)
    server = DrainingServer(config(app, host="127.0.0.1", port=port))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_up(port)
    yield port
    server.should_exit = True
    thread.join(10)


def test_a_streamed_oversized_body_is_refused_while_it_streams(live, monkeypatch):
    """Chunked (no Content-Length): the count stops it at the limit; no temporary file grows past it."""
    import starlette.formparsers as formparsers
    largest = [0]

    class Watched(formparsers.SpooledTemporaryFile):
        def write(self, data):
            written = super().write(data)
            largest[0] = max(largest[0], self.tell())
            return written

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", Watched)
    boundary = b"cmkitboundary"
    sock = _raw_request(live, b"POST /api/edit/inpaint HTTP/1.1\r\nHost: localhost\r\nX-Cmkit-Client: t\r\n"
                              b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n")
    part = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    # 20x the limit, and never the closing chunk: an answer can only be a refusal mid-stream.
    sent, block = 0, b"\0" * 16384
    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    while sent < 20 * LIMITS.body_bytes(True):
        if select.select([sock], [], [], 0)[0]:
            break  # the answer is in
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        except OSError:  # the server answered and closed (reset, broken pipe) or stopped reading
            break
        sent += len(block)
    sock.settimeout(30)
    status, data = _status(sock)
    sock.close()
    assert status == 413 and b'"error"' in data
    assert largest[0] <= LIMITS.body_bytes(True)


def test_a_stalled_body_times_out_and_does_not_delay_others(live):
    import httpx
    sock = _raw_request(live, b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 100\r\n\r\n{\"n\": ")
    start = time.perf_counter()
    out = httpx.post(f"http://127.0.0.1:{live}/api/generate", json={"n": 1, "format": "json"}, timeout=30)
    assert out.status_code == 200 and time.perf_counter() - start < 2
    status, data = _status(sock)  # the read timeout is 1 s
    sock.close()
    assert status == 408 and b"stalled" in data and time.perf_counter() - start < 10


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero_while_a_slow_body_is_in_flight(image_run):
    port = free_port()
    env = {**os.environ, "CMKIT_SERVE_TOKEN": TOKEN}
    process = subprocess.Popen([sys.executable, "-m", "cmkit", "serve", "--checkpoint", str(image_run), "--port",
                                str(port), "--device", "cpu", "--drain-timeout", "2", "--read-timeout", "60"],
                               env=env, stderr=subprocess.PIPE, text=True)
    try:
        _wait_up(port, process)
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        sock = _raw_request(port, b"POST /api/generate HTTP/1.1\r\nHost: localhost\r\n" + auth +
                            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"n\": ")
        time.sleep(0.3)
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rc = process.wait(timeout=20)
        took = time.monotonic() - start
        sock.close()
        assert rc == 0 and took < 2 + 5, (rc, took, process.stderr.read())
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
def test_sigterm_stops_an_idle_server_within_two_seconds(image_run):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "cmkit", "serve", "--checkpoint", str(image_run), "--port",
                                str(port), "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_up(port, process)
        idle = socket.create_connection(("127.0.0.1", port))  # a kept-alive client does not hold it up
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        rc = process.wait(timeout=20)
        took = time.monotonic() - start
        idle.close()
        assert rc == 0 and took < 2, (rc, took, process.stderr.read())
    finally:
        if process.poll() is None:
            process.kill()
