"""torpor.runtime.staging on its own: stages in order, the urgent exception, deferral and its timer, and
a wait that times out passing its stage on. Run on uvloop (the server's loop) and asyncio."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop

from torpor.runtime.staging import COSTS, FREE, HARMS, StageExpired, StageTimeout, StagingQueue


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    def go(coro):
        if request.param == "uvloop":
            return uvloop.run(coro)
        return asyncio.run(coro)

    return go


def test_stages_go_lowest_order_first_within_the_permits(run):
    async def main():
        q = StagingQueue(2)
        a = await q.enter(5.0)
        b = await q.enter(6.0)
        got = []

        async def wait(order):
            s = await q.enter(order)
            got.append(order)
            return s

        tasks = [asyncio.create_task(wait(o)) for o in (9.0, 7.0, 8.0)]
        await asyncio.sleep(0.01)
        assert got == [] and q.held == 2 and q.waiting() == 3
        a.leave()
        await asyncio.sleep(0.01)
        assert got == [7.0]
        b.leave()
        b.leave()  # a second leave is a no-op
        await asyncio.sleep(0.01)
        assert got == [7.0, 8.0]
        for t in tasks[1:]:
            t.result().leave()
        await asyncio.sleep(0.01)
        assert got == [7.0, 8.0, 9.0] and q.held == 1

    run(main())


def test_an_urgent_request_gets_a_stage_beyond_the_limit(run):
    async def main():
        q = StagingQueue(1)
        held = await q.enter(5.0)
        urgent = await asyncio.wait_for(q.enter(1.0), 1.0)  # more urgent than the holder, none waiting
        assert q.held == 2
        late = asyncio.create_task(q.enter(9.0))
        await asyncio.sleep(0.01)
        assert not late.done()  # not more urgent than anyone: it waits
        held.leave()
        urgent.leave()
        await asyncio.sleep(0.01)
        assert late.done()

    run(main())


def test_a_deferred_request_is_passed_over_then_staged_forced_when_its_time_runs_out(run):
    async def main():
        blocked = {"c"}
        q = StagingQueue(1, blocked=lambda key, wanted: HARMS if key in blocked and "a" in wanted else FREE)
        holder = await q.enter(1.0, key="a")
        t0 = time.monotonic()
        cold = asyncio.create_task(q.enter(2.0, key="c", defer_until=t0 + 0.15))
        warm = asyncio.create_task(q.enter(3.0, key="a", defer_until=t0 + 10))
        warm2 = asyncio.create_task(q.enter(4.0, key="a", defer_until=t0 + 10))
        await asyncio.sleep(0.01)
        holder.leave()
        await asyncio.sleep(0.01)
        assert warm.done() and not cold.done()  # passed over while 'a' is wanted
        warm.result().leave()
        await asyncio.sleep(0.01)
        assert warm2.done() and not cold.done()  # nothing waits for 'a' now, but the device is held
        warm2.result().leave()
        stage = await asyncio.wait_for(cold, 1.0)
        assert not stage.forced  # staged once 'a' was no longer wanted: not forced
        stage.leave()
        # again, and this time 'a' stays wanted: the timer stages it, forced
        holder = await q.enter(1.0, key="a")
        t0 = time.monotonic()
        cold = asyncio.create_task(q.enter(2.0, key="c", defer_until=t0 + 0.1))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(q.enter(3.0 + i, key="a", defer_until=t0 + 10)) for i in range(3)]
        await asyncio.sleep(0.01)
        holder.leave()
        await asyncio.sleep(0.01)
        first = waiters[0].result()  # 'a' goes ahead of the deferred 'c'
        await asyncio.sleep(0.15)  # its time runs out while the device is held
        assert not cold.done()
        first.leave()
        stage = await asyncio.wait_for(cold, 1.0)  # next in order now, although 'a' is still wanted
        assert stage.forced
        stage.leave()
        for w in waiters[1:]:
            (await w).leave()
        # the deferral timers fired, each some (small) time past its moment, and that is kept
        assert q.timer_late and all(0.0 <= x < 0.1 for x in q.timer_late)

    run(main())


def test_a_request_that_only_costs_others_is_deferred_but_not_forced(run):
    """COSTS (its copy would evict a model while requests needing none wait): passed over until its time runs
    out, then staged as any other, not forced (its owner serves it)."""
    async def main():
        q = StagingQueue(1, blocked=lambda key, wanted: COSTS if key == "c" else FREE)
        holder = await q.enter(1.0, key="a")
        t0 = time.monotonic()
        cold = asyncio.create_task(q.enter(2.0, key="c", defer_until=t0 + 0.05))
        warm = asyncio.create_task(q.enter(3.0, key="a", defer_until=t0 + 10))
        await asyncio.sleep(0.01)
        holder.leave()
        await asyncio.sleep(0.01)
        assert warm.done() and not cold.done()
        assert not q.would_defer("c")  # only HARMS is refused at arrival
        await asyncio.sleep(0.06)
        warm.result().leave()
        stage = await asyncio.wait_for(cold, 1.0)
        assert not stage.forced
        stage.leave()

    run(main())


def test_a_wait_that_times_out_raises_and_gives_nothing_away(run):
    async def main():
        q = StagingQueue(1)
        held = await q.enter(1.0)
        with pytest.raises(StageTimeout):
            await q.enter(2.0, deadline=time.monotonic() + 0.05)
        nxt = asyncio.create_task(q.enter(3.0))
        held.leave()
        (await asyncio.wait_for(nxt, 1.0)).leave()
        assert q.held == 0 and q.waiting() == 0

    run(main())


def test_a_wait_past_its_last_start_moment_expires_before_its_timeout(run):
    """`expire_at` (the last moment the request could start and be on time) comes before the
    timeout: StageExpired then, the request leaves the queue and wants nothing any more."""
    async def main():
        q = StagingQueue(1, blocked=lambda key, wanted: FREE)
        held = await q.enter(1.0, key="a")
        t0 = time.monotonic()
        with pytest.raises(StageExpired):
            await q.enter(2.0, deadline=t0 + 5.0, key="b", defer_until=t0 + 1.0, expire_at=t0 + 0.05)
        assert 0.04 < time.monotonic() - t0 < 1.0
        assert q.waiting() == 0 and q.waiting_keys() == set()
        with pytest.raises(StageTimeout):  # the timeout first: StageTimeout, as before
            await q.enter(3.0, deadline=time.monotonic() + 0.02, expire_at=time.monotonic() + 5.0)
        held.leave()
        (await q.enter(4.0, expire_at=time.monotonic() + 5.0)).leave()  # a free stage: granted at once
        assert q.held == 0

    run(main())


def test_a_cancelled_waiter_is_skipped(run):
    async def main():
        q = StagingQueue(1)
        held = await q.enter(1.0, key="x")
        gone = asyncio.create_task(q.enter(2.0, key="y"))
        nxt = asyncio.create_task(q.enter(3.0, key="z"))
        await asyncio.sleep(0.01)
        assert q.waiting_keys() == {"y", "z"}
        gone.cancel()
        await asyncio.sleep(0.01)
        assert q.waiting_keys() == {"z"}
        held.leave()
        (await asyncio.wait_for(nxt, 1.0)).leave()
        assert q.held == 0

    run(main())


def test_the_tag_says_whether_a_request_is_being_passed_over(run):
    class Tag:
        passed = None

    async def main():
        q = StagingQueue(1, blocked=lambda key, wanted: HARMS if key == "c" and "a" in wanted else FREE)
        holder = await q.enter(1.0, key="a")
        warm, cold = Tag(), Tag()
        t0 = time.monotonic()
        w = asyncio.create_task(q.enter(3.0, key="a", defer_until=t0 + 10, tag=warm))
        c = asyncio.create_task(q.enter(2.0, key="c", defer_until=t0 + 10, tag=cold))
        await asyncio.sleep(0.01)
        assert cold.passed is True and warm.passed is False
        holder.leave()
        await asyncio.sleep(0.01)
        assert w.done() and warm.passed is False and cold.passed is True
        w.result().leave()  # nobody wants 'a' now: 'c' is staged
        stage = await asyncio.wait_for(c, 1.0)
        assert cold.passed is False
        stage.leave()

    run(main())
