"""Per-model-version statistics in Triton's statistics-extension shape.

One object per loaded model version holds every counter; the statistics endpoints and the
Prometheus exporter both read it, so the two never disagree.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_dict(self) -> dict:
        return {"count": self.count, "ns": self.ns}


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


# Triton's failure reasons for nv_inference_request_failure{reason=...}
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")


class ModelStats:
    """Counters for one model version. Updated from the event loop and worker threads."""

    def __init__(self, name: str, version: str):
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self.last_inference_ms = 0
        self.inference_count = 0  # inferences, counting each batch element
        self.execution_count = 0  # model executions
        self.success = Duration()  # end to end, per request
        self.fail = Duration()
        self.fail_by_reason = dict.fromkeys(FAILURE_REASONS, 0)
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.batches: dict[int, BatchStats] = {}
        self.pending = 0  # requests accepted and not yet answered
        self.load_duration_s = 0.0
        self.memory_usage: list[dict] = []  # filled by the swap engine: [{"type","id","byte_size"}]

    def record_success(
        self,
        batch_size: int,
        request_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        executed_rows: int | None = None,
    ) -> None:
        """One answered request. It counts an execution unless it rode in another request's
        (`executed_rows` 0); `batch_stats` are Triton's, one entry per execution keyed by the rows
        it ran (`executed_rows`: the whole batch's for the request that counts the execution;
        None: the request's own `batch_size`), with that request's durations."""
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            self.inference_count += batch_size
            rows = batch_size if executed_rows is None else executed_rows
            self.execution_count += 1 if rows else 0
            self.success.add(request_ns)
            self.queue.add(queue_ns)
            self.compute_input.add(input_ns)
            self.compute_infer.add(infer_ns)
            self.compute_output.add(output_ns)
            if not rows:
                return
            b = self.batches.get(rows)
            if b is None:
                b = self.batches[rows] = BatchStats()
            b.compute_input.add(input_ns)
            b.compute_infer.add(infer_ns)
            b.compute_output.add(output_ns)

    def record_failure(self, request_ns: int, reason: str = "OTHER") -> None:
        with self._lock:
            self.last_inference_ms = int(time.time() * 1000)
            self.fail.add(request_ns)
            self.fail_by_reason[reason if reason in self.fail_by_reason else "OTHER"] += 1

    def to_dict(self) -> dict:
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_dict(),
                    "fail": self.fail.to_dict(),
                    "queue": self.queue.to_dict(),
                    "compute_input": self.compute_input.to_dict(),
                    "compute_infer": self.compute_infer.to_dict(),
                    "compute_output": self.compute_output.to_dict(),
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "response_stats": {},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": b.compute_input.to_dict(),
                        "compute_infer": b.compute_infer.to_dict(),
                        "compute_output": b.compute_output.to_dict(),
                    }
                    for size, b in sorted(self.batches.items())
                ],
                "memory_usage": list(self.memory_usage),
            }


def empty_stats(name: str, version: str) -> dict:
    """Statistics of a version that is known but not loaded (Triton reports zeros)."""
    return ModelStats(name, version).to_dict()
