"""Both ways of hosting the gRPC service (`--grpc-server threads` and `aio`; `auto`, the default,
picks by the CPUs the process may use) answer the same, and the threaded host's limit on calls in
flight only queues calls, never loses them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from torpor.api import grpc as grpc_api
from tritonclient.utils import InferenceServerException

from ..conftest import make_repo
from .test_grpc import StreamCollector, simple_inputs

MODELS = ["simple", "repeat_int32"]


def _check_unary_and_errors(url: str) -> None:
    c = grpcclient.InferenceServerClient(url)
    try:
        a, b, ins = simple_inputs(batch=2)
        r = c.infer("simple", ins, request_id="7")
        np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)
        assert r.get_response().id == "7"
        with pytest.raises(InferenceServerException) as e:
            c.infer("no_such_model", ins)
        assert e.value.status() == "StatusCode.NOT_FOUND"
        bad = grpcclient.InferInput("INPUT0", [1, 3], "INT32")
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.int32))
        with pytest.raises(InferenceServerException, match="unexpected shape") as e:
            c.infer("simple", [bad, ins[1]])
        assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert c.is_server_ready() and c.get_model_metadata("simple").name == "simple"
    finally:
        c.close()


def _check_stream(url: str) -> None:
    c = grpcclient.InferenceServerClient(url)
    got = StreamCollector()
    c.start_stream(callback=got)
    try:
        inp = grpcclient.InferInput("IN", [3], "INT32")
        inp.set_data_from_numpy(np.array([4, 5, 6], dtype=np.int32))
        delay = grpcclient.InferInput("DELAY", [3], "UINT32")
        delay.set_data_from_numpy(np.zeros(3, dtype=np.uint32))
        wait = grpcclient.InferInput("WAIT", [1], "UINT32")
        wait.set_data_from_numpy(np.zeros(1, dtype=np.uint32))
        c.async_stream_infer("repeat_int32", [inp, delay, wait], request_id="s")
        outs = [int(r.as_numpy("OUT")[0]) for r, e in got.take(3) if e is None]
        assert outs == [4, 5, 6]
        # a failing request travels as an error on the stream and the stream goes on
        c.async_stream_infer("no_such_model", [inp], request_id="bad")
        (_, e), = got.take(1)
        assert e is not None and "no_such_model" in str(e)
        _assert_stream_answers(c, got, "after")
    finally:
        c.stop_stream()
        c.close()


def _assert_stream_answers(c: grpcclient.InferenceServerClient, got: StreamCollector, request_id: str) -> None:
    _, _, ins = simple_inputs()
    c.async_stream_infer("simple", ins, request_id=request_id)
    (r, e), = got.take(1)
    assert e is None and r.get_response().id == request_id


@pytest.mark.parametrize("host", ["threads", "aio"])
def test_both_hosts_answer_alike(start_server, tmp_path, host):
    s = start_server(make_repo(tmp_path / "repo", MODELS), "--grpc-server", host)
    _check_unary_and_errors(s.grpc_url)
    _check_stream(s.grpc_url)


def test_threaded_host_queues_calls_beyond_its_threads(start_server, tmp_path):
    # two handler threads, one of them held by an open stream: 24 concurrent calls still all
    # get their answers, queued in gRPC until a thread is free
    s = start_server(make_repo(tmp_path / "repo", MODELS), "--grpc-server", "threads", "--grpc-threads", "2")
    holder = grpcclient.InferenceServerClient(s.grpc_url)
    got = StreamCollector()
    holder.start_stream(callback=got)
    try:
        async def many() -> list:
            c = aiogrpcclient.InferenceServerClient(s.grpc_url)
            try:
                a, b, _ = simple_inputs()
                calls = []
                for i in range(24):
                    ins = [aiogrpcclient.InferInput("INPUT0", [1, 16], "INT32"),
                           aiogrpcclient.InferInput("INPUT1", [1, 16], "INT32")]
                    ins[0].set_data_from_numpy(a + i)
                    ins[1].set_data_from_numpy(b)
                    calls.append(c.infer("simple", ins, request_id=str(i)))
                return await asyncio.wait_for(asyncio.gather(*calls), 60)
            finally:
                await c.close()

        results = asyncio.run(many())
        a, b, _ = simple_inputs()
        for i, r in enumerate(results):
            assert r.get_response().id == str(i)
            np.testing.assert_array_equal(r.as_numpy("OUTPUT0"), a + i + b)
        # the stream that held a thread meanwhile still answers
        _assert_stream_answers(holder, got, "held")
    finally:
        holder.stop_stream()
        holder.close()


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_grpc_threads_must_be_a_positive_integer(value):
    r = subprocess.run([sys.executable, "-m", "torpor.cli", "serve", "--grpc-threads", value],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--grpc-threads" in r.stderr


@pytest.mark.parametrize(("cpus", "host"), [({0}, "threads"), ({0, 1}, "aio"), (set(range(16)), "aio")])
def test_auto_picks_the_threaded_host_only_on_one_cpu(monkeypatch, cpus, host):
    monkeypatch.setattr(grpc_api.os, "sched_getaffinity", lambda pid: cpus, raising=False)
    assert grpc_api.pick_host("auto") == host
    assert grpc_api.pick_host("threads") == "threads" and grpc_api.pick_host("aio") == "aio"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one")
def test_pin_front_end_keeps_the_loop_and_grpcs_poller_on_one_cpu(start_server, tmp_path):
    s = start_server(make_repo(tmp_path / "repo", MODELS), "--grpc-server", "aio", "--pin-front-end", "true")
    _check_unary_and_errors(s.grpc_url)
    line = next(ln for ln in s.log().splitlines() if "--pin-front-end" in ln)
    cpu = int(line.rsplit("CPU ", 1)[1].rstrip('"'))
    pid = s.proc.pid

    def allowed(tid: int) -> str:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        return next(ln.split(":")[1].strip() for ln in status.splitlines() if ln.startswith("Cpus_allowed_list"))

    tids = [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    assert allowed(pid) == str(cpu)  # the main thread runs the loop
    pinned = [t for t in tids if allowed(t) == str(cpu)]
    assert len(pinned) == 2 and len(pinned) < len(tids)  # the loop and the poller; the rest stay free
