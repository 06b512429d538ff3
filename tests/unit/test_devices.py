"""Devices: the --devices spec, NVML discovery fallbacks, CPU virtual devices (copy thread,
events, arena), and that the device core imports without the web stack."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
import torch

from torpor.runtime.devices import (
    CopyError,
    CpuDevice,
    CpuEvent,
    DeviceSpec,
    open_devices,
    parse_bytes,
    parse_devices,
)
from torpor.runtime.topology import Topology, discover


def test_parse_bytes():
    assert parse_bytes("4GiB") == 4 << 30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5g") == 1_500_000_000
    assert parse_bytes("1048576") == 1 << 20
    assert parse_bytes(7) == 7
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_parse_devices_forms():
    assert parse_devices("cuda") == DeviceSpec("cuda", None, 0)
    assert parse_devices("cuda:0,1").ordinals == (0, 1)
    assert parse_devices("cuda:0,0").ordinals == (0, 0)
    assert parse_devices("gpu:1").ordinals == (1,)
    assert parse_devices("cpu") == DeviceSpec("cpu", None, 1)
    spec = parse_devices("cpu:2", memory_bytes="64MiB", memory_fraction=0.5)
    assert (spec.kind, spec.count, spec.memory_bytes, spec.memory_fraction) == ("cpu", 2, 64 << 20, 0.5)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert parse_devices("auto").kind == expected


@pytest.mark.parametrize("bad", ["tpu", "cpu:0", "cpu:x", "cuda:a", "cuda:-1", "cuda:"])
def test_parse_devices_rejects(bad):
    if bad == "cuda:":  # an empty list means all GPUs
        assert parse_devices(bad).ordinals is None
        return
    with pytest.raises(ValueError):
        parse_devices(bad)


def test_parse_devices_bounds():
    with pytest.raises(ValueError):
        parse_devices("cpu", memory_fraction=1.5)
    with pytest.raises(ValueError):
        parse_devices("cpu", memory_bytes=0)


def test_open_cpu_devices_capacity():
    devs = open_devices(parse_devices("cpu:2", memory_bytes="8MiB"), exec_slots=2)
    try:
        assert [d.name for d in devs] == ["cpu:0", "cpu:1"]
        assert all(d.capacity == 8 << 20 and d.exec_slots == 2 for d in devs)
        assert devs[0].can_peer(devs[1])
        assert devs[0].physical != devs[1].physical
    finally:
        for d in devs:
            d.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_open_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        open_devices("cuda")


def test_discover_never_raises():
    topo = discover()
    assert isinstance(topo, Topology)
    assert topo.source in ("nvml", "torch", "none")
    if topo.source == "none":
        assert topo.gpus == [] and topo.error
    d = topo.as_dict()
    assert set(d) >= {"gpus", "nvlink_links", "p2p", "source"}


def test_discover_handles_nvml_errors(monkeypatch):
    import pynvml

    def boom():
        raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    topo = discover()
    assert topo.source in ("torch", "none")
    assert "NVML" in (topo.error or "") or topo.source == "torch"


def test_topology_siblings():
    topo = Topology(common_ancestor={(0, 1): "single_switch", (0, 2): "system", (2, 3): "internal"})
    assert topo.pcie_siblings(0) == [1]
    assert topo.pcie_siblings(3) == [2]


def test_cpu_event_callbacks_and_errors():
    ev = CpuEvent()
    seen = []
    ev.add_done_callback(lambda: seen.append(1))
    assert not ev.query() and not seen
    ev.set()
    assert ev.query() and seen == [1]
    ev.add_done_callback(lambda: seen.append(2))  # already done: runs at once
    assert seen == [1, 2]
    bad = CpuEvent()
    bad.set(ValueError("x"))
    with pytest.raises(CopyError):
        bad.synchronize()


def test_cpu_arena_is_first_touched_and_aligned():
    dev = CpuDevice(0, 1 << 20)
    try:
        arena = dev.allocate_arena(1 << 20)
        assert arena.numel() == 1 << 20 and arena.data_ptr() % 4096 == 0
        assert int(arena.sum()) == 0
    finally:
        dev.close()


async def test_cpu_copies_in_order_with_events():
    dev = CpuDevice(0, 1 << 20)
    try:
        src = [torch.full((1000,), i, dtype=torch.uint8) for i in range(5)]
        dst = [torch.zeros(1000, dtype=torch.uint8) for _ in range(5)]
        gate = CpuEvent()
        jobs = [(d, s, gate if i == 2 else None) for i, (d, s) in enumerate(zip(dst, src, strict=True))]
        batch = dev.issue_copies(jobs)
        await dev.wait(batch.events[1])
        assert batch.events[0].query() and batch.events[1].query()
        await asyncio.sleep(0.02)
        assert not batch.events[2].query(), "job 2 must wait for its `after` event"
        assert batch.seconds() is None
        gate.set()
        await dev.wait(batch.events[-1])
        assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
        assert batch.done() and batch.seconds() >= 0 and batch.nbytes == 5000
    finally:
        dev.close()


async def test_cpu_copy_error_reaches_later_events():
    dev = CpuDevice(0, 1 << 20)
    try:
        ok = (torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8), None)
        bad = (torch.zeros(4, dtype=torch.uint8), torch.ones(5, dtype=torch.uint8), None)  # shape mismatch
        batch = dev.issue_copies([ok, bad, ok])
        await dev.wait(batch.events[0])
        with pytest.raises(CopyError):
            await dev.wait(batch.events[2])
    finally:
        dev.close()


async def test_cpu_wait_does_not_block_the_loop():
    dev = CpuDevice(0, 1 << 20)
    try:
        gate = CpuEvent()
        batch = dev.issue_copies(
            [(torch.zeros(1, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8), gate)]
        )
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not batch.done():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.05, gate.set)
        t0 = time.perf_counter()
        await dev.wait(batch.events[0])
        assert time.perf_counter() - t0 >= 0.04
        await t
        assert ticks >= 10
    finally:
        dev.close()


def test_worker_runs_in_device_threads():
    dev = CpuDevice(0, 1 << 20, exec_slots=2)
    try:
        import threading

        names = {dev.run_in_worker(lambda: threading.current_thread().name).result() for _ in range(8)}
        assert all(n.startswith("torpor-cpu:0") for n in names)
    finally:
        dev.close()


def test_busy_seconds_count_the_time_workers_spend_in_work():
    dev = CpuDevice(0, 1 << 20, exec_slots=1)
    try:
        assert dev.busy_seconds == 0.0
        for _ in range(3):
            dev.run_in_worker(time.sleep, 0.02).result()
        time.sleep(0.3)  # idle time is not busy time
        dev.run_in_worker(lambda: None).result()  # the worker adds the last run when it comes back
        # (the margin is for sleeps overshooting on a loaded machine; counting the idle 0.3 s would exceed it)
        assert 0.06 <= dev.busy_seconds < 0.06 + 0.2
    finally:
        dev.close()


def test_device_core_imports_without_web_stack():
    code = (
        "import sys\n"
        "import torpor.runtime.devices, torpor.runtime.topology, torpor.runtime.hoststore, torpor.runtime.partition, torpor.runtime.memory,"
        " torpor.scheduling.eviction, torpor.runtime.swapper, torpor.runtime.executor, torpor.runtime.residency\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('tritonclient', 'fastapi', 'grpc', 'uvicorn',"
        " 'starlette') or m.startswith('google.protobuf')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run(
        [sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[2])
    )
