"""`triton_python_backend_utils`' custom metrics: `MetricFamily` / `Metric` (counter, gauge,
histogram, with labels) in a process-wide registry that `torpor serve` exports on the metrics port
(`torpor.adapters.python_backend.custom_metric_families` reads `_metric_families`). Re-exported by
`torpor.adapters.triton_python_backend_utils`, the module models import."""

from __future__ import annotations

import bisect
import enum
import itertools
import re
import threading
import weakref
from typing import Any

from torpor.adapters.triton_python_backend_utils import TritonModelException


class MetricKind(enum.IntEnum):
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


_KIND_NAME = {
    MetricKind.COUNTER: "TRITONSERVER_METRIC_KIND_COUNTER",
    MetricKind.GAUGE: "TRITONSERVER_METRIC_KIND_GAUGE",
    MetricKind.HISTOGRAM: "TRITONSERVER_METRIC_KIND_HISTOGRAM",
}
_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# The server's own families (Triton's nv_*, Torpor's torpor_*): a custom family may not take
# their names (Triton aborts on such a collision; Torpor refuses the prefixes).
RESERVED_METRIC_PREFIXES = ("nv_", "torpor_")


class _Series:
    """The value of one metric (one label set) of a family; shared by every `Metric` object
    made with the same labels, and kept for the life of the server, as in Triton."""

    __slots__ = ("buckets", "count", "counts", "labels", "sum", "value")

    def __init__(self, labels: dict[str, str], buckets: tuple[float, ...] | None):
        self.labels = labels
        self.value = 0.0
        self.buckets = buckets
        self.counts = [0] * len(buckets) if buckets is not None else None
        self.sum = 0.0
        self.count = 0


class _Family:
    __slots__ = ("description", "kind", "name", "series")

    def __init__(self, name: str, description: str, kind: MetricKind):
        self.name, self.description, self.kind = name, description, kind
        self.series: dict[tuple[tuple[str, str], ...], _Series] = {}


# Custom metrics of every python model in the process, by family name (the metrics listener
# exports them: `torpor.adapters.python_backend.custom_metric_families`).
_families: dict[str, _Family] = {}
_metrics_lock = threading.Lock()


