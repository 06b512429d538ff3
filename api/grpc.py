"""KServe v2 / Triton gRPC front end: `inference.GRPCInferenceService` on grpc.aio.

Built from the stubs tritonclient ships (`tritonclient.grpc.service_pb2_grpc`), served on the
same event loop as HTTP and sharing its Engine. A translation layer only: the engine holds the
semantics; this file maps messages and status codes the way Triton's gRPC server does.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from typing import Any

import grpc
from google.protobuf import json_format
from torpor.api.access import Restriction
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from torpor.dataplane.engine import Engine
from torpor.errors import Status, TorporError, internal, invalid_arg, unsupported

from . import forward
from .grpc_codec import FINAL_PARAM, check_version, decode_request, encode_response

log = logging.getLogger("torpor.grpc")

GRPC_STATUS = {
    Status.INVALID_ARG: grpc.StatusCode.INVALID_ARGUMENT,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
    Status.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    Status.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Status.UNKNOWN: grpc.StatusCode.UNKNOWN,
    Status.CANCELLED: grpc.StatusCode.CANCELLED,
}

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # tritonclient pings keepalive-style with max_pings_without_data=2; do not punish it
    ("grpc.http2.min_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # gRPC binds with SO_REUSEPORT by default: a second server on a port in use would start and
    # the kernel would split new connections between the two. Triton refuses unless
    # --reuse-grpc-port; so do we.
    ("grpc.so_reuseport", 0),
]


# Triton's restricted-protocol group of each RPC (--grpc-restricted-protocol)
METHOD_GROUP = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}


async def _check_restricted(servicer: InferenceServicer, method: str, context) -> None:
    rule = servicer.restricted.get(METHOD_GROUP[method]) if servicer.restricted else None
    if rule is None:
        return
    presented = next((v for k, v in (context.invocation_metadata() or ()) if k == rule.header), None)
    if not rule.allows(presented if isinstance(presented, str) else None):
        # Triton answers UNAVAILABLE with this text (grpc_handler / infer_handler), not PERMISSION_DENIED
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"This protocol is restricted, expecting header '{rule.header}'")


def _unary(fn):
    """Turn a TorporError (or any other failure) into a gRPC status, as Triton does."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        if self.restricted:
            await _check_restricted(self, name, context)
        try:
            return await fn(self, request, context)
        except TorporError as e:
            await context.abort(GRPC_STATUS.get(e.status, grpc.StatusCode.UNKNOWN), e.message)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            log.exception("gRPC %s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


def _check_repository_name(name: str) -> None:
    if name:
        raise unsupported("'repository_name' specification is not supported")


class InferenceServicer(pbg.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, restricted: dict[str, Restriction] | None = None):
        self.engine = engine
        self.restricted = restricted or {}

    # -- health and metadata -----------------------------------------------------------------
    @_unary
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.engine.is_live())

    @_unary
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.engine.is_ready())

    @_unary
    async def ModelReady(self, request, context):
        # unknown or unloaded models are "not ready", never an error
        return pb.ModelReadyResponse(ready=self.engine.model_ready(request.name, request.version))

    @_unary
    async def ServerMetadata(self, request, context):
        md = self.engine.server_metadata()
        return pb.ServerMetadataResponse(name=md["name"], version=md["version"], extensions=md["extensions"])

    @_unary
    async def ModelMetadata(self, request, context):
        md = self.engine.model_metadata(request.name, check_version(request.version))
        resp = pb.ModelMetadataResponse(name=md["name"], versions=md["versions"], platform=md["platform"])
        for t in md["inputs"]:
            resp.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        for t in md["outputs"]:
            resp.outputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    @_unary
    async def ModelConfig(self, request, context):
        resp = pb.ModelConfigResponse()
        resp.config.CopyFrom(self.engine.model_config(request.name, check_version(request.version)))
        return resp

    @_unary
    async def ModelStatistics(self, request, context):
        stats = self.engine.statistics(request.name, check_version(request.version))
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)

    # -- inference ---------------------------------------------------------------------------
    @_unary
    async def ModelInfer(self, request, context):
        metadata = context.invocation_metadata()
        # a call a peer forwarded (never forwarded again): it is told how long it took here
        from_peer = time.perf_counter() if forward.marked_grpc(metadata) else 0.0
        forwarder = forward.active(self.engine)
        if forwarder is not None:  # --peers: the peer's answer where the forward-once rule sends it there
            answer = await forwarder.grpc(request, metadata)
            if answer is not None:
                if answer.response is None:
                    await context.abort(answer.code, answer.details)
                return answer.response
        trace = self.engine.trace_request(request.model_name, "GRPC", metadata)
        req, _ = _decode(request)
        resp = await self.engine.infer(req, trace)
        out = encode_response(resp)
        if from_peer:
            context.set_trailing_metadata((forward.stamp_forwarded(self.engine, "grpc", from_peer),))
        if trace is not None:
            # gRPC writes the answer after the handler returns: the call's end is the send's
            trace.stamp("GRPC_SEND_START")
            context.add_done_callback(lambda _call: trace.end("GRPC_SEND_END"))
        return out

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests are processed concurrently as they arrive (requests of one sequence in
        order); each yields 0..n responses. Per-request failures travel as `error_message`
        and never end the stream."""
        await _check_restricted(self, "ModelStreamInfer", context)
        engine = self.engine
        out: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        sequence_tail: dict[tuple[str, Any], asyncio.Task] = {}

        async def handle(msg: pb.ModelInferRequest, after: asyncio.Task | None) -> None:
            if after is not None:
                await asyncio.wait([after])
            trace = engine.trace_request(msg.model_name, "GRPC", context.invocation_metadata)
            try:
                req, empty_final = _decode(msg)
                async for resp in engine.infer_stream(req, trace):
                    if resp.error is not None:
                        err = resp.error
                        text = err.message if isinstance(err, TorporError) else str(err)
                        out.put_nowait(_stream_error(msg, text))
                        continue
                    if not resp.outputs and resp.final and not empty_final:
                        continue  # an empty final response is sent only when the client asked for it
                    m = pb.ModelStreamInferResponse()
                    encode_response(resp, m.infer_response)
                    m.infer_response.parameters[FINAL_PARAM].bool_param = bool(resp.final)
                    out.put_nowait(m)
                if trace is not None:  # the stream writes it later, among other requests' answers
                    trace.stamp("GRPC_SEND_START")
                    trace.end()
            except TorporError as e:
                out.put_nowait(_stream_error(msg, e.message))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.exception("stream request failed")
                out.put_nowait(_stream_error(msg, f"{type(e).__name__}: {e}"))

        async def reader() -> None:
            async for msg in request_iterator:
                after = None
                key = None
                seq = msg.parameters.get("sequence_id") if msg.parameters else None
                if seq is not None:
                    which = seq.WhichOneof("parameter_choice")
                    if which is not None:
                        key = (msg.model_name, getattr(seq, which))
                        prev = sequence_tail.get(key)
                        after = prev if prev is not None and not prev.done() else None
                task = asyncio.create_task(handle(msg, after))
                tasks.add(task)
                task.add_done_callback(_done(tasks, out))
                if key is not None:
                    sequence_tail[key] = task
                    task.add_done_callback(lambda t, k=key: sequence_tail.get(k) is t and sequence_tail.pop(k))

        read_task = asyncio.create_task(reader())
        read_task.add_done_callback(lambda _t: out.put_nowait(_WAKE))
        try:
            while True:
                item = await out.get()
                if item is _WAKE:
                    if read_task.done() and not tasks:
                        # every request is finished: what is still queued is all there is
                        while not out.empty():
                            item = out.get_nowait()
                            if item is not _WAKE:
                                yield item
                        break
                    continue
                yield item
            if read_task.exception() is not None:
                exc = read_task.exception()
                if not isinstance(exc, asyncio.CancelledError):
                    raise exc
        finally:
            read_task.cancel()
            for t in list(tasks):
                t.cancel()

    # -- repository --------------------------------------------------------------------------
    @_unary
    async def RepositoryIndex(self, request, context):
        resp = pb.RepositoryIndexResponse()
        for item in self.engine.repository_index(ready_only=request.ready):
            resp.models.add(
                name=item["name"],
                version=item.get("version", ""),
                state=item.get("state", ""),
                reason=item.get("reason", ""),
            )
        return resp

    @_unary
    async def RepositoryModelLoad(self, request, context):
        _check_repository_name(request.repository_name)
        config = None
        files: dict[str, bytes] = {}
        for key, p in request.parameters.items():
            which = p.WhichOneof("parameter_choice")
            if key == "config":
                if which != "string_param":
                    raise invalid_arg("load parameter 'config' must be a string")
                config = p.string_param
            elif key.startswith("file:"):
                if which != "bytes_param":
                    raise invalid_arg(f"load parameter '{key}' must be bytes")
                files[key[5:]] = p.bytes_param
        await self.engine.load(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request, context):
        _check_repository_name(request.repository_name)
        dependents = False
        p = request.parameters.get("unload_dependents")
        if p is not None and p.WhichOneof("parameter_choice") == "bool_param":
            dependents = p.bool_param
        await self.engine.unload(request.model_name, dependents)
        return pb.RepositoryModelUnloadResponse()

    # -- system shared memory ----------------------------------------------------------------
    @_unary
    async def SystemSharedMemoryStatus(self, request, context):
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self.engine.shm_status("system", request.name):
            s = resp.regions[r["name"]]
            s.name, s.key, s.offset, s.byte_size = r["name"], r["key"], r["offset"], r["byte_size"]
        return resp

    @_unary
    async def SystemSharedMemoryRegister(self, request, context):
        self.engine.shm_register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @_unary
    async def SystemSharedMemoryUnregister(self, request, context):
        self.engine.shm_unregister("system", request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    # -- CUDA shared memory ------------------------------------------------------------------
    @_unary
    async def CudaSharedMemoryStatus(self, request, context):
        resp = pb.CudaSharedMemoryStatusResponse()
        for r in self.engine.shm_status("cuda", request.name):
            s = resp.regions[r["name"]]
            s.name, s.device_id, s.byte_size = r["name"], r["device_id"], r["byte_size"]
        return resp

    @_unary
    async def CudaSharedMemoryRegister(self, request, context):
        self.engine.shm_register_cuda(request.name, bytes(request.raw_handle), request.device_id, request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @_unary
    async def CudaSharedMemoryUnregister(self, request, context):
        self.engine.shm_unregister("cuda", request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    # -- trace and logging -------------------------------------------------------------------
    @_unary
    async def TraceSetting(self, request, context):
        model = request.model_name
        if model and not self.engine.has_model(model):
            raise TorporError(Status.NOT_FOUND, f"Request for unknown model: '{model}' is not found")
        changes = None
        if request.settings:
            changes = {k: (list(v.value) if len(v.value) else None) for k, v in request.settings.items()}
        current = self.engine.trace_settings(model, changes)
        resp = pb.TraceSettingResponse()
        for k, v in current.items():
            resp.settings[k].value.extend(v if isinstance(v, list) else [str(v)])
        return resp

    @_unary
    async def LogSettings(self, request, context):
        changes = None
        if request.settings:
            changes = {}
            for k, v in request.settings.items():
                which = v.WhichOneof("parameter_choice")
                if which is not None:
                    changes[k] = getattr(v, which)
        current = self.engine.log_settings(changes)
        resp = pb.LogSettingsResponse()
        for k, v in current.items():
            s = resp.settings[k]
            if isinstance(v, bool):
                s.bool_param = v
            elif isinstance(v, int):
                s.uint32_param = v
            else:
                s.string_param = str(v)
        return resp


_WAKE = object()


def _decode(msg: pb.ModelInferRequest):
    try:
        return decode_request(msg)
    except TorporError:
        raise
    except Exception as e:
        log.exception("decoding an infer request failed")
        raise invalid_arg(f"malformed inference request: {type(e).__name__}: {e}") from None


def _done(tasks: set, out: asyncio.Queue):
    def cb(task: asyncio.Task) -> None:
        tasks.discard(task)
        out.put_nowait(_WAKE)

    return cb


def _stream_error(msg: pb.ModelInferRequest, text: str) -> pb.ModelStreamInferResponse:
    m = pb.ModelStreamInferResponse(error_message=text)
    m.infer_response.id = msg.id
    m.infer_response.model_name = msg.model_name
    m.infer_response.model_version = msg.model_version
    return m


def pick_host(host: str = "auto") -> str:
    """"auto": the threaded host where this process may run on one CPU only, else grpc.aio.
    Measured (docs/measurements.md, "gRPC host"): pinned to one core the threaded host costs
    less CPU per call and serves more; given two cores its handler threads and the loop contend
    for the GIL across cores and it serves about half of what grpc.aio does at 8 or more calls
    in flight."""
    if host != "auto":
        return host
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return "threads" if cpus <= 1 else "aio"


def pin_front_end() -> str:
    """Keep the calling thread (the engine's event loop) and grpc.aio's completion-queue poller
    thread on the one CPU the loop runs on now; returns what was done, for the log.

    Why: every grpc.aio call is handed from the poller thread to the loop and back. On two cores
    each hand-off that crosses cores costs a wake-up; measured on the 2-core development machine
    (docs/measurements.md, "gRPC host and perf_analyzer") a call at c=1 took 432-455 us unpinned
    and 254-274 us with the two threads on one CPU, at 10-15% fewer req/s at c=8 (they then
    share that CPU). Off by default (`--pin-front-end`). The poller is found by grpc's thread
    name (`_poll_wrapper`); if a grpc release renames it, nothing is pinned."""
    import threading

    if not hasattr(os, "sched_setaffinity"):
        return "thread affinity is not available on this system: nothing pinned"
    if len(os.sched_getaffinity(0)) <= 1:
        return "one CPU already: nothing to pin"
    pollers = [t.native_id for t in threading.enumerate() if "_poll_wrapper" in t.name and t.native_id]
    if not pollers:
        return "grpc.aio's poller thread not found: nothing pinned"
    with open("/proc/thread-self/stat") as f:  # field 39, the CPU this thread last ran on
        cpu = int(f.read().rpartition(")")[2].split()[36])
    for tid in (threading.get_native_id(), *pollers):
        os.sched_setaffinity(tid, {cpu})
    return f"event loop and gRPC poller pinned to CPU {cpu}"


async def start_grpc_server(engine: Engine, address: str, port: int,
                            restricted: dict[str, Restriction] | None = None,
                            max_message_size: int = -1, host: str = "auto", threads: int = 128,
                            reuse_port: bool = False):
    """Start the gRPC listener for the running loop's engine; returns the started server (an
    object with `async stop(grace)`). `host`: "threads", grpc's threaded server bridged to the
    loop (torpor.api.grpc_threads), "aio", grpc.aio on the loop itself, or "auto" (`pick_host`);
    the same servicer either way. A message over `max_message_size` bytes (-1: gRPC's own ceiling,
    2 GiB) is refused by gRPC itself with RESOURCE_EXHAUSTED before any of it is decoded."""
    options = dict(SERVER_OPTIONS)
    options["grpc.max_receive_message_length"] = max_message_size
    options["grpc.max_send_message_length"] = max_message_size
    options["grpc.so_reuseport"] = int(reuse_port)
    servicer = InferenceServicer(engine, restricted)
    bind = f"[{address}]:{port}" if ":" in address and not address.startswith("[") else f"{address}:{port}"
    if pick_host(host) == "threads":
        from .grpc_threads import start_threaded_server

        server = start_threaded_server(servicer, list(options.items()), bind, threads)
        if server is None:
            raise internal(f"failed to bind the gRPC listener to {address}:{port} (in use? --reuse-grpc-port)")
        return server
    server = grpc.aio.server(options=list(options.items()))
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(bind)
    except RuntimeError:  # newer grpc raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise internal(f"failed to bind the gRPC listener to {address}:{port} (in use? --reuse-grpc-port)")
    await server.start()
    return server


__all__ = ["GRPC_STATUS", "SERVER_OPTIONS", "InferenceServicer", "pick_host", "pin_front_end", "start_grpc_server"]
