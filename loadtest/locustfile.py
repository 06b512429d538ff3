"""Locust load test for Torpor: many models, Zipf popularity, per-model latency objectives.

    locust -f loadtest/locustfile.py --headless -u 16 -r 16 -t 20s --host http://127.0.0.1:8000
    locust -f loadtest/locustfile.py TorporHttpUser --headless ...     # HTTP only
    locust -f loadtest/locustfile.py TorporGrpcUser --headless ...     # gRPC only
        --models simple,resnet50,bert     popularity order (rank 1 first); default: every model
                                          the server has whose inputs can be synthesized
        --zipf 1.0                        popularity exponent (share of rank i ~ 1 / i**s; 0 = uniform)
        --zipf-seed 0                     order of the discovered models' ranks
        --slo-ms 2000,resnet50=500        default objective, and per-model ones
        --grpc-host 127.0.0.1:8001        gRPC target (default: --host's hostname, port 8001)
        --csv loadtest/results/run        Locust's CSV output (stats, failures, exceptions)

Users
  TorporHttpUser  FastHttpUser posting hand-built binary-tensor requests (JSON header, raw
                  tensor bytes, Inference-Header-Content-Length) and asking for binary outputs.
  TorporGrpcUser  one tritonclient.grpc client per user; each call is reported to Locust's
                  statistics as request type "grpc", named by model.

Workload: models are discovered from POST /v2/repository/index (ready ones) and each model's
GET /v2/models/<m>/config. A request picks its model by Zipf popularity and sends inputs built
from the config: -1 dimensions become 8, a batch dimension of 1 is added when max_batch_size > 0,
numbers are ones and BYTES elements are b"1". Decoupled models, models under sequence_batching,
and models whose inputs cannot be built (BF16, shape tensors) are skipped and listed at the start.

SLO: a request slower than its model's objective is reported as a failure of class SLOMiss, so
misses get their own rows in Locust's failure table. Objective per model: `name=ms` in --slo-ms,
else the config's `torpor.slo_ms` parameter, else the bare number in --slo-ms, else 10 s. The
10 s default is deliberately generous: on a 2-core CPU machine a closed loop of 16 users puts
ResNet-50 and BERT requests behind each other, and the default run must not report misses there.

Targets: requests go only to --host (default http://127.0.0.1:8000, loopback) and the gRPC
target above, both named by the user or loopback; redirects are not followed, so a server cannot
move the load to another host.

Every option can also come from the environment (TORPOR_LOCUST_MODELS, _ZIPF, _ZIPF_SEED,
_SLO_MS, _GRPC_HOST) or a locust.conf. Run Locust only as its own process: importing it
monkey-patches the interpreter (gevent).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import gevent.lock
import grpc.experimental.gevent as grpc_gevent
import numpy as np

# locust first: it monkey-patches the standard library, and gRPC's gevent mode needs that done.
from locust import FastHttpUser, User, constant, events, task
from locust.exception import StopTest

# grpcio does its I/O in C; without this every gRPC call would block all users of the process.
grpc_gevent.init_gevent()

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

log = logging.getLogger("torpor.locust")

DEFAULT_HOST = "http://127.0.0.1:8000"
DEFAULT_GRPC_PORT = 8001
DEFAULT_SLO_MS = 10_000.0
VARIABLE_DIM = 8
REQUEST_TIMEOUT_S = 120.0

NUMPY_TYPES = {
    "BOOL": np.bool_,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class SLOMiss(Exception):
    """A request answered correctly but later than its model's latency objective."""


class BadResponse(Exception):
    """A 200 answer whose body is not a well-formed inference response."""


class InferError(Exception):
    """The server refused or failed the request (status and message)."""


# ------------------------------------------------------------------------------------------------
# options

