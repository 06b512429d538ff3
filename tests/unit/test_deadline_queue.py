"""Deadline-ordered device queues: the worker serves the lowest key first, and the placer
gives a request its deadline as key unless overtaking would make a queued request late."""

from __future__ import annotations

import math
import threading
import time
from types import SimpleNamespace

from torpor.runtime.devices import _OrderedWorkers
from torpor.runtime.placer import Placer, Ticket
from torpor.scheduling.costmodel import LinkMap
from torpor.scheduling.eviction import CostAwarePolicy


def test_workers_serve_lowest_key_first_fifo_on_ties():
    gate = threading.Event()
    order: list[str] = []
    w = _OrderedWorkers(1, "test", lambda: None)
    try:
        w.submit(0.0, gate.wait)  # occupies the only worker while the others queue
        futs = [w.submit(k, order.append, name) for k, name in
                ((math.inf, "fifo-1"), (5.0, "late"), (1.0, "early"), (math.inf, "fifo-2"), (1.0, "early-2"))]
        gate.set()
        for f in futs:
            f.result(timeout=10)
        assert order == ["early", "early-2", "late", "fifo-1", "fifo-2"]
    finally:
        w.shutdown()


def test_cancelled_queued_work_is_skipped():
    gate = threading.Event()
    ran: list[int] = []
    w = _OrderedWorkers(1, "test", lambda: None)
    try:
        w.submit(0.0, gate.wait)
        f1 = w.submit(1.0, ran.append, 1)
        f2 = w.submit(2.0, ran.append, 2)
        assert f1.cancel()
        gate.set()
        f2.result(timeout=10)
        assert ran == [2]
    finally:
        w.shutdown()


def _placer() -> Placer:
    mem = SimpleNamespace(device=SimpleNamespace(name="d0"), residents={}, capacity=1 << 30, free_bytes=1 << 30)
    pool = SimpleNamespace(memories=[mem], policy=CostAwarePolicy(), request_rate=lambda k: 0.0)
    return Placer(pool, LinkMap(["d0"], {"d0": 1e9}))


def test_a_short_deadline_goes_ahead_of_work_with_time_to_spare():
    p = _placer()
    now = time.monotonic()
    running = Ticket(p, "d0", 0.2, None, key=now + 5, due=now + 5, guard=now + 4.5)
    running.started_at = now
    Ticket(p, "d0", 0.2, None, key=now + 5, due=now + 5, guard=now + 4.5)
    Ticket(p, "d0", 0.2, None, key=now + 5, due=now + 5, guard=now + 4.5)
    ahead, key, _ = p._work_ahead("d0", now, now + 0.3, 0.02)
    assert key == now + 0.3
    assert abs(ahead - 0.2) < 1e-3  # only the running request is ahead of it
    # first come, first served: behind everything
    ahead, key, _ = p._work_ahead("d0", now, None, 0.02)
    assert abs(ahead - 0.6) < 1e-3 and key == math.inf


def test_it_queues_behind_when_overtaking_would_make_one_late():
    p = _placer()
    now = time.monotonic()
    # a queued request that just makes its margin: 0.2 s of work ahead of it, guard at 0.45 s
    Ticket(p, "d0", 0.2, None, key=now + 0.5, due=now + 0.5, guard=now + 0.45)
    Ticket(p, "d0", 0.2, None, key=now + 0.5, due=now + 0.5, guard=now + 0.45)
    ahead, key, _ = p._work_ahead("d0", now, now + 0.3, 0.1)  # it would push the second to 0.5 s
    assert key == now + 0.5  # behind them
    assert abs(ahead - 0.4) < 1e-3


def test_only_requests_past_their_whole_slo_are_hopeless():
    from torpor.scheduling.scheduler import Decision, Option, hopeless

    def decision(done_s: float, slo_s: float, meets: bool) -> Decision:
        return Decision(Option("d0", "swap", "host", done_s), meets, slo_s)

    assert hopeless(decision(0.25, 0.2, False))
    assert not hopeless(decision(0.19, 0.2, False))  # misses the 0.9 margin only: a hedge, kept in order
    assert not hopeless(decision(0.05, 0.2, True))
    assert not hopeless(Decision(None, False, 0.2))


