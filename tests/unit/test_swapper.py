"""The swap engine end to end on CPU virtual devices: DevicePool acquire / run / evict.

Networks here are small so the file stays fast; `tests/gpu/test_gpu_swap.py` reuses them on CUDA.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from torpor.runtime.devices import CpuEvent, open_devices
from torpor.runtime.memory import MemoryFullError
from torpor.runtime.partition import PartitionRule
from torpor.runtime.residency import DevicePool
from torpor.scheduling.eviction import LRUPolicy

KiB, MiB = 1 << 10, 1 << 20
SMALL_GROUPS = PartitionRule(target_bytes=32 * KiB, first_bytes=8 * KiB)


class Mlp(nn.Module):
    """Top-level children in execution order, a container in the middle (split by the rule)."""

    def __init__(self, width: int = 64, depth: int = 4):
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.blocks = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 8)

    def forward(self, x):
        return self.out(self.norm(self.blocks(torch.relu(self.inp(x)))))


def adapter_module(name: str):
    """`adapters.<name>`; where the adapters package cannot be imported (its __init__ needs the
    web stack, which a bare CUDA machine lacks) the file itself is loaded: `networks` and
    `weights` need only torch and torpor.model."""
    try:
        return importlib.import_module(f"adapters.{name}")
    except ImportError:
        path = Path(__file__).resolve().parents[2] / "adapters" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_adapters_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def tiny_bert():
    return adapter_module("networks").BertEncoder(
        vocab_size=500, hidden=64, layers=3, heads=4, ffn=128, max_positions=32
    )


def tiny_resnet():
    return adapter_module("networks").ResNet50(num_classes=10, blocks=(1, 1, 1, 1))


def seeded(factory, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory().eval().requires_grad_(False)


def groups_of(module: nn.Module):
    return adapter_module("weights").module_layer_groups(module)


def reference(module: nn.Module, *args) -> torch.Tensor:
    with torch.inference_mode():
        return module(*args)


def same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


@pytest.fixture
def make_pool():
    pools = []

    def make(spec="cpu:1", capacity=8 * MiB, block=64 * KiB, **kw):
        pool = DevicePool(
            open_devices(f"{spec}", exec_slots=kw.pop("exec_slots", 1))
            if capacity is None
            else _devices(spec, capacity, kw.pop("exec_slots", 1)),
            block_bytes=block,
            **kw,
        )
        pools.append(pool)
        return pool

    yield make
    for p in pools:
        p.close()


def _devices(spec: str, capacity: int, exec_slots: int):
    from torpor.runtime.devices import parse_devices

    return open_devices(parse_devices(spec, memory_bytes=capacity), exec_slots=exec_slots)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory,inputs",
    [
        (Mlp, lambda: (torch.randn(3, 16),)),
        (tiny_bert, lambda: (torch.randint(0, 500, (2, 12)), torch.ones(2, 12, dtype=torch.int64))),
        (tiny_resnet, lambda: (torch.randn(1, 3, 32, 32),)),
    ],
)
async def test_outputs_identical_resident_and_swapped(make_pool, factory, inputs):
    pool = make_pool(capacity=64 * MiB)
    module = seeded(factory)
    args = inputs()
    ref = reference(module, *args)
    hm = pool.register("m", groups_of(module), module, rule=SMALL_GROUPS)
    assert len(hm.groups) > 2
    assert same(reference(module, *args), ref)  # host module, now on the slab, unchanged
    async with pool.acquire("m") as p:  # cold: swapped in, pipelined
        assert p.outcome == "host"
        cold = await p.forward(*args)
    async with pool.acquire("m") as p:  # resident
        assert p.outcome == "hit"
        warm = await p.forward(*args)
    assert same(cold, warm) and same(cold, ref)
    assert pool.evict("m") == 1
    async with pool.acquire("m") as p:  # swapped in again, into whatever blocks were free
        again = await p.forward(*args)
    assert same(again, ref)
    c = pool.counters("m")
    assert (c["swap_ins"], c["hits"], c["misses"], c["evictions"]) == (2, 1, 2, 1)
    assert c["bytes_moved"] == 2 * sum(g.nbytes for g in hm.groups)


async def test_functional_call_path_and_whole_model_wait(make_pool):
    pool = make_pool()
    module = seeded(Mlp)
    x = torch.randn(4, 16)
    ref = reference(module, x)
    pool.register("hooked", groups_of(module), module, rule=SMALL_GROUPS)
    async with pool.acquire("hooked") as p:
        out = await p.run(lambda: torch.func.functional_call(module, p.weights, (x,)))
    assert same(out, ref)
    other = seeded(Mlp, seed=1)
    ref2 = reference(other, x)
    pool.register("plain", groups_of(other), None)  # no module: the run waits for every group
    async with pool.acquire("plain") as p:
        out2 = await p.run(lambda: torch.func.functional_call(other, p.weights, (x,)))
        assert p.resident.copy_done()
    assert same(out2, ref2)
    nopipe = seeded(Mlp, seed=2)
    pool.register("nopipe", groups_of(nopipe), nopipe, pipelined=False)
    async with pool.acquire("nopipe") as p:
        assert same(await p.forward(x), reference(nopipe, x))


async def test_compute_starts_before_the_copy_completes(make_pool, monkeypatch):
    """Hold back the copy of group 1: the first layer must already run, the second must wait."""
    pool = make_pool()
    module = seeded(Mlp)
    x = torch.randn(2, 16)
    ref = reference(module, x)
    hm = pool.register("m", groups_of(module), module, rule=SMALL_GROUPS)
    assert len(hm.groups) >= 3
    device = pool.devices[0]
    gate = CpuEvent()
    original = device.issue_copies

    def gated(jobs, src_device=None):
        jobs = [(d, s, gate if i == 1 else a) for i, (d, s, a) in enumerate(jobs)]
        return original(jobs, src_device)

    monkeypatch.setattr(device, "issue_copies", gated)
    seen = {}
    first_root = hm.groups[0].units[0]  # "inp"

    def after_first(*_):  # returns None: a forward hook's return value would replace the output
        seen.setdefault("first_ran_while_group1_missing", not p.resident.events[1].query())

    module.get_submodule(first_root).register_forward_hook(after_first)
    async with pool.acquire("m") as p:
        task = asyncio.create_task(p.forward(x))
        # wait for the first layer to have run (a busy machine may take a while to get there)
        for _ in range(1000):
            if "first_ran_while_group1_missing" in seen:
                break
            await asyncio.sleep(0.01)
        assert seen.get("first_ran_while_group1_missing") is True
        assert not task.done()  # blocked on group 1
        gate.set()
        out = await task
    assert same(out, ref)


async def test_concurrent_cold_requests_share_one_copy(make_pool):
    pool = make_pool(capacity=16 * MiB)
    module = seeded(Mlp)
    pool.register("m", groups_of(module), module, rule=SMALL_GROUPS)
    x = torch.randn(2, 16)
    ref = reference(module, x)

    async def one():
        async with pool.acquire("m") as p:
            return p.outcome, await p.forward(x)

    results = await asyncio.gather(*[one() for _ in range(12)])
    assert all(same(out, ref) for _, out in results)
    outcomes = [o for o, _ in results]
    assert outcomes.count("host") == 1
    c = pool.counters("m")
    assert c["swap_ins"] == 1 and c["misses"] == 1 and c["hits"] + c["joins"] == 11
    assert c["bytes_moved"] == pool.store.get("m").nbytes - 0 or c["bytes_moved"] > 0


async def test_mixed_workload_with_evictions(make_pool):
    """20 models, two devices each holding ~a quarter of them: every answer is right, and
    evictions happen."""
    pool = make_pool(spec="cpu:2", capacity=320 * KiB, block=16 * KiB, exec_slots=2)
    models, refs = {}, {}
    x = torch.randn(2, 16)
    for i in range(20):
        m = seeded(lambda: Mlp(width=96, depth=3), seed=i)  # ~0.12 MB each
        refs[i] = reference(m, x)
        models[i] = m
        pool.register(i, groups_of(m), m, rule=SMALL_GROUPS)
    total = sum(pool.store.get(i).nbytes for i in range(20))
    assert total > 3 * sum(mem.capacity for mem in pool.memories)
    rng = random.Random(3)

    async def request(key):
        async with pool.acquire(key, timeout=10) as p:
            out = await p.forward(x)
        assert same(out, refs[key]), key

    keys = [min(int(rng.paretovariate(1.2)) - 1, 19) for _ in range(150)]
    for i in range(0, len(keys), 10):
        await asyncio.gather(*[request(k) for k in keys[i : i + 10]])
    counters = pool.counters()
    assert sum(c["evictions"] for c in counters.values()) > 10
    assert sum(c["hits"] + c["joins"] for c in counters.values()) > 10
    snap = pool.residency()
    json.dumps(snap)
    for dev in snap["devices"]:
        assert dev["used_bytes"] + dev["free_bytes"] == dev["capacity_bytes"]
        assert dev["used_bytes"] == sum(m["bytes"] for m in dev["models"])


async def test_executing_model_is_never_evicted(make_pool):
    """Long runs of A hold its weights; a stream of other models needing the room must evict
    only idle models, and A's weights are intact throughout."""
    pool = make_pool(capacity=512 * KiB, block=16 * KiB, exec_slots=3, policy=LRUPolicy())
    x = torch.randn(2, 16)
    mods = {k: seeded(lambda: Mlp(width=128, depth=2), seed=k) for k in range(6)}  # ~0.14 MB each
    for k, m in mods.items():
        pool.register(k, groups_of(m), m, rule=SMALL_GROUPS)
    refs = {k: reference(m, x) for k, m in mods.items()}
    violations = []

    async def long_run(key):
        async with pool.acquire(key, timeout=10) as p:
            await p.ready()  # reads the views directly, not through the module's hooks
            before = {n: t.clone() for n, t in (await p.run(lambda: p.weights)).items()}

            def slow():
                end = time.monotonic() + 0.15
                while time.monotonic() < end:
                    if p.resident.evicted or key not in p.resident.memory.residents:
                        violations.append(key)
                    time.sleep(0.005)
                return {n: t.clone() for n, t in p.weights.items()}

            after = await p.run(slow)
            out = await p.forward(x)
        assert all(torch.equal(before[n], after[n]) for n in before), "weights changed while pinned"
        assert same(out, refs[key])

    async def churn():
        for i in range(40):
            k = 2 + i % 4
            async with pool.acquire(k, timeout=10) as p:
                assert same(await p.forward(x), refs[k])

    await asyncio.gather(long_run(0), long_run(1), churn(), long_run(0))
    assert not violations
    assert sum(c["evictions"] for c in pool.counters().values()) > 5


