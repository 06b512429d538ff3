"""Staging: a device's requests take turns to hold its memory.

A request pins its model's weights in the device arena from the moment it acquires them
until its run finishes; a pinned model cannot be evicted. If every waiting request pinned its
model on arrival, a burst would pin every resident in a queue of work, and a request for a
model that is not resident would find nothing it may evict: it waits while the residents'
own requests keep arriving and re-pinning them (the collapse seen under overload, issue 16:
requests failing after 30 s with "every resident that would have to go is in use").

So a device hands out a few *stages* (`permits`: its execution slots plus a small lookahead)
in the scheduler's order (lowest key first: the request's deadline under Torpor's policy,
arrival order otherwise). Only a staged request acquires memory: a hit pins the resident, a
miss evicts idle residents and starts its copy, which then lands while the request ahead of it
runs (the lookahead is what keeps copies pipelined against execution). A request waiting for
a stage holds nothing. The rule that makes it livelock-free: a staged request never waits for
anything but the device and the memory held by the other staged requests, each of which
finishes and gives its stage back, so the request at the head of the queue always gets memory
within the runs of at most `permits - 1` requests.

Everything here runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from torpor.scheduling.admission import COSTS, FREE, HARMS, deferred, stage_at_once, stage_level

__all__ = ["COSTS", "FREE", "HARMS", "Stage", "StageExpired", "StageTimeout", "StagingQueue"]



class StageTimeout(Exception):
    """The request's deadline passed while it waited for a stage."""


class StageExpired(Exception):
    """No stage was granted by the enter's `expire_at`: the request can no longer be on time."""


class Stage:
    """A stage held on a device; `leave()` gives it back (once). `level`: for a request that
    could be deferred (see `StagingQueue`), what staging it still does to others when it got
    its stage (FREE, or, once its time ran out, COSTS or HARMS); `forced`: HARMS."""

    __slots__ = ("_queue", "level", "order")

    def __init__(self, queue: StagingQueue, order: float, level: int = 0):
        self._queue: StagingQueue | None = queue
        self.order = order
        self.level = level

    @property
    def forced(self) -> bool:
        return self.level == HARMS

    def leave(self) -> None:
        q, self._queue = self._queue, None
        if q is not None:
            q._leave(self)


