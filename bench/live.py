"""`cmkit serve` live: the real-time request pattern, the live canvas, and idle connections, side
by side in one run (CPU by default).

    python bench/live.py [--seconds 20] [--interval-ms 30] [--latent RUN] [--parts realtime,canvas,browser,idle]

1. Real-time pattern: a client sends a new generation every --interval-ms for --seconds, each
   superseding the last, at n=4 (1 step) and n=16 (8 steps), three ways:
   - "session": each request carries X-Cmkit-Session; the server drops waiting ones a newer one
     replaced (answered 409). p50/p95 latency of the answered ones, against one uncontended
     generation; and the check that no superseded request was computed (samples the model
     computed, from /metrics, against samples answered);
   - "abort": the page's way without a session, each new input closing the previous request's
     connection; what matters is the last request, sent when the input stops: its latency;
   - "kept": neither (every request is computed, as every server did before): latency grows with
     the queue, and 503s once it is full; what is not answered within another --seconds (or
     three single generations) is abandoned (status "none").
2. Live canvas over the WebSocket (/api/live): a scripted drawing (a stroke growing by a few
   pixels per canvas, one canvas per 16 ms, 60 Hz) for pixel CD models of 32x32 Fashion-MNIST at
   the tiny and small presets and, with --latent, a latent text LCM (e.g. the one
   bench/latent_fmnist.py writes; also with a preview VAE of TAESD's layout, random weights: its
   speed, not its pictures). Frames per second, p50/p95 latency (input sent -> frame
   received) and the server's time split per frame (text, decode_upload, encode, network, decode,
   png; transfer is the rest), against the network's own time for the same call in-process (the
   limit).
   In the browser-only site (`cmkit export web`, `--parts browser`: Chromium, WebAssembly, 2
   threads), the same drawing as pointer events on its canvas: frames per second and p50/p95 of
   the in-page computation, against one `window.cmkit.stroke` call alone.
3. Idle connections: 300 connections that never finish their headers, and the latency of a
   generation with them open against without.
The pixel models' weights come from 1-step runs: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

import cmkit
from cmkit.cli import main as cmkit_main
from cmkit.editing import tasks


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def train_pixel_run(out: Path, preset: str) -> Path:
    common = ["--data", "fashion-mnist", "--steps", "1", "--batch-size", "2", "--quiet", "--set",
              "train.sample_every=0", "--set", "data.resolution=32", "--device", "cpu"]
    assert cmkit_main(["train", "--method", "edm", *common, "--set", f"model.preset={preset}", "--set",
                       "model.num_classes=0", "--out", str(out / "edm")]) == 0
    assert cmkit_main(["train", "--method", "cd", *common, "--teacher", str(out / "edm"), "--out", str(out / "cd")]) == 0
    return out / "cd"


class Server:
    """`cmkit serve RUN` in its own process, as deployed."""

    def __init__(self, checkpoint: Path, *extra: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen([sys.executable, "-m", "cmkit", "serve", "--checkpoint", str(checkpoint),
                                         "--port", str(self.port), "--device", "cpu", *extra])
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

    def metric(self, name: str, **labels) -> float:
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


async def post(port: int, body: dict, headers: dict | None = None) -> tuple[int, float]:
    """(status, seconds) of one POST /api/generate on its own connection (cancel it to abort: the
    connection closes, as a browser's fetch abort does)."""
    payload = json.dumps(body).encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items()).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + extra +
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(payload), payload))
        status = int((await reader.readline()).split()[1])
        await reader.read()
        return status, time.perf_counter() - start
    finally:
        writer.close()


