"""Triton's dynamic batcher for models the engine runs where they are loaded (no `--devices`;
device-bound models batch on their device's queue, torpor.runtime.device_path).

A model whose config has `dynamic_batching` and a `max_batch_size` gets its requests gathered
into one `execute` call, as Triton's python backend gets a list of requests: a batch opens with
its first request, stays open `max_queue_delay_microseconds` unless it fills first (rows up to
the largest `preferred_batch_size`, else `max_batch_size`), then waits for a free instance while
later requests still join it (up to `max_batch_size` rows), and runs. Requests in an open batch
are waiting in the queue, so Triton's `max_queue_size` counts them (Engine._admit).

A request that stops waiting (its `timeout`, or its client gone) leaves a batch that has not
started; once started the batch runs to the end, as a thread cannot be stopped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any

from torpor.dataplane.timeouts import wait_until
from torpor.errors import internal
from torpor.model import ModelFunction, ModelRequest
from torpor.registry.model_entry import ModelEntry, VersionEntry


class HostBatch:
    """Requests gathered for one execution of one model version."""

    __slots__ = ("full", "members", "rows", "started")

    def __init__(self):
        self.members: list[tuple[ModelRequest, asyncio.Future]] = []
        self.rows = 0
        self.full = asyncio.Event()
        self.started = False

    def add(self, mreq: ModelRequest, rows: int, full_at: int) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        self.members.append((mreq, fut))
        self.rows += rows
        if self.rows >= full_at:
            self.full.set()
        return fut

    def withdraw(self, fut: asyncio.Future, rows: int) -> None:
        """Take a request out of a batch that has not started (a started one runs it anyway)."""
        if self.started:
            return
        for i, (_, f) in enumerate(self.members):
            if f is fut:
                del self.members[i]
                self.rows -= rows
                return


class HostBatcher:
    """The batches of every host-run model version with dynamic batching (one engine's)."""

    def __init__(self, workers: concurrent.futures.Executor):
        self.workers = workers
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def wants(entry: ModelEntry, ve: VersionEntry) -> bool:
        """Whether this request goes through a batch: always with a queue delay; without one only
        when it would wait anyway (a batch is gathering, or every instance is busy), so an idle
        model runs a lone request at once, as Triton's batcher does."""
        return entry.batching > 0 or ve.open_batch is not None or ve.slots.locked()

    async def run(self, entry: ModelEntry, ve: VersionEntry, mreq: ModelRequest, rows: int,
                  deadline: float | None) -> tuple[Any, int, int, int, int]:
        """(result, batch start ns, execution start ns, execution end ns, rows executed: the
        batch's for its first request, 0 for those that rode with it)."""
        batch = ve.open_batch
        if batch is None or batch.rows + rows > entry.max_batch_size:
            batch = ve.open_batch = HostBatch()
            task = asyncio.ensure_future(self._dispatch(entry, ve, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        fut = batch.add(mreq, rows, entry.batch_full_at)
        try:
            return await wait_until(fut, deadline)
        except BaseException:
            batch.withdraw(fut, rows)
            fut.add_done_callback(_consume)  # its result, if the batch runs it, goes nowhere
            raise
        finally:
            if batch.started:
                ve.executing -= 1  # counted when its batch started (_dispatch)

    async def _dispatch(self, entry: ModelEntry, ve: VersionEntry, batch: HostBatch) -> None:
        if entry.batching > 0:
            try:
                await asyncio.wait_for(batch.full.wait(), entry.batching)
            except TimeoutError:
                pass
        await ve.slots.acquire()  # later requests keep joining while every instance is busy
        batch.started = True
        if ve.open_batch is batch:
            ve.open_batch = None
        members = batch.members
        if not members:  # all of them stopped waiting
            ve.slots.release()
            return
        ve.executing += len(members)
        t_start = time.monotonic_ns()
        try:
            fut = asyncio.get_running_loop().run_in_executor(
                self.workers, _timed_execute, ve.function, [m for m, _ in members])
        except BaseException as e:
            ve.slots.release()
            _fail(members, e)
            raise
        # The instance is free when the thread returns, whoever still waits for the answer.
        fut.add_done_callback(lambda _f: ve.slots.release())
        try:
            results, t_exec_start = await asyncio.shield(fut)
            if len(results) != len(members):
                raise internal(f"model '{entry.name}' returned {len(results)} results for {len(members)} requests")
        except BaseException as e:  # the model's failure is every member's
            _fail(members, e if isinstance(e, Exception) else internal("the batch was cancelled"))
            if not isinstance(e, Exception):
                raise
            return
        t_done = time.monotonic_ns()
        rows = batch.rows
        for i, ((_, f), result) in enumerate(zip(members, results)):
            if not f.done():
                f.set_result((result, t_start, t_exec_start, t_done, rows if i == 0 else 0))


def _timed_execute(fn: ModelFunction, mreqs: list[ModelRequest]) -> tuple[list, int]:
    t_in = time.monotonic_ns()
    return fn.execute(mreqs), t_in


def _fail(members: list[tuple[ModelRequest, asyncio.Future]], error: BaseException) -> None:
    for _, f in members:
        if not f.done():
            f.set_exception(error)


def _consume(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()