@events.init_command_line_parser.add_listener
def _add_options(parser):
    group = parser.add_argument_group("Torpor workload")
    group.add_argument("--models", default="", env_var="TORPOR_LOCUST_MODELS",
                       help="comma-separated models in popularity order (default: all the server has)")
    group.add_argument("--zipf", type=float, default=1.0, env_var="TORPOR_LOCUST_ZIPF",
                       help="Zipf exponent of model popularity (0 = uniform)")
    group.add_argument("--zipf-seed", type=int, default=0, env_var="TORPOR_LOCUST_ZIPF_SEED",
                       help="seed of the rank order of discovered models")
    group.add_argument("--slo-ms", default="", env_var="TORPOR_LOCUST_SLO_MS",
                       help="latency objectives: 'MS' (default) and/or 'model=MS', comma-separated")
    group.add_argument("--grpc-host", default="", env_var="TORPOR_LOCUST_GRPC_HOST",
                       help="gRPC target host:port (default: --host's hostname, port 8001)")


def parse_slo(text: str) -> tuple[float | None, dict[str, float]]:
    default, per_model = None, {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.rpartition("=")
        ms = float(value)
        if not ms > 0:
            raise ValueError(f"--slo-ms: {item!r} is not a positive number of milliseconds")
        if sep:
            per_model[name.strip()] = ms
        else:
            default = ms
    return default, per_model


def http_base(environment) -> str:
    base = (environment.host or DEFAULT_HOST).rstrip("/")
    url = urllib.parse.urlsplit(base)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"--host must be an http(s) URL such as {DEFAULT_HOST}, not {base!r}")
    return base


def grpc_target(environment) -> str:
    named = getattr(environment.parsed_options, "grpc_host", "") or ""
    if named:
        if "://" in named:
            raise ValueError(f"--grpc-host takes host:port, not a URL: {named!r}")
        return named
    host = urllib.parse.urlsplit(http_base(environment)).hostname
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{host}:{DEFAULT_GRPC_PORT}"


# ------------------------------------------------------------------------------------------------
# workload

@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(s)) + s for s in self.array.reshape(-1))
        return self.array.tobytes()


@dataclass
class ModelSpec:
    name: str
    slo_ms: float
    inputs: list[Tensor]
    share: float = 0.0
    http_body: bytes = b""
    http_header_length: int = 0

    def build_http(self) -> None:
        blobs = [t.raw() for t in self.inputs]
        header = json.dumps({
            "inputs": [
                {"name": t.name, "shape": t.shape, "datatype": t.datatype,
                 "parameters": {"binary_data_size": len(b)}}
                for t, b in zip(self.inputs, blobs)
            ],
            "parameters": {"binary_data_output": True},
        }, separators=(",", ":")).encode()
        self.http_header_length = len(header)
        self.http_body = header + b"".join(blobs)


@dataclass
class Workload:
    models: list[ModelSpec]
    skipped: dict[str, str] = field(default_factory=dict)
    _cum: list[float] = field(default_factory=list)

    def set_popularity(self, s: float) -> None:
        weights = [1.0 / (rank ** s) for rank in range(1, len(self.models) + 1)]
        total = sum(weights)
        self._cum = []
        acc = 0.0
        for spec, w in zip(self.models, weights):
            spec.share = w / total
            acc += w
            self._cum.append(acc)

    def pick(self) -> ModelSpec:
        return random.choices(self.models, cum_weights=self._cum)[0]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirect)


def _get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _opener.open(req, timeout=30) as r:
        return json.loads(r.read())


def build_inputs(config: dict) -> list[Tensor]:
    """Inputs for one request from a model's config; ValueError says why it cannot be built."""
    if config.get("sequence_batching"):
        raise ValueError("sequence model (needs correlated requests)")
    if (config.get("model_transaction_policy") or {}).get("decoupled"):
        raise ValueError("decoupled model")
    batched = int(config.get("max_batch_size") or 0) > 0
    tensors = []
    for inp in config.get("input") or []:
        if inp.get("optional"):
            continue
        if inp.get("is_shape_tensor"):
            raise ValueError(f"input {inp['name']} is a shape tensor")
        datatype = str(inp.get("data_type", "")).removeprefix("TYPE_")
        datatype = "BYTES" if datatype == "STRING" else datatype
        dims = [int(d) for d in inp.get("dims") or []]
        shape = ([1] if batched else []) + [d if d > 0 else VARIABLE_DIM for d in dims]
        if datatype == "BYTES":
            array = np.full(shape, b"1", dtype=np.object_)
        elif datatype in NUMPY_TYPES:
            array = np.ones(shape, dtype=NUMPY_TYPES[datatype])
        else:
            raise ValueError(f"input {inp['name']} has type {datatype or 'unknown'}")
        tensors.append(Tensor(inp["name"], datatype, shape, array))
    if not tensors:
        raise ValueError("no required inputs")
    return tensors


