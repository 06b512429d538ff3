"""What the engine holds per model and per loaded version: config-derived facts cached at load
(so the infer path does not walk the config), instance slots, statistics, and the gate that
decides whether a version may execute inline on the event loop."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.config import ModelConfig, normalize_config, parameter, sequence_controls, tensor_specs
from torpor.model import ModelFunction, TensorSpec
from torpor.registry.repository import ModelSource
from torpor.stats import ModelStats


@dataclass
class VersionEntry:
    version: int
    state: str = "UNKNOWN"  # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""
    function: ModelFunction | None = None
    stats: ModelStats | None = None
    slots: asyncio.Semaphore | None = None  # one per model instance
    capacity: int = 1  # the slots' count
    pool_key: tuple | None = None  # registered with the DevicePool: runs on a device, late-bound
    gate: InlineGate = field(default_factory=lambda: InlineGate())
    # Requests past the queue (given an instance; a decoupled one until its final response):
    # the rest of `stats.pending` is what Triton's max_queue_size bounds. Host path only.
    executing: int = 0
    # The dynamic batch gathering requests for a host-run model (torpor.dataplane.host_batching)
    open_batch: Any = None


class InlineGate:
    """Decides whether a model's `execute` may run on the event loop itself.

    Why: handing a request to a worker thread costs tens of microseconds of GIL hand-off,
    more than a trivial model's whole execution. A model runs inline only after it has shown,
    over PROBE threaded runs, a mean thread CPU time under THRESHOLD_NS (inflated about 3x on
    a worker thread by cache and GIL effects, so the bar is set above the inline cost) and a
    median wall time under WALL_NS: a model that sleeps or waits on I/O uses little CPU but
    would stall the loop, and its threaded runs show it (the median, because a few runs of a
    cheap model wait long for the GIL on a busy server).

    Inline runs are judged by what the loop loses, wall time, but only where the model is to
    blame: a run over BAILOUT_NS is a strike if it spent that long computing (thread CPU time)
    or gave up the CPU of its own accord (a voluntary context switch: sleep, I/O, a lock).
    A run that was merely preempted, which on a busy machine happens every few hundred runs,
    is not the model's doing. STRIKES strikes within one window of WINDOW inline runs send the
    model back to the thread pool; it is probed again after REPROBE_S (doubling each time) and
    stays on threads for good after MAX_BANS, so a model that can block stalls the loop a
    bounded number of times.
    """

    PROBE = 32
    THRESHOLD_NS = 200_000
    WALL_NS = 1_000_000
    BAILOUT_NS = 2_000_000
    STRIKES = 3
    WINDOW = 256
    REPROBE_S = 30.0
    MAX_BANS = 4

    __slots__ = ("banned", "bans", "inline", "inline_runs", "retry_at", "runs", "strikes", "total_ns", "walls")

    def __init__(self):
        self.runs = 0
        self.total_ns = 0
        self.walls: list[int] = []
        self.inline = False
        self.banned = False
        self.strikes = 0
        self.inline_runs = 0
        self.bans = 0
        self.retry_at = 0.0

    def record(self, cpu_ns: int, wall_ns: int, blocked: bool = False) -> None:
        if self.inline:
            self.inline_runs += 1
            if self.inline_runs >= self.WINDOW:
                self.inline_runs = self.strikes = 0
            if wall_ns > self.BAILOUT_NS and (blocked or cpu_ns > self.BAILOUT_NS // 2):
                self.strikes += 1
                if self.strikes >= self.STRIKES:
                    self.inline, self.banned = False, True
                    self.bans += 1
                    self.retry_at = time.monotonic() + self.REPROBE_S * 2 ** (self.bans - 1)
            return
        if self.banned:
            if self.bans >= self.MAX_BANS or time.monotonic() < self.retry_at:
                return
            self.banned = False
            self.runs = self.total_ns = self.strikes = self.inline_runs = 0
            self.walls = []
        if self.runs >= self.PROBE:
            return
        self.runs += 1
        self.total_ns += cpu_ns
        self.walls.append(wall_ns)
        if self.runs == self.PROBE:
            median_wall = sorted(self.walls)[self.PROBE // 2]
            self.walls = []
            if self.total_ns / self.PROBE < self.THRESHOLD_NS and median_wall < self.WALL_NS:
                self.inline = True


@dataclass
class ModelEntry:
    """A model the repository knows, loaded or not."""

    name: str
    source: ModelSource | None = None
    config: ModelConfig | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    error: str = ""  # a failure before any version could be considered (config, policy)
    override_dir: Path | None = None  # temp folder holding `file:` overrides
    labels: dict[str, list[str]] = field(default_factory=dict)
    active_sequences: set = field(default_factory=set)
    mtime: float = 0.0
    # Derived from the config once (set_config), so the infer path does no config walking.
    input_index: dict[str, TensorSpec] = field(default_factory=dict)
    output_index: dict[str, TensorSpec] = field(default_factory=dict)
    controls: dict[str, tuple[str, Any, str]] = field(default_factory=dict)
    decoupled: bool = False
    max_batch_size: int = 0
    reshaped: tuple[TensorSpec, ...] = ()  # inputs whose config declares a reshape
    required: tuple[str, ...] = ()  # inputs a request must carry

    def set_config(self, config: ModelConfig) -> None:
        # With Triton's load-time defaults filled in (instance groups, version policy, ...), for
        # the config the front ends show; a copy, since the versions' adapters hold `config`.
        config = normalize_config(config)
        self.config = config
        self.inputs, self.outputs = tensor_specs(config)
        self.input_index = {s.name: s for s in self.inputs}
        self.output_index = {s.name: s for s in self.outputs}
        self.controls = sequence_controls(config)
        self.decoupled = bool(config.model_transaction_policy.decoupled)
        self.max_batch_size = int(config.max_batch_size)
        self.reshaped = tuple(s for s in self.inputs if s.reshape is not None)
        self.required = tuple(s.name for s in self.inputs if not s.optional)
        self.max_queue_size = int(config.dynamic_batching.default_queue_policy.max_queue_size)
        # the model's own latency objective (validated at load); the server default applies without it
        raw = parameter(config, "torpor.slo_ms")
        self.slo_ms = float(raw) if raw not in (None, "") else None
        # dynamic batching (on a device's queue, or the host batcher): None (off), else the max
        # queue delay in seconds; a batch is full at the largest preferred size, else max_batch_size
        self.batching = (config.dynamic_batching.max_queue_delay_microseconds / 1e6
                         if config.max_batch_size > 0 and config.HasField("dynamic_batching") else None)
        preferred = [int(p) for p in config.dynamic_batching.preferred_batch_size if 0 < p <= config.max_batch_size]
        self.batch_full_at = max(preferred) if preferred else int(config.max_batch_size)

    def ready_versions(self) -> list[int]:
        return sorted(v for v, e in self.versions.items() if e.state == "READY")