def _metric_error(prefix: str, message: str) -> TritonModelException:
    return TritonModelException(f"{prefix}: {message}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, (str, bytes, bytearray)) or value is None:
        raise TypeError(f"{what}(): expected a number, got {type(value).__name__}")
    return float(value)


class Metric:
    """One metric (a label set) of a MetricFamily: `family.Metric(labels=..., buckets=...)`."""

    def __init__(self, family: MetricFamily, series: _Series):
        self._family_ref = weakref.ref(family)
        self._kind = family._family.kind
        self._series = series

    def _live(self, prefix: str) -> _Series:
        if self._family_ref() is None:
            raise TritonModelException(
                f"{prefix}: Invalid metric operation as the corresponding 'MetricFamily' has been deleted. "
                "The 'MetricFamily' object should be deleted AFTER its corresponding 'Metric' objects have "
                "been deleted."
            )
        return self._series

    def _checked(self, op: str, value: float, allowed: tuple) -> tuple[float, Any]:
        """The value and the live series for `op` (Increment, Set, Observe), or Triton's error for
        this kind of metric."""
        prefix = f"Failed to {op.lower()} metric value"
        value = _number(value, op.lower())
        series = self._live(prefix)
        if self._kind not in allowed:
            raise _metric_error(prefix, f"{_KIND_NAME[self._kind]} does not support {op}")
        return value, series

    def increment(self, value: float) -> None:
        """Add `value` (counters: not negative; not for histograms)."""
        value, series = self._checked("Increment", value, (MetricKind.COUNTER, MetricKind.GAUGE))
        if self._kind == MetricKind.COUNTER and value < 0:
            raise _metric_error(
                "Failed to increment metric value",
                "TRITONSERVER_METRIC_KIND_COUNTER can only be incremented monotonically by non-negative values.",
            )
        with _metrics_lock:
            series.value += value

    def set(self, value: float) -> None:
        """Set a gauge's value."""
        value, series = self._checked("Set", value, (MetricKind.GAUGE,))
        with _metrics_lock:
            series.value = value

    def observe(self, value: float) -> None:
        """Record one observation in a histogram."""
        value, series = self._checked("Observe", value, (MetricKind.HISTOGRAM,))
        index = bisect.bisect_left(series.buckets, value)
        with _metrics_lock:
            if index < len(series.counts):
                series.counts[index] += 1
            series.sum += value
            series.count += 1

    def value(self) -> float:
        """A counter's or gauge's current value."""
        prefix = "Failed to get metric value"
        series = self._live(prefix)
        if self._kind == MetricKind.HISTOGRAM:
            raise _metric_error(prefix, f"{_KIND_NAME[self._kind]} does not support Value")
        with _metrics_lock:
            return series.value


class MetricFamily:
    """A custom metric family (COUNTER, GAUGE or HISTOGRAM), exported on the metrics port under
    its own name. Families are process-wide: a second family of the same name and kind is the
    same family (its first description stays); the same name with another kind is refused."""

    COUNTER = MetricKind.COUNTER
    GAUGE = MetricKind.GAUGE
    HISTOGRAM = MetricKind.HISTOGRAM

    def __init__(self, name: str, description: str, kind: MetricKind):
        prefix = "Error when creating MetricFamily"
        try:
            kind = MetricKind(kind)
        except ValueError:
            raise _metric_error(prefix, f"Unknown metric kind {kind!r}") from None
        if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
            raise _metric_error(prefix, "Invalid metric name")
        if name.startswith(RESERVED_METRIC_PREFIXES):
            raise _metric_error(
                prefix, f"metric name '{name}': the prefixes {', '.join(RESERVED_METRIC_PREFIXES)} are the server's"
            )
        with _metrics_lock:
            family = _families.get(name)
            if family is None:
                family = _families[name] = _Family(name, str(description), kind)
            elif family.kind != kind:
                raise _metric_error(prefix, "Family name already exists with different type")
        self._family = family

    def Metric(self, labels: dict | None = None, buckets: list[float] | None = None) -> Metric:
        """The metric of this family with these labels (str -> str); histograms need `buckets`
        (a strictly increasing list of upper bounds)."""
        if labels is None:
            labels = {}
        if not isinstance(labels, dict):
            raise TritonModelException("Failed to create metric. Labels must be a dictionary.")
        kind = self._family.kind
        if kind == MetricKind.HISTOGRAM and buckets is None:
            raise TritonModelException("Failed to create metric. Missing required buckets.")
        if kind != MetricKind.HISTOGRAM and buckets is not None:
            raise TritonModelException("Failed to create metric. Unexpected buckets found.")
        prefix = "Error when creating Metric"
        bounds = None
        if buckets is not None:
            if not isinstance(buckets, list):
                raise TritonModelException("Failed to create metric. Buckets must be a list.")
            bounds = tuple(_number(b, "Metric") for b in buckets)
            if any(a >= b for a, b in itertools.pairwise(bounds)):
                raise _metric_error(prefix, "Bucket Boundaries must be strictly sorted")
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise _metric_error(prefix, "label names and values must be strings")
            if not _LABEL_NAME.fullmatch(key) or key.startswith("__") or (
                kind == MetricKind.HISTOGRAM and key == "le"
            ):
                raise _metric_error(prefix, f"Invalid label name '{key}'")
        key = tuple(sorted(labels.items()))
        with _metrics_lock:
            series = self._family.series.get(key)
            if series is None:
                series = self._family.series[key] = _Series(dict(labels), bounds)
        return Metric(self, series)


def _metric_families() -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    """A consistent snapshot of every custom family: (name, description, kind, samples), each
    sample (sample name, labels, value); histograms as Triton writes them (_count, _sum, then
    cumulative _bucket samples with their `le` bound)."""
    out = []
    with _metrics_lock:
        for family in _families.values():
            samples: list[tuple[str, dict[str, str], float]] = []
            for series in family.series.values():
                if family.kind != MetricKind.HISTOGRAM:
                    samples.append((family.name, series.labels, series.value))
                    continue
                samples.append((family.name + "_count", series.labels, float(series.count)))
                samples.append((family.name + "_sum", series.labels, series.sum))
                running = 0
                for bound, n in zip(series.buckets, series.counts):
                    running += n
                    samples.append((family.name + "_bucket", {**series.labels, "le": _bound(bound)}, float(running)))
                samples.append((family.name + "_bucket", {**series.labels, "le": "+Inf"}, float(series.count)))
            kind = {MetricKind.COUNTER: "counter", MetricKind.GAUGE: "gauge"}.get(family.kind, "histogram")
            out.append((family.name, family.description, kind, samples))
    return out


def _bound(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(value)
