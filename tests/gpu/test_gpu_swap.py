"""The swap engine on CUDA: the CPU suite's correctness checks on a real GPU, plus pinned
slabs, stream ordering, peer copies between two arenas of one GPU and a free event loop.

Skipped without CUDA. Run: `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from tests.unit.test_swapper import SMALL_GROUPS, Mlp, groups_of, reference, seeded, tiny_bert, tiny_resnet
from torpor.runtime.devices import CudaDevice, open_devices, parse_devices
from torpor.runtime.hoststore import HostStore
from torpor.runtime.memory import MemoryFullError
from torpor.runtime.residency import DevicePool
from torpor.runtime.topology import discover
from torpor.scheduling.eviction import LRUPolicy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(autouse=True)
def deterministic():
    old = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old


@pytest.fixture
def make_pool():
    pools = []

    def make(spec="cuda:0", capacity=256 * MiB, block=2 * MiB, **kw):
        devs = open_devices(parse_devices(spec, memory_bytes=capacity), exec_slots=kw.pop("exec_slots", 1))
        pool = DevicePool(devs, block_bytes=block, **kw)
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close()
    torch.cuda.synchronize()


def poison(pool: DevicePool) -> None:
    """Fill every arena with NaN bytes: a kernel that reads weights before their copy landed
    produces NaN, not a plausible number."""
    for m in pool.memories:
        m.arena.fill_(0xFF)
    torch.cuda.synchronize()


def close(a, b, tol=1e-4) -> bool:
    if isinstance(a, (tuple, list)):
        return all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    a, b = a.cpu().float(), b.cpu().float()
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=tol, atol=tol)


def equal(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a.cpu(), b.cpu())


# ---------------------------------------------------------------------------------------------


def test_discovery_sees_the_gpu():
    topo = discover()
    assert topo.gpus, topo.error
    assert topo.gpus[0].total_bytes > 0 and topo.gpus[0].name


def test_pinned_slabs():
    m = seeded(lambda: Mlp(width=512, depth=4))
    store = HostStore()  # pins by default with CUDA present
    hm = store.add("m", groups_of(m), m)
    assert hm.pinned and hm.pin_method in ("registered", "pinned_allocator")
    # torch's is_pinned() only knows its own pinned allocator, not cudaHostRegister'ed memory
    assert hm.pin_method == "registered" or hm.slab.is_pinned()
    assert store.pinned_bytes >= hm.nbytes > 0
    # one slab for the whole model, every tensor a view into it
    ptr = hm.slab.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == ptr for p in m.parameters())
    store.remove("m")
    assert store.pinned_bytes == 0


def test_streams_and_arena():
    dev = open_devices(parse_devices("cuda:0", memory_bytes=64 * MiB))[0]
    try:
        assert isinstance(dev, CudaDevice)
        _lo, hi = torch.cuda.Stream.priority_range()
        assert dev.copy_stream.priority == hi or dev.copy_stream.priority < dev.compute_streams[0].priority
        assert dev.copy_stream != dev.compute_streams[0] != torch.cuda.default_stream(0)
        arena = dev.allocate_arena(8 * MiB)
        assert arena.is_cuda and arena.data_ptr() % 4096 == 0 and int(arena.sum()) == 0
    finally:
        dev.close()


@pytest.mark.parametrize(
    "factory,inputs",
    [
        (Mlp, lambda: (torch.randn(3, 16),)),
        (tiny_bert, lambda: (torch.randint(0, 500, (2, 12)), torch.ones(2, 12, dtype=torch.int64))),
        (tiny_resnet, lambda: (torch.randn(1, 3, 32, 32),)),
    ],
)
async def test_outputs_identical_resident_and_swapped(make_pool, factory, inputs):
    pool = make_pool()
    module = seeded(factory)
    args = inputs()
    ref = reference(module, *args)  # on CPU
    pool.register("m", groups_of(module), module, rule=SMALL_GROUPS)
    poison(pool)
    async with pool.acquire("m") as p:
        assert p.outcome == "host"
        cold = await p.forward(*args)
    async with pool.acquire("m") as p:
        assert p.outcome == "hit"
        warm = await p.forward(*args)
    assert equal(cold, warm), "cold (pipelined) and resident answers differ on the GPU"
    assert close(cold, ref, 1e-3)
    pool.evict("m")
    poison(pool)
    async with pool.acquire("m") as p:
        again = await p.forward(*args)
    assert equal(again, warm)


async def test_pipelined_order_on_large_groups(make_pool):
    """Big groups copied while compute already runs: a missing wait would read NaN."""
    pool = make_pool(capacity=1024 * MiB, block=2 * MiB)
    module = seeded(lambda: Mlp(width=4096, depth=12))  # ~800 MB, 12 groups of 64 MB
    x = torch.randn(4, 16)
    pool.register("big", groups_of(module), module)
    async with pool.acquire("big") as p:
        warm_ref = await p.forward(x)
    for _ in range(3):
        pool.evict("big")
        poison(pool)
        async with pool.acquire("big") as p:
            assert not p.resident.copy_done(), "the copy should still be in flight when compute starts"
            out = await p.forward(x)
        assert equal(out, warm_ref)
    c = pool.counters("big")
    assert c["swap_ins"] == 4 and c["swap_seconds"] > 0
    gbps = pool.store.get("big").nbytes / c["last_swap_seconds"] / 1e9
    assert gbps > 2.0, f"swap-in at {gbps:.1f} GB/s: pageable memory or per-tensor copies?"


async def test_functional_call_and_whole_model_wait(make_pool):
    pool = make_pool()
    module = seeded(Mlp)
    x = torch.randn(4, 16)
    pool.register("m", groups_of(module), module, rule=SMALL_GROUPS)
    ref = reference(module, x)
    poison(pool)
    async with pool.acquire("m") as p:
        xd = x.cuda()
        out = await p.run(lambda: torch.func.functional_call(module, p.weights, (xd,)).cpu())
    assert close(out, ref, 1e-3)
    other = seeded(Mlp, 1)
    pool.register("plain", groups_of(other), None)
    async with pool.acquire("plain") as p:
        out2 = await p.run(lambda: torch.func.functional_call(other, p.weights, (x.cuda(),)).cpu())
    assert close(out2, reference(other, x), 1e-3)


async def test_concurrent_cold_requests_share_one_copy(make_pool):
    pool = make_pool(exec_slots=2)
    module = seeded(tiny_bert)
    pool.register("b", groups_of(module), module, rule=SMALL_GROUPS)
    ids = torch.randint(0, 500, (1, 16))

    async def one():
        async with pool.acquire("b") as p:
            return p.outcome, await p.forward(ids)

    results = await asyncio.gather(*[one() for _ in range(8)])
    assert [o for o, _ in results].count("host") == 1
    first = results[0][1]
    assert all(equal(out, first) for _, out in results)
    assert pool.counters("b")["swap_ins"] == 1


async def test_mixed_workload_with_evictions(make_pool):
    pool = make_pool(capacity=24 * MiB, block=2 * MiB, exec_slots=2, policy=LRUPolicy())
    x = torch.randn(2, 16)
    mods = {i: seeded(lambda: Mlp(width=512, depth=4), seed=i) for i in range(10)}  # ~4.3 MB each
    warm = {}
    for i, m in mods.items():
        pool.register(i, groups_of(m), m, rule=SMALL_GROUPS)
    rng = random.Random(5)

    async def request(k):
        async with pool.acquire(k, timeout=10) as p:
            out = await p.forward(x)
        if k in warm:
            assert equal(out, warm[k]), k
        else:
            warm[k] = out
            assert close(out, reference(mods[k], x), 1e-3)

    for _ in range(15):
        await asyncio.gather(*[request(rng.randrange(10)) for _ in range(6)])
    assert sum(c["evictions"] for c in pool.counters().values()) > 5


async def test_executing_model_is_never_evicted(make_pool):
    pool = make_pool(capacity=12 * MiB, block=2 * MiB, exec_slots=2, policy=LRUPolicy())
    x = torch.randn(2, 16)
    mods = {i: seeded(lambda: Mlp(width=512, depth=4), seed=i) for i in range(4)}
    for i, m in mods.items():
        pool.register(i, groups_of(m), m)

    async def long_run():
        async with pool.acquire(0) as p:
            first = await p.forward(x)
            await p.run(lambda: torch.cuda._sleep(int(2e8)))  # ~0.1 s of GPU time on the compute stream
            second = await p.forward(x)
            assert not p.resident.evicted
        assert equal(first, second)

    async def churn():
        for i in range(12):
            async with pool.acquire(1 + i % 3, timeout=10) as p:
                await p.forward(x)

    await asyncio.gather(long_run(), churn())
    assert pool.counters(0)["evictions"] == 0 or pool.counters(0)["requests"] == 1


async def test_timeout_when_everything_is_pinned(make_pool):
    pool = make_pool(capacity=8 * MiB, block=2 * MiB)
    a, b = seeded(lambda: Mlp(width=800, depth=2)), seeded(lambda: Mlp(width=800, depth=2), 1)  # ~5 MB
    pool.register("a", groups_of(a), a)
    pool.register("b", groups_of(b), b)
    async with pool.acquire("a"):
        with pytest.raises(MemoryFullError):
            async with pool.acquire("b", timeout=0.2):
                pass
    async with pool.acquire("b", timeout=1) as p:
        assert p.outcome == "host"


async def test_peer_copy_between_two_arenas_on_one_gpu(make_pool):
    pool = make_pool(spec="cuda:0,0", capacity=256 * MiB)
    assert [d.name for d in pool.devices] == ["cuda:0", "cuda:0/1"]
    module = seeded(tiny_bert)
    ids = torch.randint(0, 500, (1, 10))
    pool.register("b", groups_of(module), module, rule=SMALL_GROUPS)
    poison(pool)
    async with pool.acquire("b", device=0) as p0:  # may still be arriving while device 1 copies
        async with pool.acquire("b", device=1, source="peer") as p1:
            assert p1.outcome == "peer"
            out1 = await p1.forward(ids)
        out0 = await p0.forward(ids)
    assert equal(out0, out1)
    # bandwidth of the peer path for a larger model
    big = seeded(lambda: Mlp(width=2048, depth=8))  # ~135 MB
    pool.register("big", groups_of(big), big)
    await pool.prefetch("big", device=0)
    async with pool.acquire("big", device=1, source="peer") as p:
        await p.ready()
        gbps = pool.store.get("big").nbytes / p.resident.batch.seconds() / 1e9
    assert gbps > 20, f"device-to-device copy at {gbps:.1f} GB/s"


async def test_event_loop_stays_free_during_swap_and_run(make_pool):
    pool = make_pool(capacity=1024 * MiB)
    module = seeded(lambda: Mlp(width=4096, depth=12))  # ~800 MB: tens of ms to copy
    pool.register("big", groups_of(module), module)
    # One untimed round first: the first launch of each CUDA kernel in a process loads its
    # module lazily while torch holds the GIL (measured: ~140 ms stall on an H100 in a fresh
    # process). That is a once-per-process cost; what must hold is the steady state.
    async with pool.acquire("big") as p:
        await p.forward(torch.randn(2, 16))
    gaps = []
    stop = False

    async def ticker():
        last = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    t = asyncio.create_task(ticker())
    for _ in range(2):
        pool.evict("big")
        async with pool.acquire("big") as p:
            await p.ready()
            await p.forward(torch.randn(2, 16))
    stop = True
    await t
    assert max(gaps) < 0.05, f"the loop stalled for {max(gaps) * 1e3:.1f} ms"
