"""Request tracing: Triton's trace extension, with Torpor's late-binding stamps (docs/tracing.md).

The front ends ask `Tracer.sample` whether a request is traced when it arrives (Triton's
`trace_rate` and `trace_count`, globally or per model); a sampled request carries a `Trace`
through the engine and the device runtime, which stamp the points they own on the monotonic
clock (Triton's steady clock). When the front end has sent the answer the trace is handed back
(`Trace.end`) and written: to Triton's JSON trace file (mode `triton`, every `log_frequency`
traces to `<file>.<n>`, else all at exit), or as OpenTelemetry spans (mode `opentelemetry`,
torpor.tracing_otel). A request not sampled costs the front end one attribute check and the
data plane none beyond `trace is not None`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from torpor.errors import invalid_arg, unsupported
from torpor.tracing_otel import MISSING_SDK, sdk_missing

log = logging.getLogger("torpor")

LEVELS = ("OFF", "TIMESTAMPS", "TENSORS")
MODES = ("triton", "opentelemetry")
DEFAULTS: dict[str, Any] = {
    "trace_level": ["OFF"],
    "trace_rate": "1000",
    "trace_count": "-1",
    "log_frequency": "0",
    "trace_file": "",
    "trace_mode": "triton",
}
# What a trace's first stamps are, per protocol. gRPC hands Torpor's handler a message it has
# already read, so its wait/read span can only be the instant the handler got it.
_ARRIVAL = {"HTTP": ("HTTP_RECV_START",), "GRPC": ("GRPC_WAITREAD_START", "GRPC_WAITREAD_END")}


class TraceSettings:
    """Triton's trace settings as the trace extension reads and updates them: global values
    and per-model overrides. `trace_count` is what is still to be taken (counted down as
    requests are sampled, as Triton shows it); `initial` is what a global setting returns to
    when an update clears it (null), as Triton restores its start-up value."""

    def __init__(self):
        self.global_settings: dict[str, Any] = dict(DEFAULTS)
        self.initial: dict[str, Any] = dict(DEFAULTS)
        self.model_overrides: dict[str, dict[str, Any]] = {}

    def get(self, model: str = "") -> dict:
        out = dict(self.global_settings)
        if model:
            out.update(self.model_overrides.get(model, {}))
        out["trace_level"] = list(out["trace_level"])
        return out

    def update(self, changes: dict[str, Any], model: str = "") -> dict:
        """Apply `changes` (None clears a model's override, or restores a global start-up
        value); all or nothing: a bad value leaves every setting as it was."""
        normalized = {key: _normalize(key, value) for key, value in changes.items()}
        scope = dict(self.model_overrides.get(model, {})) if model else dict(self.global_settings)
        for key, value in normalized.items():
            if value is not None:
                scope[key] = value
            elif model:
                scope.pop(key, None)
            else:
                scope[key] = self.initial[key]
        effective = {**self.global_settings, **scope} if model else scope
        if effective["trace_mode"] == "triton" and not effective["trace_file"] \
                and effective["trace_level"] != ["OFF"] and "trace_level" in normalized:
            # Triton refuses to start tracing that has nowhere to go
            raise invalid_arg("Attempting to set invalid trace setting :trace file name is not given")
        if model:
            self.model_overrides[model] = scope
        else:
            self.global_settings = scope
        return self.get(model)

    def owner(self, model: str, key: str) -> str:
        """The scope whose value of `key` applies to `model`: `model` itself when it has its
        own value, else "" (the global settings)."""
        return model if key in self.model_overrides.get(model, ()) else ""

    def count_down(self, scope: str) -> bool:
        """Take one trace from the scope's `trace_count`; False when none are left."""
        values = self.model_overrides[scope] if scope else self.global_settings
        left = int(values["trace_count"])
        if left == 0:
            return False
        if left > 0:
            values["trace_count"] = str(left - 1)
        return True