def discover(environment) -> Workload:
    opts = environment.parsed_options
    base = http_base(environment)
    default_slo, named_slo = parse_slo(getattr(opts, "slo_ms", "") or "")
    index = _get_json(f"{base}/v2/repository/index", {"ready": True})
    ready = [m["name"] for m in index if m.get("state", "READY") == "READY"]
    asked = [m.strip() for m in (getattr(opts, "models", "") or "").split(",") if m.strip()]
    if asked:
        missing = [m for m in asked if m not in ready]
        if missing:
            raise ValueError(f"--models: not ready on {base}: {', '.join(missing)}")
        names = list(dict.fromkeys(asked))
    else:
        # Ranks from a seeded shuffle so that popularity does not follow alphabetical order.
        names = sorted(set(ready))
        random.Random(getattr(opts, "zipf_seed", 0)).shuffle(names)
    work = Workload(models=[])
    for name in names:
        try:
            config = _get_json(f"{base}/v2/models/{urllib.parse.quote(name)}/config")
            inputs = build_inputs(config)
        except (ValueError, KeyError, urllib.error.URLError) as e:
            if asked:
                raise ValueError(f"--models: cannot load-test {name}: {e}") from e
            work.skipped[name] = str(e)
            continue
        params = config.get("parameters") or {}
        config_slo = (params.get("torpor.slo_ms") or {}).get("string_value")
        slo = named_slo.get(name) or (float(config_slo) if config_slo else None) or default_slo
        spec = ModelSpec(name, slo or DEFAULT_SLO_MS, inputs)
        spec.build_http()
        work.models.append(spec)
    unknown = set(named_slo) - {m.name for m in work.models}
    if unknown:
        log.warning("--slo-ms names models not in the workload: %s", ", ".join(sorted(unknown)))
    if not work.models:
        raise ValueError(f"no model on {base} can be load-tested (skipped: {work.skipped})")
    work.set_popularity(float(getattr(opts, "zipf", 1.0)))
    return work


_work: Workload | None = None
_work_error: str | None = None
_work_key: tuple | None = None
_work_lock = gevent.lock.Semaphore()


def workload(environment) -> Workload:
    """The workload, discovered once per process and target (every user of every class shares it)."""
    global _work, _work_error, _work_key
    opts = environment.parsed_options
    key = (environment.host, *(getattr(opts, a, None) for a in ("models", "zipf", "zipf_seed", "slo_ms")))
    with _work_lock:
        if key != _work_key:  # the web UI can change the host between runs
            _work, _work_error, _work_key = None, None, key
            try:
                _work = discover(environment)
            except (ValueError, OSError) as e:
                _work_error = f"{type(e).__name__}: {e}"
            else:
                lines = [f"{'rank':>4}  {'model':<28} {'share':>6}  {'SLO ms':>8}  inputs"]
                for rank, m in enumerate(_work.models, 1):
                    shapes = ", ".join(f"{t.name} {t.datatype}{t.shape}" for t in m.inputs)
                    lines.append(f"{rank:>4}  {m.name:<28} {m.share:>6.1%}  {m.slo_ms:>8g}  {shapes}")
                lines += [f"   -  {name:<28} skipped: {why}" for name, why in _work.skipped.items()]
                log.info("workload on %s (gRPC %s):\n%s", http_base(environment),
                         grpc_target(environment), "\n".join(lines))
        if _work is None:
            environment.process_exit_code = 1
            raise StopTest(f"no workload: {_work_error}")
        return _work


@events.test_start.add_listener
def _discover_at_start(environment, **_kw):
    try:
        workload(environment)
    except StopTest as e:
        log.error("%s", e)
        runner = environment.runner
        if runner is not None:
            # As Locust itself does for StopTest: a headless run ends, the web UI stays up.
            headless = getattr(environment.parsed_options, "headless", False)
            gevent.spawn(runner.quit if headless else runner.stop)


# ------------------------------------------------------------------------------------------------
# users

