"""Triton Python backend: `backend: "python"` with `<version>/model.py` defining `TritonPythonModel`.

The model file is `<version>/model.py` (or `default_model_filename`). It is loaded by path
under a private package name, so `from .helper import x` finds files beside it; the version
folder is also appended to `sys.path`, as Triton's stub does, so `import helper` works too
(models sharing the process should not rely on identically named helper modules).

One `TritonPythonModel` object is created per instance of the config's `instance_group`
(counts summed, at least one); `initialize(args)` gets Triton's args (all strings):
`model_config` (the config as Triton's JSON), `model_name`, `model_version`,
`model_repository` (the model's folder), `model_instance_kind` ("CPU"),
`model_instance_name` (`<model>_<group>_<index>`), `model_instance_device_id` ("0").
Before that, as in Triton, an optional static `auto_complete_config(pb_utils.ModelConfig)` gets
the config (the config.pbtxt's, or a bare one when the folder has none) and returns it completed:
the max_batch_size, inputs, outputs, dynamic batching and transaction policy it sets become the
model's config (the index, `initialize`'s `model_config` and request validation use it); what
contradicts the config.pbtxt fails the load with Triton's message. `torpor serve
--strict-model-config true` (Triton's `--disable-auto-complete-config`) skips it:
`auto_complete_enabled`. Either way Triton's load-time defaults are then filled in
(`torpor.config.normalize_config`: instance groups named and counted, the version policy, ...).

Non-decoupled: `execute(requests)` returns one `InferenceResponse` per request (or None, after
sending each request's single response through its response sender). A raised exception fails
every request of that call. Decoupled (`model_transaction_policy { decoupled: true }`):
`execute` returns None and responses go through `request.get_response_sender().send(...)`,
from any thread and after `execute` has returned; the last one carries
`TRITONSERVER_RESPONSE_COMPLETE_FINAL`. If the sender is dropped without it, the final flag is
sent for the model. `execute_decoupled` returns when the model's `execute` does, and the
instance is then free for the next request while the responses keep coming.

`async def execute` of a non-decoupled model is run to completion on an event loop of the worker
thread's own (one per thread), so `await request.async_exec()` works. A decoupled model's
coroutine is started on its instance's own event loop (a thread per instance that has one) and
left running, as Triton does: the instance takes its next request while earlier ones await. If
such a coroutine raises, its request fails with the error (Triton only logs it; the request
never completes there). BLS (`pb_utils.InferenceRequest(...).exec()`) goes through the engine:
see `torpor.adapters.bls`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import json
import logging
import queue
import re
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from torpor.config import ModelConfig, config_to_dict, normalize_config
from torpor.errors import Status, TorporError, internal
from torpor.model import Emit, ModelFunction, ModelRequest

from . import triton_python_backend_utils as pb_utils

# Models do `import triton_python_backend_utils as pb_utils`.
sys.modules.setdefault("triton_python_backend_utils", pb_utils)

_log = logging.getLogger("torpor.python_backend")

_ERROR_STATUS = {
    pb_utils.TritonError.UNKNOWN: Status.UNKNOWN,
    pb_utils.TritonError.INTERNAL: Status.INTERNAL,
    pb_utils.TritonError.NOT_FOUND: Status.NOT_FOUND,
    pb_utils.TritonError.INVALID_ARG: Status.INVALID_ARG,
    pb_utils.TritonError.UNAVAILABLE: Status.UNAVAILABLE,
    pb_utils.TritonError.UNSUPPORTED: Status.UNSUPPORTED,
    pb_utils.TritonError.ALREADY_EXISTS: Status.ALREADY_EXISTS,
    pb_utils.TritonError.CANCELLED: Status.CANCELLED,
}

_sys_path_lock = threading.Lock()

# Per thread: `function`, the PythonModelFunction whose model is executing on this thread (BLS
# finds its caller by it); `loop`, the event loop that runs `async def execute` on this thread.
running = threading.local()
running.function = None

# Whether `auto_complete_config` runs (False: --strict-model-config true, as Triton's
# --disable-auto-complete-config); `torpor serve` sets it.
auto_complete_enabled = True

# What a model's auto_complete_config may set, as Triton takes it from the completed config.
_AUTO_COMPLETE_FIELDS = ("max_batch_size", "input", "output", "dynamic_batching", "model_transaction_policy")

# Called with a PythonModelFunction whose model must not execute on the server's event loop
# thread (it awaits, or calls BLS); `torpor.adapters.bls.install_bls` sets it.
off_loop_hook: Callable[[ModelFunction], None] | None = None


def custom_metric_families() -> list:
    """The python models' custom metrics (`pb_utils.MetricFamily`) as prometheus_client metric
    families, for the metrics listener (`MetricsCollector.add_source`)."""
    from prometheus_client.core import Metric

    families = []
    for name, description, kind, samples in pb_utils._metric_families():
        family = Metric(name, description, kind)
        for sample_name, labels, value in samples:
            family.add_sample(sample_name, labels, value)
        families.append(family)
    return families


def torpor_error(error: pb_utils.TritonError) -> TorporError:
    return TorporError(_ERROR_STATUS.get(error.code(), Status.INTERNAL), error.message())


def output_array(tensor: pb_utils.Tensor) -> np.ndarray:
    """A response tensor as the engine takes it (BYTES: an object array of bytes)."""
    array = tensor.as_numpy()
    if tensor.triton_dtype() != pb_utils.TYPE_STRING:
        return array
    if array.dtype == np.object_ and all(isinstance(x, bytes) for x in array.flat):
        return array
    out = np.empty(array.shape, dtype=np.object_)
    flat = out.reshape(-1)
    for i, x in enumerate(array.flat):
        if isinstance(x, bytes):
            flat[i] = x
        elif isinstance(x, (bytearray, memoryview, np.bytes_)):
            flat[i] = bytes(x)
        else:
            flat[i] = str(x).encode("utf-8")
    return out


class _Collected:
    """The single response of a non-decoupled request sent through its response sender."""

    __slots__ = ("done", "response")

    def __init__(self):
        self.response: pb_utils.InferenceResponse | None = None
        self.done = threading.Event()

    def deliver(self, response: pb_utils.InferenceResponse | None, flags: int) -> None:
        if response is not None and self.response is None:
            self.response = response
        if flags & pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.done.set()


def _collecting_sender() -> pb_utils.InferenceResponseSender:
    """A non-decoupled request's sender, made only when the model asks for it (or returns
    None): most models return their responses and never need one."""
    collected = _Collected()
    sender = pb_utils.InferenceResponseSender(pb_utils._SendState(collected.deliver))
    sender._collected = collected
    return sender


# How long unloading a decoupled model waits for its `async def execute` coroutines still
# running; those left are cancelled (their requests fail).
UNLOAD_WAIT_S = 30.0


class _InstanceLoop:
    """The event loop, on a thread of its own, that a decoupled model instance's `async def
    execute` coroutines share, as in Triton's python backend: `execute` returns at once, the
    instance takes its next request while earlier ones await, responses go through the senders."""

    def __init__(self, instance_name: str):
        self.loop = asyncio.new_event_loop()
        self.pending: set[concurrent.futures.Future] = set()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"torpor-async-{instance_name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coroutine, on_done: Callable[[concurrent.futures.Future], None]) -> None:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        with self._lock:
            self.pending.add(future)

        def done(f: concurrent.futures.Future) -> None:
            with self._lock:
                self.pending.discard(f)
            on_done(f)

        future.add_done_callback(done)

    def close(self, wait_s: float) -> None:
        with self._lock:
            pending = list(self.pending)
        if pending:
            _, not_done = concurrent.futures.wait(pending, timeout=wait_s)
            for f in not_done:
                f.cancel()
            if not_done:
                concurrent.futures.wait(not_done, timeout=5.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)
        if not self.thread.is_alive():
            self.loop.close()


class PythonModelFunction(ModelFunction):
    platform = ""
    backend = "python"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoupled = bool(self.config.model_transaction_policy.decoupled)
        self._output_names = [o.name for o in self.config.output]
        self._instances: list[tuple[str, Any]] = []
        self._pool: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._module_name: str | None = None
        self._loops: dict[str, _InstanceLoop] = {}  # decoupled async execute, per instance
        self._loops_lock = threading.Lock()

    # lifecycle ---------------------------------------------------------------------------------
    @property
    def model_file(self) -> Path:
        return self.version_path / (self.config.default_model_filename or "model.py")

    def load(self) -> None:
        cls = self._load_model_class()
        try:
            self._auto_complete(cls)
        except BaseException:
            self._forget_module()
            raise
        base_args = {
            "model_config": json.dumps(config_to_dict(self.config)),
            "model_name": self.name,
            "model_version": str(self.version),
            "model_repository": str(self.model_path),
            "model_instance_kind": "CPU",
            "model_instance_device_id": "0",
        }
        try:
            for group_index, count in enumerate(self._instance_counts()):
                for index in range(count):
                    instance_name = f"{self.name}_{group_index}_{index}"
                    model = cls()
                    if hasattr(model, "initialize"):
                        model.initialize(dict(base_args, model_instance_name=instance_name))
                    self._instances.append((instance_name, model))
        except Exception as e:
            self._finalize_all()
            self._forget_module()
            raise RuntimeError(f"{type(e).__name__}: {e}") from e
        for entry in self._instances:
            self._pool.put(entry)

    def unload(self) -> None:
        # Take every instance back first, so no execute is still running in one.
        for _ in range(len(self._instances)):
            self._pool.get()
        with self._loops_lock:
            loops, self._loops = list(self._loops.values()), {}
        for loop in loops:  # let decoupled coroutines still running finish (bounded)
            loop.close(UNLOAD_WAIT_S)
        self._finalize_all()
        self._forget_module()

    def _finalize_all(self) -> None:
        for instance_name, model in self._instances:
            if hasattr(model, "finalize"):
                try:
                    model.finalize()
                except Exception:  # noqa: BLE001 - a model's finalize must not stop the unload
                    _log.exception("finalize() of %s failed", instance_name)
        self._instances = []

    def _instance_counts(self) -> list[int]:
        counts = [max(int(g.count), 1) for g in self.config.instance_group]
        return counts or [1]

    def _load_model_class(self):
        path = self.model_file
        if not path.is_file():
            raise FileNotFoundError(f"model '{self.name}' version {self.version}: {path} not found")
        folder = str(self.version_path.resolve())
        with _sys_path_lock:
            if folder not in sys.path:
                sys.path.append(folder)
        package = re.sub(r"\W", "_", f"torpor_python_model_{self.name}_{self.version}")
        pkg = types.ModuleType(package)
        pkg.__path__ = [folder]  # relative imports inside model.py resolve beside it
        sys.modules[package] = pkg
        module_name = f"{package}.{path.stem}"
        self._module_name = package
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            self._forget_module()
            raise
        cls = getattr(module, "TritonPythonModel", None)
        if cls is None:
            self._forget_module()
            raise AttributeError(f"{path} does not define class TritonPythonModel")
        return cls

    def _forget_module(self) -> None:
        if self._module_name:
            prefix = self._module_name
            for key in [k for k in sys.modules if k == prefix or k.startswith(prefix + ".")]:
                del sys.modules[key]
            self._module_name = None

    def _auto_complete(self, cls) -> None:
        """Run the model's `auto_complete_config` and take what it completed (see the module doc)."""
        config = ModelConfig()
        config.CopyFrom(self.config)  # versions share the registry's config object: never edit it
        if not config.platform and not config.backend:
            config.backend = "python"
        hook = getattr(cls, "auto_complete_config", None)
        if hook is not None and auto_complete_enabled:
            helper = pb_utils.ModelConfig(config_to_dict(config))
            result = hook(helper)
            if not isinstance(result, pb_utils.ModelConfig):
                raise TorporError(
                    Status.INTERNAL,
                    f"auto_complete_config function in model '{self.name}' must return a valid "
                    "pb.ModelConfig object.",
                )
            completed = result.as_dict()
            wanted = {k: completed[k] for k in _AUTO_COMPLETE_FIELDS if completed.get(k) is not None}
            try:
                filled = json_format.ParseDict(wanted, ModelConfig())
            except (json_format.ParseError, TypeError, ValueError) as e:
                raise TorporError(
                    Status.INVALID_ARG, f"auto_complete_config of model '{self.name}' made an invalid config: {e}"
                ) from None
            config.max_batch_size = filled.max_batch_size
            del config.input[:]
            config.input.extend(filled.input)
            del config.output[:]
            config.output.extend(filled.output)
            if filled.HasField("dynamic_batching"):
                config.dynamic_batching.CopyFrom(filled.dynamic_batching)
            if filled.HasField("model_transaction_policy"):
                config.model_transaction_policy.CopyFrom(filled.model_transaction_policy)
        # Triton's defaults after the model's own completion, so that `initialize` gets the
        # model_config Triton would pass (named instance groups with counts, version policy, ...)
        self.config = normalize_config(config)
        self.decoupled = bool(config.model_transaction_policy.decoupled)
        self._output_names = [o.name for o in config.output]

    # execution ---------------------------------------------------------------------------------
    def _pb_request(self, request: ModelRequest, make_sender) -> pb_utils.InferenceRequest:
        inputs = []
        for name, array in request.inputs.items():
            if not array.flags.writeable:  # views of a request body: models may write into inputs
                array = array.copy()
            inputs.append(pb_utils.Tensor._wrap(name, array))
        return pb_utils.InferenceRequest._incoming(
            self.name,
            self.version,
            list(request.requested_outputs or self._output_names),
            inputs,
            request.id,
            request.correlation_id,
            request.flags,
            request.parameters if request.parameters is not None else {},
            make_sender,
        )

    def _convert(self, response: Any, requested: list[str]) -> dict[str, Any] | Exception:
        if not isinstance(response, pb_utils.InferenceResponse):
            return internal(
                f"model '{self.name}' returned {type(response).__name__} instead of an InferenceResponse"
            )
        if response.has_error():
            return torpor_error(response.error())
        outputs = {}
        for tensor in response.output_tensors():
            if requested and tensor.name() not in requested:
                continue
            outputs[tensor.name()] = output_array(tensor)
        return outputs

    def _failure(self, instance_name: str, e: BaseException) -> TorporError:
        if isinstance(e, TorporError):
            return e
        return internal(
            f"Failed to process the request(s) for model instance '{instance_name}', "
            f"message: {type(e).__name__}: {e}"
        )

    def _call(self, model, pb_requests: list[pb_utils.InferenceRequest], instance_name: str = "",
              on_done: Callable[[concurrent.futures.Future], None] | None = None):
        """`model.execute(pb_requests)`; `running.function` names the caller for BLS. A coroutine
        (`async def execute`) is awaited on this thread's own event loop, or, given `on_done`
        (decoupled models), started on the instance's loop and left running: None is returned
        at once and `on_done(future)` is called when it ends."""
        running.function = self
        try:
            returned = model.execute(pb_requests)
            if type(returned) is types.CoroutineType:
                if on_done is not None:
                    self._instance_loop(instance_name).submit(returned, on_done)
                    return None
                returned = self._await(returned)
            return returned
        finally:
            running.function = None

    def _instance_loop(self, instance_name: str) -> _InstanceLoop:
        with self._loops_lock:
            loop = self._loops.get(instance_name)
            if loop is None:
                loop = self._loops[instance_name] = _InstanceLoop(instance_name)
            return loop

    def _await(self, coroutine):
        if off_loop_hook is not None:
            off_loop_hook(self)
        if asyncio._get_running_loop() is not None:
            coroutine.close()
            raise RuntimeError(
                f"the async execute of model '{self.name}' cannot run on the server's event loop "
                "thread; later requests run on a worker thread"
            )
        loop = getattr(running, "loop", None)
        if loop is None:
            loop = running.loop = asyncio.new_event_loop()
        return loop.run_until_complete(coroutine)

    def execute(self, requests: list[ModelRequest]) -> list[dict[str, Any] | Exception]:
        pb_requests = [self._pb_request(r, _collecting_sender) for r in requests]
        instance_name, model = self._pool.get()
        try:
            responses = self._call(model, pb_requests)
        except Exception as e:  # noqa: BLE001 - whatever the model raises fails its requests
            return [self._failure(instance_name, e)] * len(requests)
        finally:
            self._pool.put((instance_name, model))
        wanted = [r.requested_outputs for r in requests]
        if responses is None:
            # Responses went (or will go) through the senders; a sender dropped without its
            # final flag completes the request (with no response). Senders the model has not
            # asked for yet are made now: it may still ask, from a request it kept.
            collected = [p.get_response_sender()._collected for p in pb_requests]
            del pb_requests
            results: list[dict[str, Any] | Exception] = []
            for c, names in zip(collected, wanted, strict=True):
                c.done.wait()
                if c.response is None:
                    results.append(internal(f"model '{self.name}' sent no response for the request"))
                else:
                    results.append(self._convert(c.response, names))
            return results
        try:
            responses = list(responses)
        except TypeError:
            responses = [responses]
        if len(responses) != len(requests):
            err = internal(
                f"Number of InferenceResponse objects do not match the number of InferenceRequest "
                f"objects. InferenceRequest(s) size is:{len(requests)}, and InferenceResponse(s) "
                f"size is:{len(responses)}"
            )
            return [err] * len(requests)
        return [self._convert(resp, names) for resp, names in zip(responses, wanted, strict=True)]

    def execute_decoupled(self, request: ModelRequest, emit: Emit) -> None:
        requested = request.requested_outputs

        def deliver(response: pb_utils.InferenceResponse | None, flags: int) -> None:
            final = bool(flags & pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            if response is None:
                emit(None, None, final)
                return
            result = self._convert(response, requested)
            if isinstance(result, Exception):
                emit(None, result, final)
            else:
                emit(result, None, final)

        state = pb_utils._SendState(deliver)
        pb_request = self._pb_request(request, None)
        pb_request._sender = pb_utils.InferenceResponseSender(state)
        instance_name, model = self._pool.get()

        def coroutine_done(future: concurrent.futures.Future) -> None:
            # the end of an `async def execute` left running on the instance's loop
            if future.cancelled():
                self._fail_open(state, internal(f"the execute of model instance '{instance_name}' was cancelled"), emit)
            elif future.exception() is not None:
                error = future.exception()
                _log.error("model instance '%s': async execute failed", instance_name, exc_info=error)
                self._fail_open(state, self._failure(instance_name, error), emit)
            elif future.result() is not None:
                self._fail_open(state, self._must_return_none(instance_name), emit)

        try:
            returned = self._call(model, [pb_request], instance_name, coroutine_done)
        except Exception as e:  # noqa: BLE001 - whatever the model raises fails its request
            error = self._failure(instance_name, e)
            returned = None
            self._fail_open(state, error, emit)
        finally:
            self._pool.put((instance_name, model))
        if returned is not None:
            self._fail_open(state, self._must_return_none(instance_name), emit)
        # Dropping our reference lets the sender's finalizer send the final flag if the model
        # kept neither the request nor its sender.
        del pb_request

    @staticmethod
    def _must_return_none(instance_name: str) -> TorporError:
        return internal(
            f"Python model '{instance_name}' is using the decoupled mode and the execute function must return None."
        )

    @staticmethod
    def _fail_open(state: pb_utils._SendState, error: Exception, emit: Emit) -> None:
        """Complete a request with `error`, unless the model already sent its final flag."""
        if not state.close_with(lambda: emit(None, error, True)):
            _log.warning("error after the final response was sent: %s", error)