def test_the_snapshot_says_when_each_link_clears():
    from torpor.runtime.placer import _Copy

    p = _placer()
    now = time.monotonic()
    live = SimpleNamespace(evicted=False, copy_done=lambda: False)
    p._copies = [_Copy(live, ("pcie:d0",), now + 0.050, "host", 0), _Copy(live, ("pcie:d0",), now + 0.020, "host", 1)]
    snap = p.snapshot()
    assert snap.inflight == {"pcie:d0": 2}
    assert abs(snap.clear_in(("pcie:d0",)) - 0.050) < 5e-3  # the later of the two etas
    assert snap.clear_in(("nvlink:d0>d1",)) == 0.0  # nothing on it


def _copying(device, nbytes: int):
    """A resident whose copy the test lands by hand (`land`: its copy stream's seconds)."""
    r = SimpleNamespace(device=device, model=SimpleNamespace(nbytes=nbytes), evicted=False, done=False,
                        batch=SimpleNamespace(seconds=lambda: None))
    r.copy_done = lambda: r.done

    def land(seconds: float) -> None:
        r.done = True
        r.batch = SimpleNamespace(seconds=lambda: seconds)

    return r, land


def test_a_copy_queued_behind_another_is_held_against_its_own_time():
    """Copies into one device go one after another on its copy stream, whose timing is each
    copy's own: the second copy, issued while the first is in flight, takes its time alone
    once it starts. Held against a half share of the link (the estimate that counts the first
    as sharing it), it looked twice as fast as predicted and the calibration cut every later
    estimate (0.81 under the CPU overload reproduction); held against its own time it is 1."""
    p = _placer()
    d0 = p.pool.memories[0].device
    nbytes = 100_000_000  # 0.1 s alone at 1 GB/s
    alone = p.cost.transfer_seconds(nbytes, p.links.host_path("d0"), {})
    (r1, land1), (r2, land2) = _copying(d0, nbytes), _copying(d0, nbytes)
    eta1 = p.copy_started(r1, None, "host")
    eta2 = p.copy_started(r2, None, "host")
    assert eta2 - eta1 > 0.5 * alone  # the second lands after the first (its landing estimate)
    land1(alone)
    land2(alone)  # each took its own time on the stream
    p._inflight(time.monotonic())  # the placer learns from copies that have landed
    cal = p.cost.copies.as_dict(lambda path: ">".join(path))
    assert cal == {">".join(p.links.host_path("d0")): {"samples": 2, "mean": 1.0, "spread": 0.0}}


def test_a_ticket_whose_copy_started_at_arrival_has_no_copy_of_its_own_left():
    """The scheduler planned a copy (SWAP) and the device path started it at arrival, before the
    ticket was opened: the ticket waits for that copy's landing, not for a copy of its own from
    its stage (which projected the copy a second time for every request behind it)."""
    from torpor.scheduling.scheduler import Action, Decision, Option

    p = _placer()
    mem = p.pool.memories[0]
    p.pool.memory = lambda device: mem
    nbytes = 100_000_000
    swap = Decision(Option("d0", Action.SWAP, "host", completion_s=0.12, transfer_s=0.1, exec_s=0.02),
                    meets_slo=True, slo_s=1.0)
    before = p.admit("m", swap, slo_s=1.0)
    assert before.transfer > 0  # not on the device: its copy starts when it is staged
    before.done()
    r, _land = _copying(mem.device, nbytes)
    mem.residents["m"] = r
    eta = p.copy_started(r, swap, "host")  # the copy started at its arrival
    t = p.admit("m", swap, slo_s=1.0)
    assert t.transfer == 0.0 and t.ready_at == eta
    now = time.monotonic()
    ahead, _, _ = p._work_ahead("d0", now, None, 0.0)
    assert ahead < eta - now + 0.02 + 0.01  # its landing and its run, not a second copy after its stage