def check_binary_response(spec: ModelSpec, headers, body: bytes) -> None:
    hlen = headers.get("Inference-Header-Content-Length")
    if hlen is None:
        raise BadResponse(f"{spec.name}: no Inference-Header-Content-Length (binary outputs were asked)")
    header = json.loads(body[: int(hlen)])
    outputs = header.get("outputs") or []
    sizes = [((o.get("parameters") or {}).get("binary_data_size")) for o in outputs]
    if not outputs or None in sizes or sum(sizes) != len(body) - int(hlen):
        raise BadResponse(f"{spec.name}: binary output sizes do not match the body")


class TorporHttpUser(FastHttpUser):
    host = DEFAULT_HOST
    wait_time = constant(0)
    network_timeout = REQUEST_TIMEOUT_S
    connection_timeout = 10.0

    def on_start(self):
        self.work = workload(self.environment)

    @task
    def infer(self):
        spec = self.work.pick()
        headers = {"Inference-Header-Content-Length": str(spec.http_header_length),
                   "Content-Type": "application/octet-stream"}
        with self.client.post(f"/v2/models/{spec.name}/infer", data=spec.http_body, headers=headers,
                              name=spec.name, catch_response=True, allow_redirects=False) as resp:
            if resp.status_code != 200:
                if resp.status_code == 0:
                    resp.failure(resp.error or InferError("connection failed"))
                else:
                    text = (resp.content or b"")[:200].decode(errors="replace")
                    resp.failure(InferError(f"HTTP {resp.status_code}: {text}"))
                return
            try:
                check_binary_response(spec, resp.headers, resp.content or b"")
            except (BadResponse, ValueError) as e:
                resp.failure(e if isinstance(e, BadResponse) else BadResponse(f"{spec.name}: {e}"))
                return
            if resp.request_meta["response_time"] > spec.slo_ms:
                resp.failure(SLOMiss(f"{spec.name}: slower than its {spec.slo_ms:g} ms SLO"))
            else:
                resp.success()


_grpc_used = False
_exit_code: int | None = None


@events.quit.add_listener
def _remember_exit_code(exit_code, **_kw):
    global _exit_code
    _exit_code = exit_code


def _exit_without_finalizing():
    # grpcio in gevent mode can hang in interpreter finalization even with every channel closed
    # (its core waits for gevent objects that only a running hub would free): about half of the
    # runs on a loaded 2-core machine never exited. By now Locust has printed its summary and
    # closed its CSV files, so skipping finalization loses nothing.
    if _grpc_used and _exit_code is not None:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_code)


# Registered at import, so it runs after the atexit handlers Locust registers later.
atexit.register(_exit_without_finalizing)


class TorporGrpcUser(User):
    wait_time = constant(0)

    def on_start(self):
        global _grpc_used
        self.work = workload(self.environment)
        _grpc_used = True
        self.client = grpcclient.InferenceServerClient(grpc_target(self.environment))
        self.inputs = {}
        for spec in self.work.models:
            inputs = []
            for t in spec.inputs:
                i = grpcclient.InferInput(t.name, t.shape, t.datatype)
                i.set_data_from_numpy(t.array)
                inputs.append(i)
            self.inputs[spec.name] = inputs

    def on_stop(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()

    @task
    def infer(self):
        spec = self.work.pick()
        exc: Exception | None = None
        length = 0
        start = time.perf_counter()
        try:
            result = self.client.infer(spec.name, self.inputs[spec.name], client_timeout=REQUEST_TIMEOUT_S)
        except InferenceServerException as e:
            # Its repr drops the message, and Locust's failure table shows reprs.
            exc = InferError(f"{e.status()}: {e.message()}")
        ms = (time.perf_counter() - start) * 1000
        if exc is None:
            response = result.get_response()
            length = response.ByteSize()
            if not response.outputs or len(response.raw_output_contents) != len(response.outputs):
                exc = BadResponse(f"{spec.name}: outputs without raw contents")
            elif ms > spec.slo_ms:
                exc = SLOMiss(f"{spec.name}: slower than its {spec.slo_ms:g} ms SLO")
        self.environment.events.request.fire(
            request_type="grpc", name=spec.name, response_time=ms, response_length=length,
            exception=exc, context={}, response=None,
        )
