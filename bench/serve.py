"""One-step generation through `cmkit serve` against calling the model directly, at 1, 8 and 32
concurrent clients (small image preset by default; CPU).

    python bench/serve.py [--clients 1,8,32] [--seconds 10] [--preset small]

Each client asks for one image (a new seed each time) as fast as it gets answers, for --seconds:
through HTTP to a uvicorn server on 127.0.0.1 (micro-batching window 5 ms), or by calling
`Run.sample` from a thread pool of the same size (what a program without the server does).
Reported: requests/s, p50 and p99 latency, and for the server the network batches it ran.
The weights come from a 1-step run: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

import cmkit
from cmkit.cli import main as cmkit_main
from cmkit.serve.app import create_app


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def hammer(call, clients: int, seconds: float):
    stop = time.monotonic() + seconds
    lock, latencies, errors = threading.Lock(), [], []

    def client(i):
        seed = i * 1_000_000
        while time.monotonic() < stop:
            start = time.perf_counter()
            ok = call(seed)
            took = time.perf_counter() - start
            with lock:
                (latencies if ok else errors).append(took)
            seed += 1

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return latencies, errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--preset", default="small")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        common = ["--data", args.data, "--steps", "1", "--batch-size", "2", "--quiet", "--set", "train.sample_every=0",
                  "--set", f"data.resolution={args.resolution}"]
        assert cmkit_main(["train", "--method", "edm", *common, "--set", f"model.preset={args.preset}",
                           "--set", "model.num_classes=0", "--out", str(tmp / "edm")]) == 0
        assert cmkit_main(["train", "--method", "cd", *common, "--teacher", str(tmp / "edm"), "--out", str(tmp / "cd")]) == 0
        run = cmkit.load_run(tmp / "cd")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(run, max_queue=256)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/api/generate"
    local = threading.local()

    def via_server(seed):
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        return local.client.post(url, json={"n": 1, "seed": seed, "format": "json"}).status_code == 200

    def direct(seed):
        run.sample(1, seed=seed)
        return True

    rows = []
    for clients in map(int, args.clients.split(",")):
        for name, call in (("server", via_server), ("direct", direct)):
            calls_before = app.state.batcher.calls
            latencies, errors = hammer(call, clients, args.seconds)
            batches = app.state.batcher.calls - calls_before if name == "server" else len(latencies)
            rows.append((clients, name, len(latencies) / args.seconds, statistics.median(latencies),
                         percentile(latencies, 0.99), len(errors), batches))
    server.should_exit = True

    params = sum(p.numel() for p in run.model.parameters()) / 1e6
    print(f"{args.data} {args.resolution} px, preset {args.preset} ({params:.1f}M parameters), 1 image per request, "
          f"{args.seconds:g} s per row")
    print("| clients | path | requests/s | p50 ms | p99 ms | failed | network batches |")
    print("|---|---|---|---|---|---|---|")
    for clients, name, rate, p50, p99, failed, batches in rows:
        print(f"| {clients} | {name} | {rate:.1f} | {1000 * p50:.1f} | {1000 * p99:.1f} | {failed} | {batches} |")


if __name__ == "__main__":
    main()