async def test_acquire_waits_then_times_out_when_all_pinned(make_pool):
    pool = make_pool(capacity=512 * KiB, block=16 * KiB)
    a, b = seeded(lambda: Mlp(width=200, depth=2)), seeded(lambda: Mlp(width=200, depth=2), 1)  # ~0.33 MB
    pool.register("a", groups_of(a), a)
    pool.register("b", groups_of(b), b)
    async with pool.acquire("a") as pa:
        await pa.ready()
        t0 = time.monotonic()
        with pytest.raises(MemoryFullError) as info:
            async with pool.acquire("b", timeout=0.2):
                pass
        assert 0.19 <= time.monotonic() - t0 < 2.0
        assert "b" in str(info.value) and info.value.status.value == "UNAVAILABLE"
        # a waiter is served as soon as the pin goes
        waiter = asyncio.create_task(pool.prefetch("b", timeout=5))
        await asyncio.sleep(0.05)
        assert not waiter.done()
    assert await waiter == "cpu:0"
    c = pool.counters("b")
    assert c["timeouts"] == 1 and c["memory_waits"] == 2 and c["swap_ins"] == 1
    assert pool.counters("a")["evictions"] == 1


async def test_model_larger_than_device_fails_at_once(make_pool):
    pool = make_pool(capacity=256 * KiB, block=16 * KiB)
    big = seeded(lambda: Mlp(width=400, depth=2))
    pool.register("big", groups_of(big), big)
    t0 = time.monotonic()
    with pytest.raises(MemoryFullError, match="needs"):
        async with pool.acquire("big", timeout=5):
            pass
    assert time.monotonic() - t0 < 1.0