def _normalize(key: str, value: Any) -> Any:
    """One setting as the trace extension sends it, checked with Triton's texts."""
    if key not in DEFAULTS:
        raise invalid_arg(f"unknown trace setting '{key}'")
    if key == "trace_file" and value is not None:
        raise unsupported("trace file location can not be updated through network protocol")
    if key == "trace_mode" and value is not None:
        raise unsupported("trace mode can not be updated through network protocol")
    if value is None:
        return None
    if key == "trace_level":
        levels = [str(v).upper() for v in (value if isinstance(value, list) else [value])]
        bad = [v for v in levels if v not in LEVELS]
        if bad:
            raise invalid_arg(f"invalid trace level '{bad[0]}'")
        if "OFF" in levels and len(levels) > 1:
            raise invalid_arg("Expect only one trace level 'OFF' is specified")
        return levels or ["OFF"]
    if isinstance(value, list):
        if len(value) != 1:
            raise invalid_arg(f"expect only 1 value for trace setting '{key}'")
        value = value[0]
    text = str(value)
    try:
        n = int(text)
    except ValueError:
        raise invalid_arg(f"Unable to parse '{key}', got: {text}") from None
    if key == "trace_count" and n < -1:
        raise invalid_arg(f"Unable to parse 'trace_count'. Expecting value >= -1, got: {text}")
    if key != "trace_count" and n < 0:
        raise invalid_arg(f"Unable to parse '{key}', got: {text}")
    if key == "trace_rate" and n == 0:
        raise invalid_arg("Attempting to set invalid trace setting :sample rate must be non-zero")
    return str(n)


@dataclass
class TraceConfig:
    """What `--trace-config` (and the deprecated --trace-* flags) set at start-up."""

    mode: str = "triton"
    level: list[str] = field(default_factory=lambda: ["OFF"])
    rate: int = 1000
    count: int = -1
    file: str = ""
    log_frequency: int = 0
    url: str = "http://localhost:4318/v1/traces"  # the OTLP/HTTP collector (opentelemetry mode)
    resource: dict[str, str] = field(default_factory=lambda: {"service.name": "triton-inference-server"})
    bsp: dict[str, int] = field(default_factory=dict)  # the batch span processor's settings


def monotonic_from_perf(seconds: float) -> int:
    """A time.perf_counter() reading on the monotonic clock, in ns (the copy engine's events
    are stamped with perf_counter)."""
    return time.monotonic_ns() - time.perf_counter_ns() + int(seconds * 1e9)


class Trace:
    """One sampled request: its stamps (name, monotonic ns) and what identifies it."""

    __slots__ = ("_ended", "_tracer", "attributes", "context", "id", "model", "protocol", "request_id", "stamps",
                 "version")

    def __init__(self, tracer: Tracer, trace_id: int, protocol: str, context: Any = None):
        self._tracer = tracer
        self._ended = False
        self.id = trace_id
        self.protocol = protocol
        self.context = context  # a propagated OpenTelemetry context (traceparent), or None
        self.model: str | None = None  # set when the engine answered the request
        self.version = -1
        self.request_id = ""
        self.stamps: list[tuple[str, int]] = []
        self.attributes: dict[str, Any] = {}

    def stamp(self, name: str, ns: int | None = None) -> None:
        self.stamps.append((name, time.monotonic_ns() if ns is None else ns))

    def request_done(self, model: str, version: int, request_id: str, start: int, queue: int, compute: int,
                     input_end: int | None, output_start: int | None, end: int) -> None:
        """The engine's points of an answered request (the statistics' own readings);
        `input_end` / `output_start` are None where the model gives no such split."""
        self.model, self.version, self.request_id = model, int(version), request_id or ""
        stamps = self.stamps
        stamps += [("REQUEST_START", start), ("QUEUE_START", queue), ("COMPUTE_START", compute)]
        if input_end is not None:
            stamps.append(("COMPUTE_INPUT_END", input_end))
        if output_start is not None:
            stamps.append(("COMPUTE_OUTPUT_START", output_start))
        stamps += [("COMPUTE_END", end), ("INFER_RESPONSE_COMPLETE", end), ("REQUEST_END", time.monotonic_ns())]

    def end(self, name: str | None = None) -> None:
        """The front end's last stamp (`name`, now); the trace is written once, and only if
        the engine answered the request (Triton writes no trace of a refused request)."""
        if self._ended:
            return
        self._ended = True
        if name is not None:
            self.stamp(name)
        if self.model is not None:
            self._tracer.collect(self)

    def records(self) -> list[dict]:
        """Triton's JSON trace objects: the request's identity, then one object per stamp."""
        head: dict[str, Any] = {"id": self.id, "model_name": self.model, "model_version": self.version}
        if self.request_id:
            head["request_id"] = self.request_id
        out = [head]
        for name, ns in sorted(self.stamps, key=lambda s: s[1]):
            out.append({"id": self.id, "timestamps": [{"name": name, "ns": ns}]})
        return out