def realtime(server: Server, n: int, steps: int, seconds: float, interval: float) -> list[tuple]:
    body = {"n": n, "steps": steps, "format": "png"}

    async def single():
        times = [(await post(server.port, {**body, "seed": i}))[1] for i in range(8)]
        return statistics.median(times[2:])

    async def pattern(way: str, drain: float):
        tasks_, pending = [], None
        stop, seed = time.monotonic() + seconds, 0
        while time.monotonic() < stop:
            headers = {"X-Cmkit-Session": "bench"} if way == "session" else None
            if way == "abort" and pending is not None and not pending.done():
                pending.cancel()
            pending = asyncio.ensure_future(post(server.port, {**body, "seed": seed}, headers))
            tasks_.append(pending)
            seed += 1
            await asyncio.sleep(interval)
        # A bounded drain: what is not answered within another window is abandoned (its
        # connection closes; the server drops it), so a growing queue shows as unanswered requests.
        done, late = await asyncio.wait(tasks_, timeout=drain)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        return [t.result() if t in done and not t.cancelled() and t.exception() is None else (0, float("nan"))
                for t in tasks_]

    rows = []
    base = asyncio.run(single())
    for way in ("session", "abort", "kept"):
        samples_before = server.metric("cmkit_batch_size_sum", lane="generate")
        results = asyncio.run(pattern(way, max(seconds, 3 * base)))
        time.sleep(0.5)
        computed = (server.metric("cmkit_batch_size_sum", lane="generate") - samples_before) / n
        if way == "abort":  # the requests the client itself aborted are not counted
            results = [r for r in results[:-1] if r[0]] + results[-1:]
        ok = [t for status, t in results if status == 200]
        statuses = {s or "none": sum(1 for status, _ in results if status == s) for s in sorted({s for s, _ in results})}
        last = results[-1][1] if results and results[-1][0] == 200 else float("nan")
        rows.append((n, steps, way, base, ok, last, statuses, computed))
    return rows


