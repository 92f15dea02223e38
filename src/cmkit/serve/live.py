"""The live channel: ``/api/live``, a WebSocket on which a client streams its current input and
receives frames.

    client -> server  text    JSON settings, merged into the connection's input: {"prompt", "class",
                              "seed", "strength", "steps", "guidance", "preview"} (any subset)
                      binary  the canvas, a PNG or JPEG of any size (resized to the model's);
                              an empty binary message clears it
    server -> client  text    {"type": "frame", "seq", "latency_ms", "timings": {part: ms}} and then
                      binary  the frame, a PNG
                      text    {"type": "error", "seq", "error"} for an input that cannot be computed

``seq`` counts the client's messages: a frame reflects every message up to its ``seq``. Without a
canvas a frame is a generation (`Run.sample` of the seed); with one, stroke editing of the
canvas (`cmkit.editing.tasks.stroke` at ``strength`` and ``steps``: SDEdit on pixels,
image-to-image through the VAE with the prompt on latents). The server keeps only the newest
input per connection: while a frame computes, new messages replace the input, and the next
frame starts from the newest (latest wins; nothing queues). Frames go through the server's two
lanes like HTTP requests, so live clients and API calls share the model fairly.

The guard (`guard.py`) checks the handshake (Host, Origin, token); here each connection is held
to the size limits (a JSON message over ``max_json_bytes``, a canvas over ``max_upload_bytes``:
closed with 1009), a message rate (``max_live_rate`` per second, bursts of a second's worth:
closed with 1008), and the number of open live connections (``max_live_sessions``: 1013).
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..errors import CmkitError
from .batcher import Busy
from ..editing.tasks import STROKE_STRENGTH, Stopwatch

SETTINGS = {"prompt": str, "class": (str, int), "seed": int, "strength": (int, float), "steps": int,
            "guidance": (int, float), "preview": bool}
PROTOCOL = "cmkit"  # the subprotocol the server selects (the token rides on a second one)


class Closed(Exception):
    """Close the connection with ``code`` (and a reason the client sees)."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class LiveInput:
    """A connection's newest input: settings, the canvas (encoded), and how many messages made it."""

    def __init__(self):
        self.settings: dict = {}
        self.canvas: bytes | None = None
        self.seq = 0
        self.changed = asyncio.Event()

    def update(self, message: dict, limits) -> None:
        if "bytes" in message and message["bytes"] is not None:
            data = message["bytes"]
            if len(data) > limits.max_upload_bytes:
                raise Closed(1009, f"a canvas may have at most {limits.max_upload_bytes} bytes")
            self.canvas = data or None
        else:
            text = message.get("text") or ""
            if len(text) > limits.max_json_bytes:
                raise Closed(1009, f"a settings message may have at most {limits.max_json_bytes} bytes")
            try:
                settings = json.loads(text)
            except ValueError:
                raise CmkitError("a settings message must be a JSON object") from None
            if not isinstance(settings, dict):
                raise CmkitError("a settings message must be a JSON object")
            for name, value in settings.items():
                kind = SETTINGS.get(name)
                if kind is None:
                    raise CmkitError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
                if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
                    raise CmkitError(f"{name}: wrong type {type(value).__name__}")
            self.settings.update(settings)
        self.seq += 1
        self.changed.set()


class RateLimit:
    """A token bucket: ``rate`` messages per second, bursts of one second's worth."""

    def __init__(self, rate: float):
        self.rate, self.tokens, self.last = rate, rate, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def add_live_route(app, *, engine, generations, edits, limits, metrics, encode_png) -> None:
    """Register ``/api/live`` on ``app``."""
    run = engine.run
    open_sessions = set()

    async def frame(live: LiveInput, session: str):
        """(seq, PNG bytes, timings in ms) of the newest input."""
        seq, settings, canvas = live.seq, dict(live.settings), live.canvas
        start = time.perf_counter()
        watch = Stopwatch()
        options = dict(seed=settings.get("seed") or 0, class_spec=settings.get("class"),
                       guidance=settings.get("guidance"), prompt=settings.get("prompt"),
                       preview=bool(settings.get("preview", True)))
        if canvas is None:
            key, work = engine.generation(n=1, steps=settings.get("steps"), sigmas=None, **options)
            watch = work.watch
            data = await generations.submit(key, 1, work, session=session)
        else:
            call = engine.stroke(strength=settings.get("strength", STROKE_STRENGTH), steps=settings.get("steps") or 1,
                                 **options)
            with watch("decode_upload"):
                picture = await asyncio.to_thread(engine.decode_picture, canvas, "canvas", run.image_shape[1:],
                                                  run.image_shape[0] == 1)
            data = await edits.submit(None, 1, lambda: call(picture, watch), session=session)
        with watch("png"):
            png = await asyncio.to_thread(encode_png, data)
        timings = {part: round(1000 * s, 2) for part, s in watch.seconds.items()}
        return seq, png, timings, round(1000 * (time.perf_counter() - start), 2)

    async def compute(websocket: WebSocket, live: LiveInput, session: str) -> None:
        done = 0
        while True:
            await live.changed.wait()
            live.changed.clear()
            if live.seq == done:
                continue
            seq = live.seq
            try:
                seq, png, timings, server_ms = await frame(live, session)
            except (CmkitError, ValueError, Busy) as e:
                await websocket.send_json({"type": "error", "seq": seq, "error": str(e).splitlines()[0][:500]})
                done = seq
                continue
            await websocket.send_json({"type": "frame", "seq": seq, "latency_ms": server_ms, "timings": timings})
            await websocket.send_bytes(png)
            metrics.images.inc()
            metrics.live_frames.inc()
            done = seq

    @app.websocket("/api/live")
    async def live_channel(websocket: WebSocket):
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
        if len(open_sessions) >= limits.max_live_sessions:  # after accepting: a refused handshake has no code
            await websocket.close(1013, "too many live connections; retry shortly")
            return
        session = f"live-{id(websocket)}"
        live, rate = LiveInput(), RateLimit(limits.max_live_rate)
        open_sessions.add(session)
        metrics.live_sessions.inc()
        worker = asyncio.ensure_future(compute(websocket, live, session))
        try:
            while True:
                receiving = asyncio.ensure_future(websocket.receive())
                await asyncio.wait({receiving, worker}, return_when=asyncio.FIRST_COMPLETED)
                if worker.done():  # it failed (a send to a closed socket): stop
                    receiving.cancel()
                    worker.result()
                message = receiving.result()
                if message["type"] == "websocket.disconnect":
                    break
                if not rate.take():
                    raise Closed(1008, f"more than {limits.max_live_rate:g} messages per second")
                try:
                    live.update(message, limits)
                except CmkitError as e:
                    await websocket.send_json({"type": "error", "seq": live.seq, "error": str(e)})
        except Closed as e:
            await websocket.close(e.code, e.reason)
        except (WebSocketDisconnect, RuntimeError):
            pass  # the client left while a frame was sent
        finally:
            worker.cancel()
            open_sessions.discard(session)
            metrics.live_sessions.dec()
