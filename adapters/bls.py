"""Business Logic Scripting: `pb_utils.InferenceRequest(...).exec()` / `async_exec()` inside a
Python-backend model, routed through the engine.

`torpor serve` calls `install_bls(engine, loop)` once the engine exists. The engine runs on
`loop` (the main thread); models execute on worker threads. A BLS call turns the
`pb_utils.InferenceRequest` into a `torpor.tensors.InferRequest`, submits `engine.infer(...)`
(or `engine.infer_stream(...)` for `decoupled=True`) to the loop with
`asyncio.run_coroutine_threadsafe` and turns the answer back into `pb_utils.InferenceResponse`s.
As in Triton, a failure of the called model (unknown model, bad input, its own error) is the
response's `error()`, not an exception.

The engine lets a cheap model execute inline on the loop thread (`torpor.registry.model_entry.InlineGate`). A
model that calls BLS, or whose `execute` is a coroutine, must not: it would wait on the loop it
is blocking. Its first such call (always on a worker thread: models start on the pool) takes it
off the inline path for good; a BLS call that does arrive on the loop thread raises
`TritonModelException` instead of deadlocking.

What is mapped: inputs (BYTES as object arrays of bytes; passed read-only, so the callee copies
before writing), requested outputs (none: all), `model_version` (-1: the latest),
`request_id`, `parameters`, `correlation_id` and the sequence start/end `flags`, and `timeout`
(microseconds, 0: none; on expiry the response carries an UNAVAILABLE error). The response
iterator of `exec(decoupled=True)` yields each response the called model sends (the last may be
empty: a bare final flag) and has `cancel()`. Mind the worker pool: a BLS caller holds a worker
thread while the callee runs, so as many concurrent BLS callers as worker threads, calling
models that need one too, would wait forever; keep BLS models' instance counts well below it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import time

from torpor.errors import Status, TorporError, unsupported
from torpor.tensors import InferRequest, InferResponse, RequestedOutput, Tensor

from . import python_backend
from . import triton_python_backend_utils as pb_utils

__all__ = ["BlsBridge", "ResponseIterator", "install_bls", "uninstall_bls"]

_TRITON_CODE = {
    Status.UNKNOWN: pb_utils.TritonError.UNKNOWN,
    Status.INTERNAL: pb_utils.TritonError.INTERNAL,
    Status.NOT_FOUND: pb_utils.TritonError.NOT_FOUND,
    Status.INVALID_ARG: pb_utils.TritonError.INVALID_ARG,
    Status.UNAVAILABLE: pb_utils.TritonError.UNAVAILABLE,
    Status.UNSUPPORTED: pb_utils.TritonError.UNSUPPORTED,
    Status.ALREADY_EXISTS: pb_utils.TritonError.ALREADY_EXISTS,
    Status.CANCELLED: pb_utils.TritonError.CANCELLED,
}

_END = object()  # end of a response stream


def install_bls(engine, loop: asyncio.AbstractEventLoop) -> BlsBridge:
    """Route BLS calls of Python-backend models to `engine`, which runs on `loop`."""
    bridge = BlsBridge(engine, loop)
    pb_utils.set_bls_handler(bridge)
    python_backend.off_loop_hook = bridge.keep_off_loop
    return bridge


def uninstall_bls(bridge: BlsBridge | None = None) -> None:
    """Stop routing BLS calls; with `bridge`, only if it is still the one installed (a later server
    in the same process keeps its own). A stopped server must not leave its bridge behind: later
    callers would get "shutting down" instead of UNSUPPORTED."""
    if bridge is not None and pb_utils._bls_handler is not bridge:
        return
    pb_utils.set_bls_handler(None)
    python_backend.off_loop_hook = None


def error_response(error: BaseException) -> pb_utils.InferenceResponse:
    """A failure as the response Triton's BLS gives back (the error in the response)."""
    if isinstance(error, TorporError):
        code = _TRITON_CODE.get(error.status, pb_utils.TritonError.INTERNAL)
        triton = pb_utils.TritonError(error.message, code)
    elif isinstance(error, (asyncio.CancelledError, concurrent.futures.CancelledError)):
        triton = pb_utils.TritonError("the BLS request was cancelled", pb_utils.TritonError.CANCELLED)
    else:
        triton = pb_utils.TritonError(f"{type(error).__name__}: {error}", pb_utils.TritonError.INTERNAL)
    return pb_utils.InferenceResponse(error=triton)


def pb_response(response: InferResponse) -> pb_utils.InferenceResponse:
    if response.error is not None:
        return error_response(response.error)
    tensors = [pb_utils.Tensor(t.name, t.data) for t in response.outputs]
    return pb_utils.InferenceResponse(tensors, parameters=response.parameters)


def infer_request(request: pb_utils.InferenceRequest) -> InferRequest:
    """The engine's request for a BLS request."""
    inputs = []
    for t in request.inputs():
        array = python_backend.output_array(t)  # BYTES: an object array of bytes
        view = array.view()
        view.flags.writeable = False  # the callee copies before writing; the caller's array stays
        inputs.append(Tensor(t.name(), pb_utils.code_to_datatype(t.triton_dtype()), tuple(view.shape), view))
    parameters = dict(request._parameters)
    correlation_id = request.correlation_id()
    if correlation_id not in (0, "", None):
        parameters["sequence_id"] = correlation_id
    flags = request.flags()
    if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START:
        parameters["sequence_start"] = True
    if flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END:
        parameters["sequence_end"] = True
    version = request.model_version()
    try:
        version = "" if version is None or int(version) < 0 else str(int(version))
    except (TypeError, ValueError):
        version = str(version)
    names = request.requested_output_names()
    return InferRequest(
        model_name=request.model_name(),
        model_version=version,
        id=request.request_id() or "",
        inputs=inputs,
        outputs=[RequestedOutput(n) for n in names] if names else None,
        parameters=parameters,
    )