def print_realtime(rows, seconds, interval):
    print(f"\nReal-time pattern: a new request every {1000 * interval:g} ms for {seconds:g} s")
    print("| n | steps | client | single ms | answered | p50 ms | p95 ms | p95 / single | last ms | statuses | "
          "computed |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, steps, way, base, ok, last, statuses, computed in rows:
        p95 = pct(ok, 0.95)
        print(f"| {n} | {steps} | {way} | {1000 * base:.0f} | {len(ok)} | {1000 * pct(ok, 0.5):.0f} | "
              f"{1000 * p95:.0f} | {p95 / base:.2f} | {1000 * last:.0f} | {statuses} | {computed:.0f} |")


def drawing(shape, count: int) -> list[bytes]:
    """``count`` canvases of a stroke being drawn (a spiral growing a few pixels per canvas), PNG."""
    c, h, w = shape
    image = Image.new("RGB", (w, h), (128, 128, 128))
    pen = ImageDraw.Draw(image)
    canvases, last = [], (w / 2, h / 2)
    for i in range(count):
        angle, radius = 0.35 * i, 1 + (min(h, w) / 2 - 2) * (i % 60) / 60
        point = (w / 2 + radius * np.cos(angle), h / 2 + radius * np.sin(angle))
        pen.line([last, point], fill=(255, 255, 255) if i % 120 < 60 else (30, 30, 30), width=max(1, w // 16))
        last = point
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        canvases.append(buf.getvalue())
    return canvases


async def live_session(url: str, settings: dict, canvases: list[bytes], seconds: float, period: float):
    from websockets.asyncio.client import connect
    sent, frames = {}, []
    async with connect(url.replace("http://", "ws://") + "/api/live", subprotocols=["cmkit"],
                       max_size=2**24) as ws:
        await ws.send(json.dumps(settings))
        sent[1] = time.perf_counter()

        async def receive():
            while True:
                meta = json.loads(await ws.recv())
                if meta["type"] != "frame":
                    raise SystemExit(f"the live channel refused the input: {meta}")
                await ws.recv()
                frames.append((meta, time.perf_counter()))

        receiver = asyncio.ensure_future(receive())
        seq, start = 1, time.perf_counter()
        while time.perf_counter() - start < seconds:
            await ws.send(canvases[seq % len(canvases)])
            seq += 1
            sent[seq] = time.perf_counter()
            await asyncio.sleep(period)
        await asyncio.sleep(1.0)
        receiver.cancel()
    frames = [(meta, at) for meta, at in frames if meta["seq"] > 1 and at - start <= seconds]
    latencies = [at - sent[meta["seq"]] for meta, at in frames]
    parts = {}
    for meta, _ in frames:
        for part, ms in meta["timings"].items():
            parts.setdefault(part, []).append(ms)
    server_ms = statistics.mean(meta["latency_ms"] for meta, _ in frames)
    split = {part: statistics.mean(v) for part, v in parts.items()}
    split["transfer"] = 1000 * statistics.mean(latencies) - server_ms
    return len(frames) / seconds, latencies, split


def network_limit(run, settings: dict, strength: float = 0.6, repeats: int = 20) -> float:
    """Median ms of the network calls of one canvas frame, called in-process (no server)."""
    c, h, w = run.image_shape
    canvas = np.full((1, c, h, w), 128, np.uint8)
    text = run.text_condition(settings["prompt"], 1).text if "prompt" in settings else None
    times = []
    for i in range(repeats + 3):
        watch = tasks.Stopwatch()
        tasks.stroke(run, canvas, sigmas=tasks.strength_levels(run, strength, settings.get("steps", 1)), seed=i,
                     text=text, watch=watch)
        times.append(watch.seconds["network"])
    return 1000 * statistics.median(times[3:])


def random_preview(run, folder: Path) -> Path:
    """A random AutoencoderTiny in TAESD's layout (64 channels; 1, 3, 3, ... blocks) at the run's
    latent shape and downsampling: its weights decode nothing useful, its speed is TAESD's."""
    from diffusers import AutoencoderTiny
    codec = run.codec
    blocks = int(np.log2(codec.factor)) + 1
    AutoencoderTiny(in_channels=codec.vae_channels, out_channels=codec.vae_channels,
                    latent_channels=codec.latent_channels, encoder_block_out_channels=(64,) * blocks,
                    num_encoder_blocks=(1,) + (3,) * (blocks - 1), decoder_block_out_channels=(64,) * blocks,
                    num_decoder_blocks=(3,) * (blocks - 1) + (1,)).save_pretrained(str(folder))
    return folder


def canvas_rows(models: dict, seconds: float) -> list[tuple]:
    rows = []
    for name, (checkpoint, settings, *extra) in models.items():
        run = cmkit.load_run(checkpoint)
        limit = network_limit(run, settings)
        canvases = drawing(run.image_shape, 240)
        server = Server(checkpoint, *extra)
        try:
            asyncio.run(live_session(server.url, settings, canvases, 2, 1 / 60))  # warm
            fps, latencies, split = asyncio.run(live_session(server.url, settings, canvases, seconds, 1 / 60))
        finally:
            server.stop()
        rows.append((name, settings.get("steps", 1), fps, latencies, split, limit))
    return rows


def print_canvas(rows, seconds):
    parts = ("text", "decode_upload", "encode", "network", "decode", "png", "transfer")
    print(f"\nLive canvas over the WebSocket: a scripted drawing, one canvas per 16 ms for {seconds:g} s")
    print("| model | steps | frames/s | p50 ms | p95 ms | " + " | ".join(f"{p} ms" for p in parts) +
          " | network alone ms | limit frames/s | frames/s / limit |")
    print("|---|---|---|---|---|" + "---|" * len(parts) + "---|---|---|")
    for name, steps, fps, latencies, split, limit in rows:
        print(f"| {name} | {steps} | {fps:.1f} | {1000 * pct(latencies, 0.5):.1f} | {1000 * pct(latencies, 0.95):.1f} | "
              + " | ".join(f"{split.get(p, 0):.1f}" for p in parts) +
              f" | {limit:.1f} | {1000 / limit:.0f} | {fps / (1000 / limit):.2f} |")


BROWSER_DRAWING = """
const [seconds, done] = arguments;
(async () => {
  await window.cmkit.ready;
  const live = window.cmkit.live;
  await live.idle();
  const alone = await window.cmkit.benchmarkStroke(1, 20);
  const canvas = document.getElementById('canvas'), box = canvas.getBoundingClientRect();
  const at = (type, x, y) => canvas.dispatchEvent(new PointerEvent(type, {pointerId: 7, pointerType: 'pen',
    isPrimary: true, clientX: box.left + x * box.width, clientY: box.top + y * box.height, bubbles: true,
    button: 0, buttons: type === 'pointerup' ? 0 : 1}));
  const first = live.frames, latencies = [];
  let seen = live.frames, i = 0;
  const start = performance.now();
  at('pointerdown', 0.5, 0.5);
  while (performance.now() - start < seconds * 1000) {
    i += 1;
    const angle = 0.35 * i, radius = 0.05 + 0.4 * (i % 60) / 60;
    at('pointermove', 0.5 + radius * Math.cos(angle), 0.5 + radius * Math.sin(angle));
    await new Promise((resolve) => setTimeout(resolve, 16));
    if (live.frames > seen) { latencies.push(live.latencies[live.latencies.length - 1]); seen = live.frames; }
  }
  const frames = live.frames - first;
  at('pointerup', 0.5, 0.5);
  await live.idle();
  return {fps: frames / seconds, latencies, alone};
})().then(done, (e) => done({error: String(e)}));
"""


def browser_rows(models: dict, seconds: float) -> list[tuple]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import chromium

    from cmkit.serve.static_site import serve_in_thread
    browser, reason = chromium()
    if browser is None:
        raise SystemExit(reason)
    browser.set_script_timeout(600)
    rows = []
    try:
        for name, checkpoint in models.items():
            site = Path(tempfile.mkdtemp()) / "site"
            assert cmkit_main(["export", "web", "--checkpoint", str(checkpoint), "--out", str(site), "--quiet"]) == 0
            server, url = serve_in_thread(site)
            try:
                browser.get(f"{url}?threads=2&backend=wasm")
                out = browser.execute_async_script(BROWSER_DRAWING, seconds)
                if "error" in out:
                    raise SystemExit(f"the page failed: {out['error']}")
                rows.append((name, out["fps"], [v / 1000 for v in out["latencies"]], out["alone"]))
            finally:
                server.should_exit = True
    finally:
        browser.quit()
    return rows


def print_browser(rows, seconds):
    print(f"\nLive canvas in the browser-only site (Chromium, WebAssembly, 2 threads): pointer events for {seconds:g} s")
    print("| model | steps | frames/s | p50 ms | p95 ms | one stroke call alone ms | limit frames/s | frames/s / limit |")
    print("|---|---|---|---|---|---|---|---|")
    for name, fps, latencies, alone in rows:
        print(f"| {name} | 1 | {fps:.1f} | {1000 * pct(latencies, 0.5):.1f} | {1000 * pct(latencies, 0.95):.1f} | "
              f"{alone:.1f} | {1000 / alone:.0f} | {fps / (1000 / alone):.2f} |")


def idle_rows(server: Server, count: int = 300) -> tuple[float, float]:
    def median_latency():
        times = []
        for i in range(12):
            start = time.perf_counter()
            httpx.post(f"{server.url}/api/generate", json={"n": 1, "seed": i}, timeout=60).raise_for_status()
            times.append(time.perf_counter() - start)
        return statistics.median(times[2:])
    normal = median_latency()
    idle = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"GET / HTTP/1.1\r\nHost: local")
        idle.append(s)
    try:
        crowded = median_latency()
    finally:
        for s in idle:
            s.close()
    return normal, crowded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--interval-ms", type=float, default=30)
    p.add_argument("--canvas-seconds", type=float, default=10)
    p.add_argument("--latent", help="a latent text LCM run for the canvas rows")
    p.add_argument("--prompt", default="a photo of a sneaker")
    p.add_argument("--parts", default="realtime,canvas,browser,idle")
    args = p.parse_args()
    parts = set(args.parts.split(","))
    import torch
    print(f"cmkit live bench: {torch.get_num_threads()} torch threads, CPU")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = train_pixel_run(tmp / "small", "small")
        if parts & {"realtime", "idle"}:
            server = Server(small, "--queue", "64")
            try:
                if "realtime" in parts:
                    rows = realtime(server, 4, 1, args.seconds, args.interval_ms / 1000)
                    rows += realtime(server, 16, 8, args.seconds, args.interval_ms / 1000)
                    print_realtime(rows, args.seconds, args.interval_ms / 1000)
                if "idle" in parts:
                    normal, crowded = idle_rows(server)
                    print(f"\n300 idle connections: generation p50 {1000 * normal:.1f} ms without, "
                          f"{1000 * crowded:.1f} ms with them open ({crowded / normal:.2f}x; target <= 2)")
            finally:
                server.stop()
        tiny = train_pixel_run(tmp / "tiny", "tiny") if parts & {"canvas", "browser"} else None
        if "canvas" in parts:
            models = {"small 32x32 (pixel CD)": (small, {"strength": 0.6, "steps": 1}),
                      "tiny 32x32 (pixel CD)": (tiny, {"strength": 0.6, "steps": 1})}
            if args.latent:
                models["latent LCM (text)"] = (Path(args.latent), {"strength": 0.6, "steps": 1, "prompt": args.prompt})
                models["latent LCM (text), 4 steps"] = (Path(args.latent), {"strength": 0.6, "steps": 4,
                                                                            "prompt": args.prompt})
                preview = random_preview(cmkit.load_run(args.latent), tmp / "taesd")
                models["latent LCM (text), TAESD-layout preview VAE"] = (
                    Path(args.latent), {"strength": 0.6, "steps": 1, "prompt": args.prompt}, "--preview-vae",
                    str(preview))
            print_canvas(canvas_rows(models, args.canvas_seconds), args.canvas_seconds)
        if "browser" in parts:
            rows = browser_rows({"small 32x32 (pixel CD)": small, "tiny 32x32 (pixel CD)": tiny}, args.canvas_seconds)
            print_browser(rows, args.canvas_seconds)


if __name__ == "__main__":
    main()
