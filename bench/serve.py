"""`cmkit serve` against calling the model directly, side by side in one run (CPU by default).

    python bench/serve.py [--n 8] [--clients 16] [--seconds 10] [--preset small] [--format png]

Two measurements, each a server row next to a direct row:
- latency: one client asks for n images at a time (a new seed each request), through HTTP to
  `cmkit serve` on 127.0.0.1 (its own process, as deployed), against `Run.sample(n)` called in a
  loop in this process (the server idle meanwhile). p50 and p99.
- throughput: --clients concurrent clients ask for n images each; the server's micro-batcher
  forms batches of some mean size B (read from its /metrics). The direct row calls
  `Run.sample(B)` in a loop: what the model gives at the batch the server actually runs.
The clients are asyncio connections in one thread (keep-alive HTTP/1.1, like wrk or hey), not
16 Python HTTP-library threads: on a 2-core machine those would take the CPU the server needs.
The weights come from a 1-step run: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

import cmkit
from cmkit.cli import main as cmkit_main


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def hammer(call, clients: int, seconds: float):
    """Latencies of successful calls and the number of failed ones, ``clients`` threads calling
    ``call(seed)`` back to back for ``seconds``."""
    stop = time.monotonic() + seconds
    lock, latencies, failed = threading.Lock(), [], [0]

    def client(i):
        seed = i * 1_000_000
        while time.monotonic() < stop:
            start = time.perf_counter()
            ok = call(seed)
            took = time.perf_counter() - start
            with lock:
                if ok:
                    latencies.append(took)
                else:
                    failed[0] += 1
            seed += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies, failed[0]


def hammer_http(url: str, body: dict, clients: int, seconds: float):
    """`hammer` for POST /api/generate through ``clients`` keep-alive connections of one event loop."""
    host, port = url.removeprefix("http://").split(":")

    async def client(i, latencies, failed):
        reader, writer = await asyncio.open_connection(host, int(port))
        seed, stop = i * 1_000_000, time.monotonic() + seconds
        while time.monotonic() < stop:
            payload = json.dumps({**body, "seed": seed}).encode()
            start = time.perf_counter()
            writer.write(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            (latencies.append(time.perf_counter() - start) if status == 200 else failed.append(status))
            seed += 1
        writer.close()

    async def main():
        latencies, failed = [], []
        await asyncio.gather(*(client(i, latencies, failed) for i in range(clients)))
        return latencies, len(failed)

    return asyncio.run(main())


def batch_totals(url: str) -> tuple[float, float]:
    """(batches run, samples in them) of the generation lane, from /metrics."""
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == "cmkit_batch_size":
            values = {(s.name, s.labels.get("lane")): s.value for s in family.samples}
            return values[("cmkit_batch_size_count", "generate")], values[("cmkit_batch_size_sum", "generate")]
    raise SystemExit("the server's /metrics has no cmkit_batch_size")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preset", default="small")
    p.add_argument("--n", type=int, default=8, help="images per request")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--format", default="png", choices=["png", "json"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--data", args.data, "--steps", "1", "--batch-size", "2", "--quiet", "--set", "train.sample_every=0",
                  "--set", f"data.resolution={args.resolution}", "--device", "cpu"]
        assert cmkit_main(["train", "--method", "edm", *common, "--set", f"model.preset={args.preset}",
                           "--set", "model.num_classes=0", "--out", str(tmp / "edm")]) == 0
        assert cmkit_main(["train", "--method", "cd", *common, "--teacher", str(tmp / "edm"), "--out", str(tmp / "cd")]) == 0
        run = cmkit.load_run(tmp / "cd", device=args.device)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "cmkit", "serve", "--checkpoint", str(tmp / "cd"),
                                   "--port", str(port), "--device", args.device, "--queue", "256"])
        try:
            measure_all(args, run, f"http://127.0.0.1:{port}", server)
        finally:
            server.terminate()
            server.wait(60)


def measure_all(args, run, url: str, server) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start")
        time.sleep(0.2)
    rows = []

    def measure(what, path, call, clients, n):
        if call is None:
            latencies, failed = hammer_http(url, {"n": n, "format": args.format}, clients, args.seconds)
        else:
            latencies, failed = hammer(call, clients, args.seconds)
        rows.append((what, path, clients, n, len(latencies) * n / args.seconds, statistics.median(latencies),
                     percentile(latencies, 0.99), failed))

    run.sample(args.n, seed=0)  # warm
    measure("latency", "server", None, 1, args.n)
    measure("latency", "direct", lambda seed: run.sample(args.n, seed=seed) is not None, 1, args.n)
    batches, samples = batch_totals(url)
    measure("throughput", "server", None, args.clients, args.n)
    batches2, samples2 = batch_totals(url)
    mean_batch = (samples2 - samples) / max(batches2 - batches, 1)
    formed = max(1, round(mean_batch))
    measure("throughput", "direct", lambda seed: run.sample(formed, seed=seed) is not None, 1, formed)

    params = sum(p.numel() for p in run.model.parameters()) / 1e6
    print(f"{args.data} {args.resolution} px, preset {args.preset} ({params:.1f}M parameters), {run.device}, "
          f"n={args.n} per request, format {args.format}, {args.seconds:g} s per row; "
          f"the server formed batches of {mean_batch:.1f} samples on average")
    print("| measure | path | clients | images per call | images/s | p50 ms | p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for what, path, clients, n, rate, p50, p99, failed in rows:
        print(f"| {what} | {path} | {clients} | {n} | {rate:.0f} | {1000 * p50:.1f} | {1000 * p99:.1f} | {failed} |")
    lat_ratio = rows[0][5] / rows[1][5]
    thr_ratio = rows[2][4] / rows[3][4]
    print(f"\nsingle-client p50 latency, server / direct: {lat_ratio:.2f} (target <= 1.5)")
    print(f"throughput at {args.clients} clients, server / direct at batch {formed}: {thr_ratio:.2f} (target >= 0.75)")


if __name__ == "__main__":
    main()
