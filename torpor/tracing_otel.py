"""`--trace-config mode=opentelemetry`: a finished Trace as Triton's OpenTelemetry spans.

Triton's shape: a root span "InferRequest" (the front end's stamps and INFER_RESPONSE_COMPLETE),
its child named after the model (REQUEST_START, QUEUE_START, REQUEST_END; attributes
triton.model_name, triton.model_version, triton.trace_id, triton.trace_parent_id,
triton.request_id) and that span's child "compute" (COMPUTE_*). Torpor adds its late-binding
stamps (TORPOR_*) as events of "compute", and two child spans of it where they happened:
"torpor.wait_memory" (waiting for a turn on the device and for room in its memory) and
"torpor.copy" (the model's weights landing on the device). Spans are built when the request
has been answered, from its monotonic stamps shifted onto the wall clock OpenTelemetry uses,
and leave through a batch span processor to the OTLP/HTTP collector at `url`.

The SDK is optional: this module imports it only when the mode is asked for.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

# Which span each of Triton's stamps belongs to; the rest (TORPOR_*) go to "compute".
_ROOT = {"HTTP_RECV_START", "HTTP_RECV_END", "HTTP_SEND_START", "HTTP_SEND_END", "GRPC_WAITREAD_START",
         "GRPC_WAITREAD_END", "GRPC_SEND_START", "GRPC_SEND_END", "INFER_RESPONSE_COMPLETE"}
_MODEL = {"REQUEST_START", "QUEUE_START", "REQUEST_END"}
# Torpor's child spans of "compute": (span name, first stamp, last stamp)
_TORPOR_SPANS = (("torpor.wait_memory", "TORPOR_STAGE_START", "TORPOR_MEMORY_END"),
                 ("torpor.copy", "TORPOR_COPY_START", "TORPOR_COPY_END"))
_BSP = {"bsp_max_queue_size": "max_queue_size", "bsp_schedule_delay": "schedule_delay_millis",
        "bsp_max_export_batch_size": "max_export_batch_size"}

MISSING_SDK = ("mode=opentelemetry needs the OpenTelemetry SDK and its OTLP/HTTP exporter: "
               "pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http")


def sdk_missing() -> bool:
    """The SDK or the OTLP/HTTP exporter is not installed."""
    try:
        return (importlib.util.find_spec("opentelemetry.sdk.trace") is None
                or importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None)
    except ModuleNotFoundError:
        return True


def otlp_url(url: str) -> str:
    """Triton takes the collector as `host:port` or a full URL; the exporter wants the URL."""
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    if "/" not in rest:
        url = f"{scheme}://{rest}/v1/traces"
    return url


class OtelExport:
    """The SDK's tracer provider (private to Torpor: the process-wide one is left alone)."""

    def __init__(self, config: Any, span_exporter: Any = None):
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            if span_exporter is None:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                span_exporter = OTLPSpanExporter(endpoint=otlp_url(config.url))
        except ImportError:  # the flags are checked at parse time; this is for other callers
            raise RuntimeError(MISSING_SDK) from None
        self._api = trace
        self._propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(resource=Resource.create(dict(config.resource)))
        options = {_BSP[k]: v for k, v in config.bsp.items()}
        self.provider.add_span_processor(BatchSpanProcessor(span_exporter, **options))
        self.tracer = self.provider.get_tracer("torpor")

    def extract(self, carrier: Any) -> Any:
        """The context a client propagated (W3C traceparent in headers or gRPC metadata), or None."""
        if callable(carrier):
            carrier = carrier()
        if not isinstance(carrier, dict):
            carrier = {str(k).lower(): v for k, v in (carrier or ())}
        if "traceparent" not in carrier:
            return None
        context = self._propagator.extract(carrier)
        return context if self._api.get_current_span(context).get_span_context().is_valid else None

    def export(self, trace: Any) -> None:
        api, tracer = self._api, self.tracer
        shift = time.time_ns() - time.monotonic_ns()
        stamps = sorted(trace.stamps, key=lambda s: s[1])
        at = {name: ns + shift for name, ns in stamps}
        root = tracer.start_span("InferRequest", context=trace.context, kind=api.SpanKind.SERVER,
                                 start_time=stamps[0][1] + shift)
        attributes = {"triton.model_name": trace.model, "triton.model_version": trace.version,
                      "triton.trace_id": trace.id, "triton.trace_parent_id": 0, **trace.attributes}
        if trace.request_id:
            attributes["triton.request_id"] = trace.request_id
        model = tracer.start_span(trace.model, context=api.set_span_in_context(root),
                                  start_time=at["REQUEST_START"], attributes=attributes)
        compute = tracer.start_span("compute", context=api.set_span_in_context(model), start_time=at["COMPUTE_START"])
        for name, ns in stamps:
            span = root if name in _ROOT else model if name in _MODEL else compute
            span.add_event(name, timestamp=ns + shift)
        for span_name, first, last in _TORPOR_SPANS:
            if first in at and last in at:
                child = tracer.start_span(span_name, context=api.set_span_in_context(compute), start_time=at[first])
                child.end(end_time=at[last])
        compute.end(end_time=at["COMPUTE_END"])
        model.end(end_time=at["REQUEST_END"])
        root.end(end_time=stamps[-1][1] + shift)

    def flush(self) -> None:
        self.provider.force_flush()

    def close(self) -> None:
        self.provider.shutdown()