class _TraceFile:
    """Triton's trace file: every `log_frequency` traces written to `<path>.<n>` (n from 0),
    the rest at exit, to `<path>` when nothing was written before and log_frequency is 0."""

    def __init__(self, path: str):
        self.path = path
        self.index = 0
        self.pending: list[list[dict]] = []

    def add(self, records: list[dict], log_frequency: int) -> None:
        self.pending.append(records)
        if log_frequency > 0 and len(self.pending) >= log_frequency:
            self._write(f"{self.path}.{self.index}")

    def close(self, log_frequency: int) -> None:
        if self.pending:
            self._write(self.path if log_frequency == 0 and self.index == 0 else f"{self.path}.{self.index}")

    def _write(self, path: str) -> None:
        objects = [o for records in self.pending for o in records]
        self.pending = []
        self.index += 1
        try:
            with open(path, "w") as f:
                json.dump(objects, f, separators=(",", ":"))
        except OSError as e:  # a trace that cannot be written must not fail the request it traced
            log.error("could not write the trace file %s: %s", path, e)


class Tracer:
    """The server's tracer: the settings, the sampling, and where sampled traces go."""

    def __init__(self):
        self.store = TraceSettings()
        self.config = TraceConfig()
        self.on = False  # any request could be sampled now (the front ends' one check)
        self._ids = itertools.count(1)
        self._seen: dict[str, int] = {}  # requests seen per rate scope ("" or a model) since its rate was set
        self._lock = threading.Lock()  # traces may end on gRPC's threads
        self._file: _TraceFile | None = None
        self._otel: Any = None  # torpor.tracing_otel.OtelExport in opentelemetry mode

    def configure(self, config: TraceConfig, span_exporter: Any = None) -> None:
        """Start-up settings (--trace-config). `span_exporter`: an OpenTelemetry SpanExporter
        to use instead of OTLP/HTTP to `config.url` (tests use an in-memory one)."""
        self.config = config
        values = {
            "trace_level": list(config.level) or ["OFF"],
            "trace_rate": str(config.rate),
            "trace_count": str(config.count),
            "log_frequency": str(config.log_frequency),
            "trace_file": config.file if config.mode == "triton" else "",
            "trace_mode": config.mode,
        }
        self.store.global_settings = dict(values)
        self.store.initial = dict(values)
        self._file = _TraceFile(config.file) if config.mode == "triton" and config.file else None
        if config.mode == "opentelemetry":
            from torpor.tracing_otel import OtelExport

            self._otel = OtelExport(config, span_exporter)
        self._refresh()

    def settings(self, model: str = "", changes: dict | None = None) -> dict:
        """The trace extension: the settings of `model` (or the global ones), updated first."""
        if changes is None:
            return self.store.get(model)
        out = self.store.update(changes, model)
        if "trace_rate" in changes:
            self._seen.pop(model, None)
        self._refresh()
        return out

    def _refresh(self) -> None:
        store = self.store
        scopes = [store.global_settings, *store.model_overrides.values()]
        wants = any("TIMESTAMPS" in s.get("trace_level", ()) for s in scopes)
        self.on = wants and (self._file is not None or self._otel is not None)

    def sample(self, model: str, protocol: str, carrier: Any = None) -> Trace | None:
        """A Trace when this request of `model` is to be traced (its first stamps taken), else
        None. `carrier`: the request's headers or gRPC metadata (or a callable returning
        them): in opentelemetry mode a propagated context there is traced whatever the rate
        and count, as Triton does."""
        if not self.on:
            return None
        store = self.store
        settings = store.get(model)
        if "TIMESTAMPS" not in settings["trace_level"]:
            return None
        context = self._otel.extract(carrier) if self._otel is not None and carrier is not None else None
        if context is None:
            scope = store.owner(model, "trace_rate")
            seen = self._seen[scope] = self._seen.get(scope, 0) + 1
            rate = int(settings["trace_rate"])
            if rate <= 0 or seen % rate:
                return None
            if not store.count_down(store.owner(model, "trace_count")):
                return None
        trace = Trace(self, next(self._ids), protocol, context)
        now = time.monotonic_ns()
        for name in _ARRIVAL.get(protocol, ()):
            trace.stamp(name, now)
        return trace

    def collect(self, trace: Trace) -> None:
        with self._lock:
            if self._otel is not None:
                self._otel.export(trace)
            elif self._file is not None:
                frequency = int(self.store.get(trace.model or "")["log_frequency"])
                self._file.add(trace.records(), frequency)

    def flush(self) -> None:
        """Hand the OpenTelemetry spans still batched to the exporter now."""
        if self._otel is not None:
            self._otel.flush()

    def close(self) -> None:
        """At exit: the traces not yet written go to the file; the span exporter shuts down."""
        with self._lock:
            if self._file is not None:
                self._file.close(int(self.store.global_settings["log_frequency"]))
            if self._otel is not None:
                self._otel.close()
        self.on = False


