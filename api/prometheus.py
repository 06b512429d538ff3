"""Prometheus metrics under Triton's names, read at scrape time from the engine's own state.

A custom prometheus-client Collector on a dedicated CollectorRegistry (no default process or
platform collectors). Per-model numbers come from the same `ModelStats` objects the statistics
extension returns, so `/metrics` and `/v2/models/stats` never disagree. GPU gauges come from
pynvml when a GPU and its driver are present, CPU gauges from psutil.

Triton exposes its counters without the `_total` suffix that prometheus-client's text writer
appends to counters, so `render()` writes the exposition text itself from the collected
families (same format: HELP, TYPE, samples).

Torpor's own metrics (`torpor_swap_*` ...) plug in as sources: callables returning metric
families, called at every scrape, added with `MetricsCollector.add_source(fn)` (make_registry
adds the swap engine's).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from torpor.dataplane.engine import Engine

log = logging.getLogger("torpor.api.prometheus")

CONTENT_TYPE = "text/plain; charset=utf-8"

Source = Callable[[], Iterable[Metric]]

# (name, help, kind, getter(stats) -> value); durations are cumulative microseconds, as Triton's
_MODEL_METRICS = [
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes", "counter",
     lambda s: s.success.count),
    ("nv_inference_count", "Number of inferences performed (does not include cached requests)", "counter",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (does not include cached requests)",
     "counter", lambda s: s.execution_count),
    ("nv_inference_request_duration_us",
     "Cumulative inference request duration in microseconds (includes cached requests)", "counter",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds", "counter",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_input_duration_us",
     "Cumulative compute input duration in microseconds (does not include cached requests)", "counter",
     lambda s: s.compute_input.ns // 1000),
    ("nv_inference_compute_infer_duration_us",
     "Cumulative compute inference duration in microseconds (does not include cached requests)", "counter",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_inference_compute_output_duration_us",
     "Cumulative inference compute output duration in microseconds (does not include cached requests)",
     "counter", lambda s: s.compute_output.ns // 1000),
    ("nv_inference_pending_request_count",
     "Instantaneous number of pending requests awaiting execution per-model.", "gauge",
     lambda s: s.pending),
    ("nv_model_load_duration_secs", "Model load time in seconds", "gauge",
     lambda s: s.load_duration_s),
]


class _Nvml:
    """pynvml, initialised once; `devices` is empty without a driver or GPU."""

    def __init__(self):
        self.lock = threading.Lock()
        self.nvml = None
        self.devices: list[tuple[str, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = pynvml.nvmlDeviceGetUUID(h)
                self.devices.append((uuid.decode() if isinstance(uuid, bytes) else uuid, h))
            self.nvml = pynvml
        except Exception as e:  # noqa: BLE001 - pynvml.NVMLError, ImportError: no GPU metrics
            log.debug("no GPU metrics: %s", e)
            self.devices = []

    def collect(self) -> list[Metric]:
        if not self.devices:
            return []
        nv = self.nvml
        util = Metric("nv_gpu_utilization", "GPU utilization rate [0.0 - 1.0)", "gauge")
        total = Metric("nv_gpu_memory_total_bytes", "GPU total memory, in bytes", "gauge")
        used = Metric("nv_gpu_memory_used_bytes", "GPU used memory, in bytes", "gauge")
        power = Metric("nv_gpu_power_usage", "GPU power usage in watts", "gauge")
        limit = Metric("nv_gpu_power_limit", "GPU power management limit in watts", "gauge")
        energy = Metric("nv_energy_consumption", "GPU energy consumption in joules since the Triton Server started",
                        "counter")
        with self.lock:
            for uuid, h in self.devices:
                labels = {"gpu_uuid": uuid}
                for metric, read in (
                    (util, lambda h=h: nv.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
                    (total, lambda h=h: nv.nvmlDeviceGetMemoryInfo(h).total),
                    (used, lambda h=h: nv.nvmlDeviceGetMemoryInfo(h).used),
                    (power, lambda h=h: nv.nvmlDeviceGetPowerUsage(h) / 1000.0),
                    (limit, lambda h=h: nv.nvmlDeviceGetPowerManagementLimit(h) / 1000.0),
                    (energy, lambda h=h: nv.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0),
                ):
                    with contextlib.suppress(Exception):  # a query the device does not support
                        metric.add_sample(metric.name, labels, float(read()))
        return [m for m in (util, total, used, power, limit, energy) if m.samples]


class _Cpu:
    def __init__(self):
        try:
            import psutil

            self.psutil = psutil
            psutil.cpu_percent(interval=None)  # prime: the next call measures since now
        except ImportError:
            self.psutil = None

    def collect(self) -> list[Metric]:
        if self.psutil is None:
            return []
        ps = self.psutil
        util = Metric("nv_cpu_utilization", "CPU utilization rate [0.0 - 1.0]", "gauge")
        util.add_sample(util.name, {}, ps.cpu_percent(interval=None) / 100.0)
        vm = ps.virtual_memory()
        total = Metric("nv_cpu_memory_total_bytes", "CPU total memory (RAM), in bytes", "gauge")
        total.add_sample(total.name, {}, float(vm.total))
        used = Metric("nv_cpu_memory_used_bytes", "CPU used memory (RAM), in bytes", "gauge")
        used.add_sample(used.name, {}, float(vm.total - vm.available))
        return [util, total, used]


class MetricsCollector:
    """The prometheus-client Collector for one Engine."""

    def __init__(self, engine: Engine, gpu: bool = True, cpu: bool = True):
        self.engine = engine
        self._gpu = _Nvml() if gpu else None
        self._cpu = _Cpu() if cpu else None
        self._sources: list[Source] = []

    def add_source(self, source: Source) -> None:
        """Add metric families computed at scrape time (e.g. the swap engine's torpor_swap_*)."""
        self._sources.append(source)

    def _model_stats(self):
        """(stats) of every READY version, as the statistics extension lists them."""
        return self.engine.model_stats()

    def collect(self) -> Iterable[Metric]:
        stats = self._model_stats()
        families = {name: Metric(name, doc, kind) for name, doc, kind, _ in _MODEL_METRICS}
        failure = Metric("nv_inference_request_failure",
                         "Number of failed inference requests, all batch sizes", "counter")
        for s in stats:
            labels = {"model": s.name, "version": str(s.version)}
            with s._lock:  # one consistent snapshot per model version
                for name, _, _, get in _MODEL_METRICS:
                    families[name].add_sample(name, labels, float(get(s)))
                for reason, count in s.fail_by_reason.items():
                    failure.add_sample(failure.name, {**labels, "reason": reason}, float(count))
        yield families["nv_inference_request_success"]
        yield failure
        for name, *_ in _MODEL_METRICS[1:]:
            yield families[name]
        if self._gpu is not None:
            yield from self._gpu.collect()
        if self._cpu is not None:
            yield from self._cpu.collect()
        # --- Torpor's own metrics (torpor_swap_* and friends) ----------------------------------
        for source in list(self._sources):
            try:
                yield from source()
            except Exception:
                log.exception("metrics source failed")


# (counter key in DevicePool.counters(), metric name, help, kind, scale)
_SWAP_METRICS = [
    ("swap_ins", "torpor_swap_ins", "Swap-ins of the model's weights to a device (host or peer copies)", "counter", 1),
    ("peer_swap_ins", "torpor_swap_peer_ins", "Swap-ins copied from a peer device", "counter", 1),
    ("bytes_moved", "torpor_swap_bytes", "Bytes of weights copied to devices", "counter", 1),
    ("swap_seconds", "torpor_swap_duration_us", "Cumulative copy time of completed swap-ins in microseconds",
     "counter", 1e6),
    ("hits", "torpor_swap_hits", "Requests that found the model resident and fully arrived", "counter", 1),
    ("joins", "torpor_swap_joins", "Requests that shared a swap-in already in flight", "counter", 1),
    ("misses", "torpor_swap_misses", "Requests that started a swap-in", "counter", 1),
    ("evictions", "torpor_swap_evictions", "Times the model was evicted from a device", "counter", 1),
    ("memory_waits", "torpor_swap_memory_waits", "Requests that waited for device memory", "counter", 1),
    ("timeouts", "torpor_swap_timeouts", "Requests that gave up waiting for device memory", "counter", 1),
]


def swap_metrics(engine: Engine) -> Iterable[Metric]:
    """The swap engine's torpor_* families: per model counters, residency and device memory."""
    if not engine.has_devices():
        return []
    counters = engine.swap_counters()
    families = []
    for key, name, doc, kind, scale in _SWAP_METRICS:
        fam = Metric(name, doc, kind)
        for label, c in counters.items():
            model, _, version = label.rpartition(":")
            fam.add_sample(name, {"model": model, "version": version}, float(c.get(key, 0)) * scale)
        families.append(fam)
    out = [*families, *residency_metrics(engine.residency())]
    topo = engine.topology()
    if topo.get("models") is not None:
        decided = Metric("torpor_scheduler_decisions", "Scheduler decisions per action (run, queue, swap, peer, wait)",
                         "counter")
        slo = Metric("torpor_slo_requests", "Requests with a latency objective, by whether they met it", "counter")
        shed = Metric("torpor_requests_shed", "Requests answered UNAVAILABLE under overload, by when (at arrival or "
                      "when their turn came: queued) and why (late: past their objective; harms: their copy would "
                      "evict a model waiting requests want; stalls: their copy would stall queued requests)",
                      "counter")
        for label, m in topo["models"].items():
            model, _, version = label.rpartition(":")
            for action, n in m["decisions"].items():
                decided.add_sample(decided.name, {"model": model, "version": version, "action": action}, float(n))
            slo.add_sample(slo.name, {"model": model, "version": version, "outcome": "met"}, float(m["slo_met"]))
            slo.add_sample(slo.name, {"model": model, "version": version, "outcome": "missed"}, float(m["slo_missed"]))
            reasons = m.get("shed_reasons", {})
            for when, why in (("arrival", "late"), ("arrival", "harms"), ("queued", "late"), ("queued", "harms"),
                              ("queued", "stalls")):
                shed.add_sample(shed.name, {"model": model, "version": version, "when": when, "reason": why},
                                float(reasons.get(f"{when}:{why}", 0)))
        out += [decided, slo, shed]
    return out


_DEVICE_GAUGES = [  # (report key, metric name, help) per device
    ("capacity_bytes", "torpor_device_memory_capacity_bytes", "Arena bytes for model weights"),
    ("used_bytes", "torpor_device_memory_used_bytes", "Arena bytes holding model weights"),
    ("free_bytes", "torpor_device_memory_free_bytes", "Arena bytes free"),
    ("queue_length", "torpor_device_queue_length", "Requests queued or running on the device"),
    ("predicted_wait_seconds", "torpor_device_predicted_wait_seconds",
     "Seconds until the device could start a new request (the scheduler's backlog, copies included)"),
]
_STATES = ("device", "loading", "host")


def residency_metrics(report: dict) -> list[Metric]:
    """The residency report (Engine.residency, GET /v2/torpor/residency) as gauges: the same
    source the endpoint and a router's NodeView read (docs/metrics.md lists them)."""
    epoch = Metric("torpor_residency_epoch", "Bumped on every residency change (placement, landing, eviction, "
                   "load, unload)", "gauge")
    epoch.add_sample(epoch.name, {}, float(report.get("epoch", 0)))
    per_device = {key: Metric(name, doc, "gauge") for key, name, doc in _DEVICE_GAUGES}
    resident = Metric("torpor_model_resident", "1 while the model's weights have landed on the device", "gauge")
    landing = Metric("torpor_model_landing", "1 while the model's weights are being copied to the device", "gauge")
    for dev in report.get("devices", []):
        labels = {"device": str(dev.get("name", ""))}
        for key, name, _ in _DEVICE_GAUGES:
            value = dev.get("predicted_wait_s") if key == "predicted_wait_seconds" else dev.get(key)
            if value is not None:
                per_device[key].add_sample(name, labels, float(value))
        for m in dev.get("models", []):
            model, _, version = str(m.get("model", "")).rpartition(":")
            gauge = resident if m.get("state") == "resident" else landing
            gauge.add_sample(gauge.name, {"model": model, "version": version, **labels}, 1.0)
    state = Metric("torpor_model_state", "1 for the model's state on this node: device (landed on a device), "
                   "loading (a copy in flight, or loading), host (in host memory only)", "gauge")
    attainment = Metric("torpor_slo_attainment", "Share of the model's requests with an objective that met it over "
                        "the last torpor_slo_window_seconds (shed requests count as missed)", "gauge")
    for m in report.get("models", {}).values():
        labels = {"model": str(m.get("name", "")), "version": str(m.get("version", ""))}
        for st in _STATES:
            state.add_sample(state.name, {**labels, "state": st}, 1.0 if m.get("state") == st else 0.0)
        if m.get("slo_attainment") is not None:
            attainment.add_sample(attainment.name, labels, float(m["slo_attainment"]))
    out = [epoch, *per_device.values(), resident, landing, state, attainment]
    host = report.get("host")
    if host is not None:  # the host store: every device-bound model's weights, pinned where CUDA allows
        for key, name, doc in (("bytes", "torpor_host_memory_bytes", "Host memory holding model weights"),
                               ("pinned_bytes", "torpor_host_memory_pinned_bytes",
                                "Of torpor_host_memory_bytes, page-locked (pinned) for DMA copies to GPUs")):
            g = Metric(name, doc, "gauge")
            g.add_sample(name, {}, float(host.get(key, 0)))
            out.append(g)
    if report.get("slo_window_s") is not None:
        window = Metric("torpor_slo_window_seconds", "The window of torpor_slo_attainment", "gauge")
        window.add_sample(window.name, {}, float(report["slo_window_s"]))
        out.append(window)
    if report.get("slo_attainment") is not None:
        node = Metric("torpor_node_slo_attainment", "torpor_slo_attainment over all the node's models", "gauge")
        node.add_sample(node.name, {}, float(report["slo_attainment"]))
        out.append(node)
    return out


def forward_metrics(engine: Engine) -> list[Metric]:
    """Forward once between nodes (torpor.api.forward): forwards per peer, protocol and outcome,
    requests peers forwarded here, and what this node knows of each peer."""
    state = engine.cluster_state()
    forwards = Metric("torpor_forwards", "Requests forwarded to a peer, by outcome (answered: the peer's answer "
                      "was returned; failed: no answer, served here; refused: the peer answered UNAVAILABLE, "
                      "served here)", "counter")
    received = Metric("torpor_forwarded_in", "Requests a peer forwarded to this node", "counter")
    up = Metric("torpor_peer_up", "1 while the peer's residency report is fresh", "gauge")
    overhead = Metric("torpor_peer_forward_overhead_seconds", "Measured cost of forwarding to the peer: the median "
                      "of the recent forwards' round trips less the peer's own time and report polls' round trips",
                      "gauge")
    for protocol in ("http", "grpc"):
        received.add_sample(received.name, {"protocol": protocol}, float(state["received"].get(protocol, 0)))
    for p in state["peers"]:
        labels = {"peer": p["peer"]}
        up.add_sample(up.name, labels, 1.0 if p["up"] else 0.0)
        if p["overhead_s"] is not None:
            overhead.add_sample(overhead.name, labels, float(p["overhead_s"]))
        for f in p["forwards"]:
            forwards.add_sample(forwards.name, {**labels, "protocol": f["protocol"], "outcome": f["outcome"]},
                                float(f["requests"]))
    return [forwards, received, up, overhead]


def make_registry(engine: Engine, gpu: bool = True, cpu: bool = True) -> tuple[CollectorRegistry, MetricsCollector]:
    registry = CollectorRegistry(auto_describe=False)
    collector = MetricsCollector(engine, gpu=gpu, cpu=cpu)
    collector.add_source(lambda: swap_metrics(engine))
    collector.add_source(lambda: forward_metrics(engine))
    registry.register(collector)
    return registry, collector


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    # integral values as integers, as Triton prints its counters
    if not math.isnan(value) and abs(value) < 2**53 and float(value).is_integer():
        return str(int(value))
    return floatToGoString(value)


def render(registry: CollectorRegistry) -> bytes:
    """Prometheus text exposition (0.0.4), with metric names exactly as collected."""
    lines: list[str] = []
    for metric in registry.collect():
        if not metric.samples:
            continue
        kind = {"unknown": "untyped"}.get(metric.type, metric.type)
        doc = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        lines.append(f"# HELP {metric.name} {doc}\n")
        lines.append(f"# TYPE {metric.name} {kind}\n")
        for s in metric.samples:
            if s.labels:
                labels = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in s.labels.items())
                lines.append(f"{s.name}{{{labels}}} {_number(s.value)}\n")
            else:
                lines.append(f"{s.name} {_number(s.value)}\n")
    return "".join(lines).encode("utf-8")
