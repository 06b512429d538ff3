"""Closed-loop protocol load on the `simple` model: N concurrent workers, one shared tritonclient
aio client (HTTP binary tensors or gRPC), every response checked.

    taskset -c 0 python loadtest/closed_loop.py --url localhost:8000 --protocol http -c 8 -n 8000
    taskset -c 0 python loadtest/closed_loop.py --url localhost:8001 --protocol grpc -c 8 -n 8000

Pin the server to the other core (`taskset -c 1 torpor serve ...`) so client and server do not
share one. Prints one row and, with --json, writes it. The side-by-side peer comparison
(MLServer, KServe) is a separate script (issue 6); this is its client half.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np


async def gather_latencies(one: Callable[[], Awaitable[float]], concurrency: int, total: int) -> list[float]:
    """`total` calls of `one` (a request, returning its latency) from `concurrency` workers, each
    sending its next request as soon as its last is answered; the latencies in completion order."""
    latencies: list[float] = []
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await one())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def run(url: str, protocol: str, concurrency: int, total: int, warmup: int, encoding: str = "binary") -> dict:
    if protocol == "http":
        import tritonclient.http.aio as client_mod
    else:
        import tritonclient.grpc.aio as client_mod
    client = client_mod.InferenceServerClient(url)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    inputs = [client_mod.InferInput("INPUT0", [1, 16], "INT32"), client_mod.InferInput("INPUT1", [1, 16], "INT32")]
    kwargs: dict = {"request_id": "1"}  # KServe 0.21 answers 500 to a request without an id
    if protocol == "http" and encoding == "json":
        # The protocol's plain JSON form, which every peer speaks (MLServer has no binary
        # extension); tritonclient sends no Content-Type of its own and some peers need it.
        inputs[0].set_data_from_numpy(a, binary_data=False)
        inputs[1].set_data_from_numpy(b, binary_data=False)
        kwargs["outputs"] = [client_mod.InferRequestedOutput(n, binary_data=False) for n in ("OUTPUT0", "OUTPUT1")]
        kwargs["headers"] = {"Content-Type": "application/json"}
    else:
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
    expected = a + b

    def check(r) -> None:
        try:
            got = r.as_numpy("OUTPUT0")
        except ValueError:
            # a peer answering gRPC in typed contents, which tritonclient's as_numpy cannot read
            got = np.asarray(r.get_response().outputs[0].contents.int_contents, dtype=np.int32).reshape(1, 16)
        if not np.array_equal(got, expected):
            raise AssertionError(f"wrong answer: {got}")

    async def one() -> float:
        t = time.perf_counter()
        r = await client.infer("simple", inputs, **kwargs)
        dt = time.perf_counter() - t
        check(r)
        return dt

    try:
        for _ in range(warmup):
            await one()
        start = time.perf_counter()
        latencies = await gather_latencies(one, concurrency, total)
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
    latencies.sort()
    return {
        "protocol": protocol if protocol == "grpc" else f"http-{encoding}",
        "concurrency": concurrency,
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="localhost:8000")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    ap.add_argument("-n", "--requests", type=int, default=8000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--encoding", choices=["binary", "json"], default="binary",
                    help="HTTP tensors: the binary extension, or plain JSON (what every peer speaks)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    try:
        import uvloop

        row = uvloop.run(run(args.url, args.protocol, args.concurrency, args.requests, args.warmup, args.encoding))
    except ImportError:
        row = asyncio.run(run(args.url, args.protocol, args.concurrency, args.requests, args.warmup, args.encoding))
    print(f"{'protocol':<11} {'c':>3} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
    print(f"{row['protocol']:<11} {row['concurrency']:>3} {row['requests']:>8} {row['req_per_s']:>8.0f} "
          f"{row['p50_ms']:>7.2f} {row['p99_ms']:>7.2f}")
    if args.json:
        args.json.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
