"""The gRPC service hosted on grpc's threaded server, its calls bridged to the engine's loop.

Why not grpc.aio here: on the 2-core development machine a bare grpc.aio servicer costs ~170 us
of server CPU per unary call (its per-call tasks, `asyncio.wait`, and the hand-off from its
completion-queue poller thread to the loop), a bare threaded grpc server ~115 us, and the
threaded server handing each call to an asyncio loop ~150 us (`loadtest/compare.py`, README
"Protocol overhead"). So the threaded server with a bridge is the cheaper host even though every
call crosses threads twice.

What runs where: grpc's C-core threads and a pool of handler threads (one per call in flight,
two per open stream) only move messages; the `InferenceServicer` (api/grpc.py), with all the
protocol semantics, runs unchanged on the engine's event loop, as it does under grpc.aio. The
servicer sees a small context (`_LoopContext`) with the things it uses of
`grpc.aio.ServicerContext`: `invocation_metadata()`, `await abort(code, details)`,
`set_trailing_metadata(...)` and `add_done_callback(...)`.

Cancellation: the call's termination callback (client cancel, deadline, server stop) cancels the
loop task, so the engine sees `CancelledError` as it does under grpc.aio. A normal finish runs
the same callback on a finished future, which is a no-op.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import types
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

log = logging.getLogger("torpor.grpc")

_END = object()
_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]


class _Abort(grpc.aio.AbortError):
    """`await context.abort(...)` on the loop; the handler thread turns it into the real abort.
    A grpc.aio.AbortError, so the servicer's error handling passes it through untouched."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code, self.details = code, details


class _LoopContext:
    __slots__ = ("_context",)

    def __init__(self, context: grpc.ServicerContext):
        self._context = context

    def invocation_metadata(self):
        return self._context.invocation_metadata()

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Abort(code, details)

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self._context.set_trailing_metadata(metadata)

    def add_done_callback(self, callback: Callable) -> None:
        """As grpc.aio's: `callback(context)` once the call has ended (on a gRPC thread)."""
        self._context.add_callback(lambda: callback(self))


def _unary(loop: asyncio.AbstractEventLoop, method: Callable) -> Callable:
    def handle(request, context: grpc.ServicerContext):
        fut = asyncio.run_coroutine_threadsafe(method(request, _LoopContext(context)), loop)
        context.add_callback(fut.cancel)
        try:
            return fut.result()
        except _Abort as e:
            context.abort(e.code, e.details)
        except concurrent.futures.CancelledError:
            # the call already ended (cancelled by the client, past its deadline, server stopping)
            context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")

    return handle


def _stream(loop: asyncio.AbstractEventLoop, method: Callable) -> Callable:
    def handle(request_iterator: Iterator, context: grpc.ServicerContext):
        inbox: asyncio.Queue = asyncio.Queue()  # bound to the loop on first use, which is on the loop
        out: queue.SimpleQueue = queue.SimpleQueue()

        async def requests() -> AsyncIterator[Any]:
            while (msg := await inbox.get()) is not _END:
                yield msg

        async def pump() -> None:
            try:
                async for resp in method(requests(), _LoopContext(context)):
                    out.put(resp)
            except BaseException as e:  # noqa: BLE001 - handed to the handler thread as it is
                out.put(e)
            finally:
                out.put(_END)

        def read() -> None:
            # grpc's request iterator blocks, so it gets a thread of its own
            try:
                for msg in request_iterator:
                    loop.call_soon_threadsafe(inbox.put_nowait, msg)
            except Exception:  # noqa: BLE001 - the call ended (cancelled): no more requests
                pass
            finally:
                try:
                    loop.call_soon_threadsafe(inbox.put_nowait, _END)
                except RuntimeError:  # the loop is closed: the server is gone
                    pass

        fut = asyncio.run_coroutine_threadsafe(pump(), loop)
        context.add_callback(fut.cancel)
        threading.Thread(target=read, name="grpc-stream-reader", daemon=True).start()
        while (item := out.get()) is not _END:
            if isinstance(item, _Abort):
                context.abort(item.code, item.details)
            if isinstance(item, (asyncio.CancelledError, concurrent.futures.CancelledError)):
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    return handle


class ThreadedServer:
    """A started threaded gRPC server; `await stop(grace)` as grpc.aio.Server's."""

    def __init__(self, server: grpc.Server):
        self._server = server

    async def stop(self, grace: float | None) -> None:
        # stopping waits for calls in flight, which need the loop running: wait off the loop
        done = self._server.stop(grace)
        await asyncio.get_running_loop().run_in_executor(None, done.wait)


def start_threaded_server(servicer: Any, options: list[tuple[str, Any]], address: str,
                          threads: int) -> ThreadedServer | None:
    """Serve `servicer` (torpor.api.grpc.InferenceServicer, async methods) on grpc's threaded server,
    each call run on the running loop; at most `threads` calls in flight (more wait in grpc).
    None when `address` cannot be bound."""
    loop = asyncio.get_running_loop()
    handlers = {}
    for m in _SERVICE.methods:
        fn = getattr(servicer, m.name)
        handlers[m.name] = _stream(loop, fn) if m.client_streaming else _unary(loop, fn)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
                         options=options)
    pbg.add_GRPCInferenceServiceServicer_to_server(types.SimpleNamespace(**handlers), server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # newer grpc raises where older ones returned 0
        bound = 0
    if bound == 0:
        return None
    server.start()
    return ThreadedServer(server)