async def test_peer_copy_between_devices(make_pool):
    pool = make_pool(spec="cpu:2", capacity=16 * MiB)
    module = seeded(tiny_bert)
    ids = torch.randint(0, 500, (1, 10))
    ref = reference(module, ids)
    pool.register("bert", groups_of(module), module, rule=SMALL_GROUPS)
    async with pool.acquire("bert", device=0) as p0:
        # while device 0's copy may still be arriving, device 1 copies from it group by group
        async with pool.acquire("bert", device=1, source="peer") as p1:
            assert p1.outcome == "peer" and p1.resident.source == "peer:cpu:0"
            out1 = await p1.forward(ids)
        out0 = await p0.forward(ids)
    assert same(out0, ref) and same(out1, ref)
    assert pool.counters("bert")["peer_swap_ins"] == 1
    async with pool.acquire("bert", device=1, source="host") as p:  # resident: a hit
        assert p.outcome == "hit"
    assert pool.evict("bert", device=1) == 1
    async with pool.acquire("bert", device=1, source="host") as p:
        assert p.outcome == "host"


async def test_peer_source_is_not_evicted_while_read(make_pool, monkeypatch):
    pool = make_pool(spec="cpu:2", capacity=4 * MiB)
    module = seeded(Mlp)
    pool.register("m", groups_of(module), module, rule=SMALL_GROUPS)
    await pool.prefetch("m", device=0)
    src = pool.memories[0].residents["m"]
    await pool.devices[0].wait(src.events[-1])  # the source has fully arrived
    dst = pool.devices[1]
    gate = CpuEvent()
    original = dst.issue_copies
    monkeypatch.setattr(
        dst,
        "issue_copies",
        lambda jobs, src_device=None: original([(d, s, gate) for d, s, _ in jobs], src_device),
    )
    await pool.prefetch("m", device=1)  # the peer copy is held at the gate
    assert not src.evictable() and pool.evict("m", device=0) == 0
    gate.set()
    await pool.devices[1].wait(pool.memories[1].residents["m"].events[-1])
    assert src.evictable() and pool.evict("m", device=0) == 1


