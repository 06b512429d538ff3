"""Graceful shutdown: SIGTERM during a burst of requests. Every request the server accepted gets
a complete answer, requests after the signal are refused cleanly, and the process exits 0."""

from __future__ import annotations

import asyncio
import queue
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient

from ..conftest import Server, make_repo, pending_requests
from ..models import write_model

SLOW_MODEL = '''
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        time.sleep(1.0)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy() * 2)])
                for r in requests]
'''

SLOW_CONFIG = '''name: "slow"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_INT32 dims: [ 1 ] } ]
instance_group [ { count: 16 kind: KIND_CPU } ]
'''

IN_FLIGHT = 8  # per protocol


@pytest.fixture
def repo(tmp_path):
    r = make_repo(tmp_path / "repo", ["simple", "repeat_int32"])
    write_model(r, "slow", SLOW_CONFIG, SLOW_MODEL)
    return r


def test_sigterm_finishes_accepted_requests_and_exits_zero(repo, tmp_path):
    s = Server(repo, "--exit-timeout-secs", "20").start(tmp_path)
    results: queue.Queue = queue.Queue()

    def http_call(i: int):
        try:
            c = httpclient.InferenceServerClient(s.http_url, network_timeout=30)
            inp = httpclient.InferInput("INPUT0", [1], "INT32")
            inp.set_data_from_numpy(np.array([i], dtype=np.int32))
            results.put(("http", i, int(c.infer("slow", [inp]).as_numpy("OUTPUT0")[0])))
        except Exception as e:  # noqa: BLE001
            results.put(("http", i, e))

    def grpc_call(i: int):
        try:
            c = grpcclient.InferenceServerClient(s.grpc_url)
            inp = grpcclient.InferInput("INPUT0", [1], "INT32")
            inp.set_data_from_numpy(np.array([i], dtype=np.int32))
            results.put(("grpc", i, int(c.infer("slow", [inp], client_timeout=30).as_numpy("OUTPUT0")[0])))
        except Exception as e:  # noqa: BLE001
            results.put(("grpc", i, e))

    # a decoupled stream in flight too: 4 responses, 400 ms apart
    stream_items: queue.Queue = queue.Queue()
    sc = grpcclient.InferenceServerClient(s.grpc_url)
    sc.start_stream(callback=lambda result, error: stream_items.put((result, error)))
    ins = [grpcclient.InferInput("IN", [4], "INT32"), grpcclient.InferInput("DELAY", [4], "UINT32"),
           grpcclient.InferInput("WAIT", [1], "UINT32")]
    ins[0].set_data_from_numpy(np.array([10, 11, 12, 13], dtype=np.int32))
    ins[1].set_data_from_numpy(np.full(4, 400, dtype=np.uint32))
    ins[2].set_data_from_numpy(np.zeros(1, dtype=np.uint32))

    threads = [threading.Thread(target=http_call, args=(i,)) for i in range(IN_FLIGHT)]
    threads += [threading.Thread(target=grpc_call, args=(100 + i,)) for i in range(IN_FLIGHT)]
    for t in threads:
        t.start()
    sc.async_stream_infer("repeat_int32", ins, request_id="stream")
    deadline = time.monotonic() + 20
    while pending_requests(s, "slow") < 2 * IN_FLIGHT or pending_requests(s, "repeat_int32") < 1:
        assert time.monotonic() < deadline, "requests never reached the engine"
        time.sleep(0.02)

    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    # after the signal: refused (UNAVAILABLE or connection refused), never hanging
    late = grpcclient.InferenceServerClient(s.grpc_url)
    inp = grpcclient.InferInput("INPUT0", [1], "INT32")
    inp.set_data_from_numpy(np.array([1], dtype=np.int32))
    t0 = time.monotonic()
    with pytest.raises(Exception):
        late.infer("slow", [inp], client_timeout=10)
    assert time.monotonic() - t0 < 5

    for t in threads:
        t.join(40)
    got = [results.get_nowait() for _ in range(results.qsize())]
    assert len(got) == 2 * IN_FLIGHT
    for proto, i, value in got:
        assert value == 2 * i, (proto, i, value)
    stream = [stream_items.get(timeout=30) for _ in range(4)]
    assert [e for _, e in stream] == [None] * 4
    assert [int(r.as_numpy("OUT")[0]) for r, _ in stream] == [10, 11, 12, 13]
    sc.stop_stream()
    assert s.proc.wait(30) == 0, s.log()
    s.stop()


def test_sigterm_during_aio_burst(repo, tmp_path):
    """Hundreds of concurrent small requests over http.aio and grpc.aio with SIGTERM in the
    middle: each answered request is correct, each refused one fails fast and cleanly."""
    s = Server(repo, "--exit-timeout-secs", "20").start(tmp_path)
    a = np.arange(16, dtype=np.int32).reshape(1, 16)

    async def burst():
        hc = aiohttpclient.InferenceServerClient(s.http_url, conn_limit=64)
        gc = aiogrpcclient.InferenceServerClient(s.grpc_url)

        async def one(i: int):
            use_http = i % 2 == 0
            mod = aiohttpclient if use_http else aiogrpcclient
            ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
            ins[0].set_data_from_numpy(a)
            ins[1].set_data_from_numpy(a)
            await asyncio.sleep(i * 0.002)
            try:
                if use_http:
                    r = await hc.infer("simple", ins, timeout=20)
                else:
                    r = await gc.infer("simple", ins, client_timeout=20)
                return bool(np.array_equal(r.as_numpy("OUTPUT0"), a + a))
            except Exception as e:  # noqa: BLE001
                return e

        tasks = [asyncio.create_task(one(i)) for i in range(600)]
        await asyncio.sleep(0.4)
        s.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out = await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        await hc.close()
        await gc.close()
        return out, elapsed

    out, elapsed = asyncio.run(burst())
    ok = [r for r in out if r is True]
    bad = [r for r in out if r is False]
    refused = [r for r in out if isinstance(r, Exception)]
    print(f"burst: {len(ok)} served, {len(refused)} refused, {elapsed:.2f}s", {type(e).__name__ for e in refused})
    assert not bad, "a request got a wrong answer"
    assert ok, "nothing was served before the signal"
    assert elapsed < 15, "refused requests must fail fast, not hang"
    for e in refused:
        assert "Deadline" not in str(e) and "timeout" not in type(e).__name__.lower(), repr(e)
    assert s.proc.wait(30) == 0, s.log()
    s.stop()