class StagingQueue:
    """One device's stages: `await enter(order, deadline)` waits for one and returns it.

    Two exceptions to plain lowest-order-first:

    - A request more urgent than every one waiting and than a request already staged gets a
      stage at once, up to `permits` beyond the limit. Otherwise a request staged a moment
      earlier (the lookahead) would run before it whatever its deadline; the device's workers
      run staged requests lowest order first (`Device.run_in_worker(key=...)`).
    - A request that may be deferred (`defer_until`, set for requests with a latency objective)
      is passed over while staging it would cost others (`blocked(key, wanted)`, the owner's
      view of the arena: `HARMS` where it would evict a model that waiting requests with an
      objective want, `COSTS` where it would evict a model requested more often while requests
      that need no copy wait): a burst for a resident model is served from memory rather than
      thrashing it out for one request and back for the next. Once its time runs out it is
      staged like any other, with the `level` it still has (its owner sheds it where that
      HARMS waiting requests, and where it COSTS, if stalling the device for its copy would make
      queued requests late), so nothing waits for ever. Requests without an objective are never deferred and
      protect nothing: they are served in order.
    """

    def __init__(self, permits: int, blocked: Callable[[Any, Any], int] | None = None):
        self.permits = max(1, int(permits))
        self.holders: list[Stage] = []
        # (order, seq, future, model key, defer_until, tag): waiting requests; a cancelled future
        # is skipped; `tag.passed` (where a tag is given) says whether it is being passed over
        self._heap: list[tuple[float, int, asyncio.Future, Any, float, Any]] = []
        self._seq = itertools.count()
        self._wanted: Counter = Counter()  # model key -> requests waiting for it
        self._protected: Counter = Counter()  # the same, counting only requests with an objective
        self._blocked = blocked
        # seconds each deferral timer fired past its time (the last 4096): a deferred request is
        # staged DEFER_MARGIN_S before its last moment, and a timer that late eats that margin
        self.timer_late: deque = deque(maxlen=4096)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf  # time.monotonic() it fires (uvloop's handles do not say)

    @property
    def held(self) -> int:
        return len(self.holders)

    def waiting(self) -> int:
        return sum(self._wanted.values())

    def waiting_keys(self) -> set[Any]:
        """Models with requests waiting for a stage: eviction keeps them if it can."""
        return set(self._wanted)

    async def enter(self, order: float = math.inf, deadline: float | None = None, key: Any = None,
                    defer_until: float = 0.0, tag: Any = None, expire_at: float = math.inf) -> Stage:
        """Wait for a stage, lowest `order` first (ties in arrival order). `deadline`
        (time.monotonic()): raise StageTimeout if none was granted by then. `defer_until`:
        until then it may be passed over (class docstring). `tag`: an object whose `passed`
        attribute is kept saying whether it is being passed over (the placer's ticket: work
        passed over is ahead of no one). `expire_at`: raise StageExpired if none was granted
        by then (the last moment its run could start and still be on time: the owner refuses
        it then, not whenever a stage comes)."""
        self._prune()
        head = self._heap[0][0] if self._heap else None
        if stage_at_once(order, self.held, self.permits, head, (h.order for h in self.holders)) \
                and not self._deferred(key, defer_until):
            return self._hold(order, self._level(key, defer_until))
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (order, next(self._seq), fut, key, defer_until, tag))
        if tag is not None:
            tag.passed = self._deferred(key, defer_until)
        self._want(key, defer_until)
        self._grant()
        until = min(math.inf if deadline is None else deadline, expire_at)
        try:
            if until == math.inf:
                return await asyncio.shield(fut)
            done, _ = await asyncio.wait({fut}, timeout=max(0.0, until - time.monotonic()))
            if not done:
                raise StageExpired if expire_at <= until else StageTimeout
            return fut.result()
        except BaseException:
            if fut.done() and not fut.cancelled():
                fut.result().leave()  # granted as it gave up: pass the stage on
            else:
                fut.cancel()
                self._unwant(key, defer_until)
            raise

    def _deferred(self, key: Any, defer_until: float) -> bool:
        return self._blocked is not None and deferred(time.monotonic(), defer_until, lambda: self._harm(key))

    def _level(self, key: Any, defer_until: float) -> int:
        # above FREE only once its time ran out (else it would have been passed over)
        return FREE if self._blocked is None else stage_level(defer_until, lambda: self._harm(key))

    def _harm(self, key: Any) -> int:
        return self._blocked(key, self._protected.keys())

    def _want(self, key: Any, defer_until: float) -> None:
        self._wanted[key] += 1
        if defer_until > 0:
            self._protected[key] += 1

    def _unwant(self, key: Any, defer_until: float) -> None:
        for counts in (self._wanted, self._protected) if defer_until > 0 else (self._wanted,):
            n = counts[key] - 1
            if n > 0:
                counts[key] = n
            else:
                del counts[key]

    def _hold(self, order: float, level: int = FREE) -> Stage:
        stage = Stage(self, order, level)
        self.holders.append(stage)
        return stage

    def _leave(self, stage: Stage) -> None:
        self.holders.remove(stage)
        self._grant()

    def _grant(self) -> None:
        passed = []
        wake = math.inf
        now = time.monotonic()
        # what staging each model would do to the others, asked once per model per pass (it
        # walks the device's residents): hundreds of requests may be passed over, and this runs
        # whenever a run ends; a grant changes who waits, so it starts afresh after one
        levels: dict[Any, int] = {}

        def harm(key: Any) -> int:
            lv = levels.get(key)
            if lv is None:
                lv = levels[key] = self._harm(key)
            return lv

        while self.held < self.permits and self._heap:
            entry = heapq.heappop(self._heap)
            order, _, fut, key, defer_until, tag = entry
            if fut.done():  # abandoned while waiting
                continue
            if self._blocked is not None and deferred(now, defer_until, lambda key=key: harm(key)):
                passed.append(entry)
                wake = min(wake, defer_until)
                if tag is not None:
                    tag.passed = True
                continue
            self._unwant(key, defer_until)
            if tag is not None:
                tag.passed = False
            fut.set_result(self._hold(order, self._level(key, defer_until)))
            levels.clear()
        for entry in passed:
            heapq.heappush(self._heap, entry)
        if wake < self._timer_at:
            # its time runs out then: staged (or shed) even if nothing else changes
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = wake
            self._timer = asyncio.get_running_loop().call_later(max(0.0, wake - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self.timer_late.append(max(0.0, time.monotonic() - self._timer_at))
        self._timer, self._timer_at = None, math.inf
        self._grant()

    def would_defer(self, key: Any) -> bool:
        """A request for `key` with an objective arriving now would be passed over for as long
        as the requests it would harm wait (and shed if they outlast it)."""
        return self._blocked is not None and self._blocked(key, self._protected.keys()) == HARMS

    def poke(self) -> None:
        """Something the owner's `blocked` reads has changed (a model left or landed)."""
        if self._heap:
            self._grant()

    def _prune(self) -> None:
        while self._heap and self._heap[0][2].done():
            heapq.heappop(self._heap)
        if len(self._heap) > 64 and self.waiting() < len(self._heap) // 2:
            self._heap = [e for e in self._heap if not e[2].done()]
            heapq.heapify(self._heap)