async def test_cancelled_request_keeps_the_pin_until_its_run_ends(make_pool):
    pool = make_pool(capacity=512 * KiB, block=16 * KiB)
    a = seeded(lambda: Mlp(width=200, depth=2))
    pool.register("a", groups_of(a), a)
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def request():
        async with pool.acquire("a") as p:

            def slow():
                loop.call_soon_threadsafe(started.set)
                time.sleep(0.2)

            await p.run(slow)

    task = asyncio.create_task(request())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    r = pool.memories[0].residents["a"]
    assert r.pins == 1 and not r.evictable()  # still executing in the worker
    for _ in range(100):
        await asyncio.sleep(0.01)
        if r.pins == 0:
            break
    assert r.pins == 0 and pool.evict("a") == 1


async def test_unregister_and_counters(make_pool):
    pool = make_pool()
    m = seeded(Mlp)
    pool.register("m", groups_of(m), m)
    with pytest.raises(RuntimeError):
        await pool.prefetch("m")
        pool.register("m", groups_of(m), m)  # resident: must unregister first
    assert any("m" in mem.last_start for mem in pool.memories)  # where it sat, kept for its return
    await pool.unregister("m")
    assert "m" not in pool.store and pool.residency()["devices"][0]["models"] == []
    assert not any("m" in mem.last_start for mem in pool.memories)  # its last place is forgotten too
    with pytest.raises(KeyError):
        async with pool.acquire("m"):
            pass


async def test_churn_through_the_pool(make_pool):
    """Hundreds of real swap-ins through acquire/release: fragmentation stays bounded and the
    arena accounting stays exact."""
    pool = make_pool(capacity=1 * MiB, block=16 * KiB, policy=LRUPolicy())
    rng = random.Random(11)
    for i in range(30):
        width, depth = rng.choice([32, 64, 128, 192]), rng.randint(1, 4)
        m = seeded(lambda w=width, d=depth: Mlp(width=w, depth=d), seed=i)
        pool.register(i, groups_of(m), m, rule=SMALL_GROUPS)
    mem = pool.memories[0]
    used = []
    for _ in range(1000):
        async with pool.acquire(rng.randrange(30)) as p:
            await p.ready()
        used.append(mem.used_bytes / mem.capacity)
        assert mem.used_bytes == sum(r.nbytes for r in mem.residents.values())
    swap_ins = sum(c["swap_ins"] for c in pool.counters().values())
    assert swap_ins > 600
    first, last = sum(used[:500]) / 500, sum(used[500:]) / 500
    assert last > 0.6 and last > first - 0.05, (first, last)


async def test_rebinding_when_the_model_lands_elsewhere(make_pool):
    pool = make_pool(capacity=4 * MiB, block=16 * KiB)
    module = seeded(tiny_bert)
    ids = torch.randint(0, 500, (1, 8))
    ref = reference(module, ids)
    pool.register("b", groups_of(module), module, rule=SMALL_GROUPS)
    pool.register("pad", [("pad", {"w": torch.zeros(4096)})])
    offsets = []
    for shift in (False, True, False, True):
        pool.evict("b")
        if shift:
            await pool.prefetch("pad")
        else:
            pool.evict("pad")
        async with pool.acquire("b") as p:
            out = await p.forward(ids)
            offsets.append(tuple(p.resident.group_offsets))
        assert same(out, ref)
    # pushed elsewhere once (rebound there), then back to the place it last had whenever that is
    # free (DeviceMemory's same place on return), even where best fit would pick another
    assert offsets[0] != offsets[1] == offsets[2] == offsets[3]