def _timeout_s(request: pb_utils.InferenceRequest) -> float | None:
    us = request.timeout()
    return us / 1e6 if us and us > 0 else None


def _timeout_response() -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError("Request timeout expired", pb_utils.TritonError.UNAVAILABLE)
    )


class BlsBridge:
    """The handler `pb_utils.InferenceRequest.exec` / `async_exec` call (see the module doc)."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.loop = loop

    # keeping BLS callers off the event loop -------------------------------------------------
    def keep_off_loop(self, function) -> None:
        """Never again execute `function` inline on the loop (see torpor.registry.model_entry.InlineGate)."""
        function.blocking = True

    def _on_loop_thread(self) -> bool:
        return asyncio._get_running_loop() is self.loop

    def _enter(self, what: str) -> None:
        """Checks made on the calling thread before a blocking BLS call."""
        caller = getattr(python_backend.running, "function", None)
        if caller is not None:
            self.keep_off_loop(caller)
        if self._on_loop_thread():
            raise pb_utils.TritonModelException(
                f"{what} was called on the server's event loop thread, where it would wait on "
                "itself: the calling model ran inline on the loop; it runs on a worker thread "
                "from its next request on"
            )

    # engine side (coroutines on the loop) ---------------------------------------------------
    async def _infer(self, request: InferRequest) -> InferResponse:
        if self.engine.is_decoupled(request.model_name, request.model_version):
            raise unsupported(
                f"model '{request.model_name}' uses the decoupled transaction policy: call "
                "exec(decoupled=True) / async_exec(decoupled=True)"
            )
        return await self.engine.infer(request)

    def _submit(self, coroutine) -> concurrent.futures.Future:
        try:
            return asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop is closed: the server is gone
            coroutine.close()
            raise TorporError(Status.UNAVAILABLE, "the server is shutting down") from None

    # exec / async_exec ----------------------------------------------------------------------
    def exec(self, request: pb_utils.InferenceRequest, decoupled: bool = False):
        self._enter("InferenceRequest.exec()")
        if decoupled:
            return ResponseIterator(self, request)
        try:
            future = self._submit(self._infer(infer_request(request)))
        except Exception as e:  # noqa: BLE001 - a BLS failure is the response's error
            return error_response(e)
        try:
            return pb_response(future.result(_timeout_s(request)))
        except TimeoutError:
            future.cancel()
            return _timeout_response()
        except Exception as e:  # noqa: BLE001 - the callee's failure, cancellation included
            return error_response(e)

    async def async_exec(self, request: pb_utils.InferenceRequest, decoupled: bool = False):
        caller = getattr(python_backend.running, "function", None)
        if caller is not None:
            self.keep_off_loop(caller)
        if decoupled:
            # The iterator is consumed synchronously (as Triton's is); it is never made on the
            # engine's loop, where its blocking next() could not be served.
            if self._on_loop_thread():
                raise pb_utils.TritonModelException(
                    "async_exec(decoupled=True) cannot be used on the server's event loop thread"
                )
            return ResponseIterator(self, request)
        timeout = _timeout_s(request)
        try:
            coroutine = self._infer(infer_request(request))
            if self._on_loop_thread():
                task = asyncio.ensure_future(coroutine)
            else:
                task = asyncio.wrap_future(self._submit(coroutine))
            return pb_response(await asyncio.wait_for(task, timeout))
        except TimeoutError:
            return _timeout_response()
        except Exception as e:  # noqa: BLE001 - a BLS failure is the response's error
            return error_response(e)


class ResponseIterator:
    """The responses of a `decoupled=True` BLS request, as they arrive."""

    def __init__(self, bridge: BlsBridge, request: pb_utils.InferenceRequest):
        self._bridge = bridge
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done = False
        timeout = _timeout_s(request)
        self._deadline = time.monotonic() + timeout if timeout is not None else None
        self._future: concurrent.futures.Future | None = None
        try:
            self._future = bridge._submit(self._pump(infer_request(request)))
        except Exception as e:  # noqa: BLE001
            self._queue.put(e)
            self._queue.put(_END)

    async def _pump(self, request: InferRequest) -> None:
        put = self._queue.put
        try:
            async for response in self._bridge.engine.infer_stream(request):
                put(response)
        except BaseException as e:
            put(e)
            if not isinstance(e, (Exception, asyncio.CancelledError)):
                raise
        finally:
            put(_END)

    def __iter__(self) -> ResponseIterator:
        return self

    def __next__(self) -> pb_utils.InferenceResponse:
        if self._done:
            raise StopIteration
        if self._bridge._on_loop_thread():
            raise pb_utils.TritonModelException(
                "a BLS response iterator cannot be read on the server's event loop thread"
            )
        wait = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)
        try:
            item = self._queue.get(timeout=wait)
        except queue.Empty:
            self.cancel()
            self._done = True
            return _timeout_response()
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            return error_response(item)
        return pb_response(item)

    def cancel(self) -> None:
        """Stop waiting for the called model's responses (its request is cancelled)."""
        if self._future is not None:
            self._future.cancel()