# -- command line (torpor serve) -------------------------------------------------------------
_GLOBAL_KEYS = ("rate", "level", "count", "mode")
_MODE_KEYS = {
    "triton": ("file", "log-frequency"),
    "opentelemetry": ("url", "resource", "bsp_max_queue_size", "bsp_schedule_delay", "bsp_max_export_batch_size"),
}


def add_trace_arguments(parser: Any) -> None:
    """tritonserver's tracing flags on `parser` (an argparse parser): --trace-config, and the
    deprecated --trace-file / --trace-level / --trace-rate / --trace-count /
    --trace-log-frequency that Triton 2.51 still takes. Values are checked here, so a wrong
    one stops `torpor serve` at parse time with one line."""
    g = parser.add_argument_group("tracing (Triton's trace extension; docs/tracing.md)")
    g.add_argument("--trace-config", action="append", default=[], type=_trace_config_item,
                   metavar="[MODE,]SETTING=VALUE",
                   help="a trace setting, repeatable. Global: rate=N (trace every N-th request; 1000), "
                        "level=OFF|TIMESTAMPS (OFF), count=N (traces to take; -1: no limit), "
                        "mode=triton|opentelemetry (triton). triton,file=PATH (the trace file; none), "
                        "triton,log-frequency=N (write every N traces to PATH.<n>; 0: all at exit). "
                        "opentelemetry,url=URL (the OTLP/HTTP collector; http://localhost:4318/v1/traces), "
                        "opentelemetry,resource=KEY=VALUE, opentelemetry,bsp_max_queue_size=N / "
                        "bsp_schedule_delay=MS / bsp_max_export_batch_size=N (default: none: tracing off)")
    g.add_argument("--trace-file", type=lambda s: _checked("file", s), default=None,
                   help="deprecated: --trace-config triton,file=PATH (default: none)")
    g.add_argument("--trace-level", action="append", type=lambda s: _checked("level", s), default=None,
                   help="deprecated: --trace-config level=LEVEL, repeatable (default: OFF)")
    g.add_argument("--trace-rate", type=lambda s: _checked("rate", s), default=None,
                   help="deprecated: --trace-config rate=N (default: 1000)")
    g.add_argument("--trace-count", type=lambda s: _checked("count", s), default=None,
                   help="deprecated: --trace-config count=N (default: -1)")
    g.add_argument("--trace-log-frequency", type=lambda s: _checked("log-frequency", s), default=None,
                   help="deprecated: --trace-config triton,log-frequency=N (default: 0)")