async def test_a_request_waiting_for_its_stage_when_its_model_is_unloaded_gets_an_error(make_pool):
    """It holds nothing while it waits, so the unload completes; staged afterwards, it must not
    copy weights that are gone."""
    pool = make_pool(lookahead=0)
    a, b = seeded(Mlp), seeded(Mlp, 1)
    pool.register("a", groups_of(a), a)
    pool.register("b", groups_of(b), b)
    async with pool.acquire("a") as pa:  # the device's only stage
        await pa.ready()
        waiter = asyncio.create_task(pool.prefetch("b"))
        await asyncio.sleep(0.02)
        assert not waiter.done()
        await pool.unregister("b")
    with pytest.raises(MemoryFullError, match="unloaded"):
        await waiter
    assert "b" not in pool.store


async def test_a_request_still_waiting_at_its_expiry_gets_its_owners_last_look(make_pool):
    """`expire_at`: no stage by then, `on_stage(None, resident)` is called: what it raises ends
    the acquire at once; where it raises nothing, the request goes on waiting for its stage."""
    pool = make_pool(lookahead=0)
    a, b = seeded(Mlp), seeded(Mlp, 1)
    pool.register("a", groups_of(a), a)
    pool.register("b", groups_of(b), b)
    looks = []

    class Late(Exception):
        pass

    def refuse(stage, resident):
        looks.append(stage)
        raise Late

    def keep(stage, resident):
        looks.append(stage)

    async def one(on_stage):
        async with pool.acquire("b", on_stage=on_stage, expire_at=time.monotonic() + 0.03) as pb:
            await pb.ready()

    async with pool.acquire("a") as pa:  # the device's only stage
        await pa.ready()
        refused = asyncio.create_task(one(refuse))
        kept = asyncio.create_task(one(keep))
        with pytest.raises(Late):
            await asyncio.wait_for(refused, 1.0)
        await asyncio.sleep(0.02)
        assert looks == [None, None] and not kept.done()  # the second keeps waiting
    await asyncio.wait_for(kept, 1.0)
    assert len(looks) == 3 and looks[-1] is not None  # then staged as usual


async def test_an_early_copy_evicts_only_idle_models_no_one_waits_for(make_pool):
    """DevicePool.start_copy: a copy begun before its request's turn pins nothing, evicts only
    idle residents no waiting request wants, and refuses rather than evict one that is wanted."""
    a, b, c = (seeded(lambda: Mlp(width=200, depth=2), s) for s in range(3))  # ~0.33 MB each
    block = 16 * KiB
    probe = make_pool(capacity=8 * MiB, block=block)
    probe.register("a", groups_of(a), a)
    one = probe.memories[0].blocks_for(probe.store.get("a").nbytes) * block  # its footprint in the arena
    pool = make_pool(capacity=2 * one + block, block=block, lookahead=0)  # room for two of the three
    for k, m in (("a", a), ("b", b), ("c", c)):
        pool.register(k, groups_of(m), m)
    for k in ("a", "b"):
        async with pool.acquire(k) as p:
            await p.ready()  # landed: a copy in flight is never evicted
    early = pool.start_copy("c", "cpu:0")
    assert early is not None and early.outcome == "host" and early.resident.pins == 0
    await early.ready()
    dev = pool.residency()["devices"][0]
    assert sorted(r["model"] for r in dev["models"]) in (["a", "c"], ["b", "c"])
    gone = "b" if any(r["model"] == "a" for r in dev["models"]) else "a"
    kept = "a" if gone == "b" else "b"
    # now a request for the evicted model waits for the device's only stage: the resident it would
    # need is wanted by nobody, but a request waiting for `kept` protects it from an early copy
    async with pool.acquire("c") as held:  # the only stage
        await held.ready()
        waiting = asyncio.create_task(pool.prefetch(kept))
        await asyncio.sleep(0.02)
        assert pool.start_copy(gone, "cpu:0") is None  # would have to evict `kept` (wanted) or `c` (pinned)
        assert pool.start_copy("c", "cpu:0") is None  # already there
    await waiting