def apply_trace_arguments(engine: Any, args: Any) -> None:
    """Give the engine's tracer what the flags set (after add_trace_arguments' parse)."""
    engine.tracer.configure(trace_config(args))


def trace_config(args: Any) -> TraceConfig:
    """The TraceConfig the parsed flags describe (the deprecated ones first, --trace-config over them)."""
    config = TraceConfig()
    items = [("", "level", v) for v in getattr(args, "trace_level", None) or ()]
    for key, attr in (("file", "trace_file"), ("rate", "trace_rate"), ("count", "trace_count"),
                      ("log-frequency", "trace_log_frequency")):
        if getattr(args, attr, None) is not None:
            items.append(("triton" if key in _MODE_KEYS["triton"] else "", key, getattr(args, attr)))
    items += getattr(args, "trace_config", None) or []
    levels: list[str] = []
    for _, key, value in items:
        if key == "level":
            levels.append(value)
        elif key == "resource":
            config.resource.update([value])
        elif key.startswith("bsp_"):
            config.bsp[key] = value
        else:
            setattr(config, key.replace("-", "_"), value)
    if levels:
        # OFF given beside other levels means nothing: the others are what was asked for
        config.level = [v for v in dict.fromkeys(levels) if v != "OFF"] or ["OFF"]
    return config


def _trace_config_item(text: str) -> tuple[str, str, Any]:
    """One --trace-config value: (mode or "", setting, checked value)."""
    head, eq, value = text.partition("=")
    mode, _, key = head.rpartition(",")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"format is '[<trace mode>,]<setting>=<value>', got '{text}'")
    if mode and mode not in _MODE_KEYS:
        raise argparse.ArgumentTypeError(f"unknown trace mode '{mode}' in '{text}': triton or opentelemetry")
    allowed = _MODE_KEYS[mode] if mode else _GLOBAL_KEYS
    if key not in allowed:
        where = f"trace mode '{mode}'" if mode else "a global trace setting (prefix the mode's: triton,file=...)"
        raise argparse.ArgumentTypeError(f"'{key}' is not {where}; expected one of {', '.join(allowed)}")
    return mode, key, _checked(key, value)


def _checked(key: str, value: str) -> Any:
    """A start-up trace setting's value, converted, or argparse's error naming what is wrong."""

    def number(low: int) -> int:
        try:
            n = int(value)
        except ValueError:
            n = low - 1
        if n < low:
            raise argparse.ArgumentTypeError(f"{key}={value}: expected an integer >= {low}")
        return n

    if key in ("rate", "log-frequency"):
        return number(0)
    if key == "count":
        return number(-1)
    if key.startswith("bsp_"):
        return number(1)
    if key == "level":
        if value.upper() not in LEVELS:
            raise argparse.ArgumentTypeError(f"invalid trace level '{value}': {', '.join(LEVELS)}")
        return value.upper()
    if key == "mode":
        if value not in MODES:
            raise argparse.ArgumentTypeError(f"invalid trace mode '{value}': triton or opentelemetry")
        if value == "opentelemetry" and sdk_missing():
            raise argparse.ArgumentTypeError(MISSING_SDK)
        return value
    if key == "file":
        folder = os.path.dirname(os.path.abspath(value))
        if not value or not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"trace file '{value}': no such directory {folder}")
        return value
    if key == "resource":
        name, eq, v = value.partition("=")
        if not eq or not name:
            raise argparse.ArgumentTypeError(f"resource '{value}': expected KEY=VALUE")
        return name, v
    if not value:  # url
        raise argparse.ArgumentTypeError(f"{key}: empty")
    return value
