"""Discrete-event simulator: the real Scheduler, CostModel and eviction policies on virtual time.

    result = simulate(load_scenario("loadtest/scenarios/h100x4.json"), policy="torpor")

What is simulated, and how:

- **Devices**: N GPUs, each with a weight budget (bytes; no fragmentation: the block arena's
  fragmentation is bounded by eviction, see `torpor.memory`), one request executing at a time,
  a FIFO queue. Topology is a node template (PCIe per GPU, PCIe-switch siblings, NVLink pairs
  with bandwidths; `torpor.costmodel.LinkMap`) repeated for every `gpus_per_node` GPUs.
- **Transfers**: a copy gets its share of the narrowest link on its path when it starts
  (shared with copies already in flight on those links) and keeps that rate; its first group
  lands after the first group's bytes at that rate. Torpor's scheduler may have a copy wait
  for its path to clear and then move at the path's full rate (`Option.start_s`), holding its
  place on the links meanwhile. Under processor sharing (`SHARED_LINKS`, or
  `TORPOR_SIM_LINKS=shared`) every copy on a link is re-rated as copies start and land; there
  Torpor's scheduler sees when each copy should land if none joins (`ResidentState.eta`), and a
  copy that waits for its path takes no share until then, and later still if copies started
  meanwhile would otherwise be slowed past the deadline of a request waiting on them. A device computing a request whose model
  is still landing starts when the first group has landed and ends no earlier than the last
  group lands (pipelined swap).
- **Execution**: the model's profiled time times lognormal noise (`exec_noise`); each measured
  time refines the CostModel's moving estimate exactly as the engine's measurements do.
- **Batching**: a model with `max_batch` > 1 runs the requests of one model function waiting in
  a device's queue as one batch (up to `max_batch`), taking `exec(1) x (1 + batch_scale x (b-1))`;
  with `max_queue_delay_ms` a short batch at the head of an idle device waits up to that long for
  more (Triton's `max_batch_size` and `dynamic_batching.max_queue_delay_microseconds`).
- **Queue order**: first come, first served for the baselines. Torpor's devices serve their
  queue earliest deadline (arrival + SLO) first, the paper's SLO-aware queue in its simplest
  form: a 6 ms request with a 50 ms objective goes ahead of a 40 ms one with 400 ms to spare. A
  request goes ahead only of queued requests that still finish within their SLO margin
  (`Scheduler.slo_margin`) with it in front; otherwise it queues behind them all. A request the
  scheduler predicts will miss anyway queues behind every one that can still meet its SLO
  (`scheduler.HOPELESS_DELAY_S`). The rule is the server's own (`torpor.admission.work_ahead`,
  which `torpor.placer` calls too); the simulator tells it when the running batch ends and when
  the new request's model would land on each device.
- **Work ahead** (`DeviceState.backlog_s`, what the scheduler is told): the projected end of the
  work queued ahead of the request being placed (all of it in FIFO order; under deadline order,
  what runs now and what is due before it, `torpor.admission.work_ahead`), counting for each
  queued request the wait for its own copy to land, not only execution estimates (a queue of
  cold requests holds a device longer than the sum of their run times).
- **The server's admission** (`Staging`, a scenario's `"staging"` field, or
  `Simulation(..., staging=Staging())`): as `torpor.staging`, `torpor.residency` and the engine
  do it, with `torpor.admission`'s rules. Each device hands out `1 + lookahead` stages in queue
  order (urgent requests at once); only a staged request pins its model and evicts (idle
  residents, those other requests wait for last). A request whose decision is a copy starts it
  at arrival where that evicts only idle models no waiting request wants (`spare_victims`),
  else when it is staged, roughly when the request `lookahead` places ahead of it starts to
  run. Copies to one device go one at a time at the path's full rate (the CPU device's copy
  thread, a CUDA device's copy stream). The scheduler sees when a new request would be staged
  (`DeviceState.stage_in_s`), and, as the server's placer shows it, a model a queued request
  not yet staged will copy in as a resident (pinned, its bytes taken from the free bytes)
  landing by the time that request runs (`torpor.admission.planned_residents`), so later
  requests of that model queue behind it rather than each pricing a copy. With `shed`: a request predicted past its whole SLO is answered
  UNAVAILABLE at arrival, and so is one whose copy would evict a model waiting requests want
  when the work queued there outlasts its slack; a request whose copy would harm or cost
  waiting requests is deferred while it has slack (`harm_level`); when staged, one that can no
  longer be on time, still harms them, or costs them and would stall the device past a queued
  request's guard (`would_delay`) is answered then. The run reports `shed_arrival`,
  `shed_queued` and, with `max_outstanding`, arrivals the client `dropped`. Without it (the
  default) copies start at placement and nothing is shed: the model the README's simulator
  numbers were measured with.
- **Decisions**: `torpor.scheduler.Scheduler.place` on a `Snapshot` the simulator keeps up to
  date (device states are the simulator's own state objects, not copies); eviction order from
  `torpor.eviction` (CostAwarePolicy for "torpor", LRUPolicy for "lru-swap"). When no device
  can make room (everything pinned), the request waits and is retried when work finishes.
- **Workload** (`make_arrivals`, below): the paper's trace turned into arrivals as its README
  says, or a synthetic generator with the trace's statistics (optionally Zipf, on/off bursts,
  diurnal).

Nothing here imports torch: it runs on any machine with numpy.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .admission import (
    FREE,
    HARMS,
    defer_deadline,
    deferred,
    harm_level,
    outlasted,
    planned_residents,
    shed_at_arrival,
    shed_when_staged,
    spare_victims,
    stage_at_once,
    stage_level,
    stage_next,
    victim_order,
    work_ahead,
    would_delay,
)
from .costmodel import GB, CostModel, ExecEstimator, LinkMap, TopologyError
from .eviction import Candidate, RateMeter
from .scheduler import (
    HOPELESS_DELAY_S,
    POLICIES,
    DeviceState,
    ModelInfo,
    ResidentState,
    Scheduler,
    Snapshot,
    hopeless,
    static_assignment,
)

MB = 1e6


class ScenarioError(ValueError):
    """A scenario file with a bad value; the message names the field."""


# ------------------------------------------------------------------------------------------------
# Scenario
# ------------------------------------------------------------------------------------------------


DEFAULT_BATCH_SCALE = 0.25  # assumed: each extra request in a batch adds a quarter of a batch-1 run


@dataclass
class ModelSpec:
    name: str
    nbytes: int
    exec_s: float
    slo_s: float
    first_group_bytes: int
    max_batch: int = 1  # 1: no batching
    max_queue_delay_s: float = 0.0  # dynamic batching: how long a short batch may wait for more
    batch_scale: float = DEFAULT_BATCH_SCALE  # exec(b) = exec(1) * (1 + batch_scale * (b - 1))

    def exec_seconds(self, batch: int = 1) -> float:
        return self.exec_s * (1.0 + self.batch_scale * (batch - 1))


@dataclass(frozen=True)
class Staging:
    """The server's admission on the simulator's devices (`torpor.staging`, `torpor.placer`):
    a device hands out `slots + lookahead` stages in queue order, and only a staged request
    takes memory, evicts and starts its copy; copies to one device go one at a time, at the
    path's full rate (the CPU device's copy thread, a CUDA device's copy stream). With `shed`,
    a request predicted past its whole SLO is answered at arrival, one that can no longer be on
    time when its turn comes is answered then, and one whose copy would evict a model other
    requests wait for is deferred (`torpor.admission`). None on a scenario: copies start when
    the request is placed and nothing is shed (the simulator's original model)."""

    lookahead: int = 1
    shed: bool = True
    # seconds between a run's end on the device and the server's event loop acting on it
    # (answering, unpinning, giving the stage back, staging the next); the device's worker
    # goes on with the next staged request meanwhile. 0: at once
    release_s: float = 0.0
    # seconds from a staged request taking memory to its copy's first byte moving (the server's
    # swap-in on its event loop, the copy thread waking); 0: at once
    copy_delay_s: float = 0.0


@dataclass
class Scenario:
    name: str
    gpus: int
    gpu_memory: int
    gpus_per_node: int
    node: dict[str, Any]
    models: list[ModelSpec]
    functions: int
    workload: dict[str, Any]
    policies: list[str]
    exec_noise: float = 0.05
    seed: int = 0
    search_gpus: int = 0  # >0: find the fewest GPUs (up to this many) reaching `target_attainment`
    target_attainment: float = 0.99
    notes: str = ""
    source: str = ""
    sweep: tuple[str, list[float]] | None = None  # (parameter, values): run every policy at each
    weight_fraction: float = 1.0  # of each GPU's memory, what model weights may use
    staging: Staging | None = None  # the server's staging and shedding (None: copies start at placement)

    @property
    def weight_budget(self) -> int:
        return int(self.gpu_memory * self.weight_fraction)

    def links(self, n_gpus: int) -> LinkMap:
        return build_links(self.node, self.gpus_per_node, n_gpus)


def _num(spec: dict, key: str, where: str, *, positive: bool = True, default: Any = None, integer: bool = False):
    v = spec.get(key, default)
    if v is None:
        raise ScenarioError(f"{where}.{key}: required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ScenarioError(f"{where}.{key}: expected a number, got {v!r}")
    if integer and int(v) != v:
        raise ScenarioError(f"{where}.{key}: expected an integer, got {v!r}")
    if positive and v <= 0:
        raise ScenarioError(f"{where}.{key}: must be positive, got {v!r}")
    if not positive and v < 0:
        raise ScenarioError(f"{where}.{key}: must not be negative, got {v!r}")
    return int(v) if integer else float(v)


def load_profiles(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def parse_scenario(spec: dict[str, Any], *, base: Path | None = None, source: str = "scenario") -> Scenario:
    """Validate a scenario dict (see loadtest/scenarios/README.md); errors name the field."""
    where = "scenario"
    known = {"name", "gpus", "gpu_memory_GB", "gpus_per_node", "node", "models", "profile", "functions",
             "workload", "policies", "exec_noise", "seed", "search_gpus", "target_attainment", "notes", "sweep",
             "weight_fraction", "staging"}
    unknown = set(spec) - known
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}")
    gpus = _num(spec, "gpus", where, integer=True)
    mem = int(_num(spec, "gpu_memory_GB", where) * GB)
    frac = _num(spec, "weight_fraction", where, default=1.0)
    if frac > 1:
        raise ScenarioError(f"{where}.weight_fraction: must be at most 1, got {frac}")
    budget = int(mem * frac)
    per_node = _num(spec, "gpus_per_node", where, integer=True, default=gpus)
    node = spec.get("node", {}) or {}
    if not isinstance(node, dict):
        raise ScenarioError(f"{where}.node: expected an object")
    try:
        build_links(node, per_node, gpus)
    except TopologyError as e:
        raise ScenarioError(f"{where}.{e}") from None
    # the model mix: inline, or a key into a profile file
    models_spec = spec.get("models")
    if models_spec is None:
        prof = spec.get("profile")
        if not isinstance(prof, str) or "#" not in prof:
            raise ScenarioError(f"{where}.profile: expected 'FILE#KEY' (or give 'models' inline), got {prof!r}")
        file, _, key = prof.partition("#")
        p = Path(file)
        if not p.is_absolute() and base is not None:
            p = base / p
        try:
            profiles = load_profiles(p)
        except OSError as e:
            raise ScenarioError(f"{where}.profile: cannot read {p}: {e}") from None
        if key not in profiles:
            raise ScenarioError(f"{where}.profile: no profile {key!r} in {p} (has {sorted(profiles)})")
        models_spec = profiles[key].get("models")
        models_where = f"{where}.profile {prof!r}: models"
    else:
        models_where = f"{where}.models"
    if not isinstance(models_spec, list) or not models_spec:
        raise ScenarioError(f"{models_where}: expected a non-empty list")
    models = []
    for i, m in enumerate(models_spec):
        w = f"{models_where}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise ScenarioError(f"{w}.name: required (a string)")
        nbytes = int(_num(m, "size_MB", w) * MB)
        if nbytes > budget:
            raise ScenarioError(f"{w}.size_MB: model {m['name']!r} ({m['size_MB']} MB) is larger than every GPU "
                                f"(weight budget {budget / GB:g} GB: gpu_memory_GB x weight_fraction)")
        unknown_m = set(m) - {"name", "size_MB", "exec_ms", "slo_ms", "first_group_MB", "max_batch",
                              "max_queue_delay_ms", "batch_scale"}
        if unknown_m:
            raise ScenarioError(f"{w}: unknown field(s) {sorted(unknown_m)}")
        models.append(ModelSpec(
            m["name"], nbytes, _num(m, "exec_ms", w) / 1e3, _num(m, "slo_ms", w) / 1e3,
            int(_num(m, "first_group_MB", w, default=2.0) * MB),
            max_batch=_num(m, "max_batch", w, integer=True, default=1),
            max_queue_delay_s=_num(m, "max_queue_delay_ms", w, positive=False, default=0.0) / 1e3,
            batch_scale=_num(m, "batch_scale", w, positive=False, default=DEFAULT_BATCH_SCALE),
        ))
    policies = spec.get("policies", list(POLICIES))
    if not isinstance(policies, list) or not policies:
        raise ScenarioError(f"{where}.policies: expected a non-empty list")
    for i, p in enumerate(policies):
        if p not in POLICIES:
            raise ScenarioError(f"{where}.policies[{i}]: unknown policy {p!r}; expected one of {list(POLICIES)}")
    workload = spec.get("workload", {}) or {}
    if not isinstance(workload, dict):
        raise ScenarioError(f"{where}.workload: expected an object")
    target = _num(spec, "target_attainment", where, default=0.99)
    if target > 1:
        raise ScenarioError(f"{where}.target_attainment: must be at most 1, got {target}")
    staging = parse_staging(spec.get("staging"), f"{where}.staging")
    return Scenario(
        name=str(spec.get("name", source)),
        gpus=gpus,
        gpu_memory=mem,
        gpus_per_node=per_node,
        node=node,
        models=models,
        functions=_num(spec, "functions", where, integer=True),
        workload=workload,
        policies=list(policies),
        exec_noise=_num(spec, "exec_noise", where, positive=False, default=0.05),
        seed=_num(spec, "seed", where, positive=False, integer=True, default=0),
        search_gpus=_num(spec, "search_gpus", where, positive=False, integer=True, default=0),
        target_attainment=target,
        notes=str(spec.get("notes", "")),
        source=source,
        sweep=None if spec.get("sweep") is None else parse_sweep(spec["sweep"], f"{where}.sweep"),
        weight_fraction=frac,
        staging=staging,
    )


def parse_staging(value: Any, where: str = "staging") -> Staging | None:
    """`{"lookahead": 1, "shed": true, "release_ms": 0, "copy_delay_ms": 0}` (all optional), or
    null/absent for none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected an object, got {value!r}")
    unknown = set(value) - {"lookahead", "shed", "release_ms", "copy_delay_ms"}
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}")
    lookahead = _num(value, "lookahead", where, positive=False, integer=True, default=1)
    shed = value.get("shed", True)
    if not isinstance(shed, bool):
        raise ScenarioError(f"{where}.shed: expected true or false, got {shed!r}")
    release_ms = _num(value, "release_ms", where, positive=False, default=0.0)
    copy_delay_ms = _num(value, "copy_delay_ms", where, positive=False, default=0.0)
    return Staging(lookahead, shed, release_ms / 1e3, copy_delay_ms / 1e3)


SWEEP_PARAMS = ("functions", "rate_scale", "gpus")


def parse_sweep(value: Any, where: str = "sweep") -> tuple[str, list[float]]:
    """`"functions=300:600:50"` (start:stop:step, stop included), `"rate_scale=1,1.5,2"`, or
    `{"param": "functions", "values": [300, 400]}`; the parameter is one of SWEEP_PARAMS."""
    if isinstance(value, str):
        param, eq, rng = value.partition("=")
        if not eq:
            raise ScenarioError(f"{where}: expected PARAM=START:STOP:STEP or PARAM=V1,V2,..., got {value!r}")
        try:
            if ":" in rng:
                parts = [float(x) for x in rng.split(":")]
                if len(parts) != 3:
                    raise ValueError
            else:
                values = [float(x) for x in rng.split(",")]
        except ValueError:
            raise ScenarioError(f"{where}: bad values {rng!r} (START:STOP:STEP or V1,V2,...)") from None
        if ":" in rng:
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ScenarioError(f"{where}: need START <= STOP and STEP > 0, got {rng!r}")
            n = math.floor((stop - start) / step + 1e-9) + 1
            values = [start + i * step for i in range(n)]
    elif isinstance(value, dict):
        unknown = set(value) - {"param", "values"}
        if unknown:
            raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}")
        param, values = value.get("param"), value.get("values")
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ScenarioError(f"{where}.values: expected a non-empty list of numbers, got {values!r}")
    else:
        raise ScenarioError(f"{where}: expected a string or an object, got {value!r}")
    param = str(param).strip()
    if param not in SWEEP_PARAMS:
        raise ScenarioError(f"{where}: unknown parameter {param!r}; expected one of {list(SWEEP_PARAMS)}")
    if param != "rate_scale":
        if any(v != int(v) for v in values):
            raise ScenarioError(f"{where}: {param} takes whole numbers, got {values}")
        values = [int(v) for v in values]
    if any(v <= 0 for v in values):
        raise ScenarioError(f"{where}: values must be positive, got {values}")
    return param, list(values)


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise ScenarioError(f"scenario {p}: not valid JSON: {e}") from None
    return parse_scenario(spec, base=p.parent, source=str(p))


def build_links(node: dict[str, Any], per_node: int, n_gpus: int) -> LinkMap:
    """The node template repeated over `n_gpus` GPUs (the last node may be partial)."""
    names = [f"gpu{i}" for i in range(n_gpus)]
    nodes = -(-n_gpus // per_node)
    pcie_t = node.get("pcie_GBps", 25.0)
    if not isinstance(pcie_t, list):  # one value for every GPU: name the field, not an expanded index
        LinkMap.from_dict(["gpu0"], {"pcie_GBps": pcie_t}, where="node")
    spec: dict[str, Any] = {k: v for k, v in node.items() if k in ("switch_GBps", "nvlink_GBps")}
    pcie = []
    for i in range(n_gpus):
        pcie.append(pcie_t[i % per_node] if isinstance(pcie_t, list) and len(pcie_t) == per_node else pcie_t)
    if isinstance(pcie_t, list) and len(pcie_t) != per_node:
        raise TopologyError(f"node.pcie_GBps: {len(pcie_t)} values for {per_node} GPUs per node")
    spec["pcie_GBps"] = pcie if all(isinstance(x, (int, float)) for x in pcie) else pcie_t

    def shift(items: list, n: int, key: str) -> list:
        out = []
        for i, it in enumerate(items or []):
            if not isinstance(it, list):
                raise TopologyError(f"node.{key}[{i}]: expected a list")
            idx = [x for x in it if isinstance(x, int) and not isinstance(x, bool)]
            bad = [x for x in it[:2 if key != "switches" else None] if not isinstance(x, int) or isinstance(x, bool)
                   or not 0 <= x < per_node]
            if bad:
                raise TopologyError(f"node.{key}[{i}]: GPU indices must be 0..{per_node - 1}, got {bad}")
            del idx
            if key == "switches":
                g = [n * per_node + x for x in it if n * per_node + x < n_gpus]
                if g:
                    out.append(g)
            else:
                a, b = n * per_node + it[0], n * per_node + it[1]
                if a < n_gpus and b < n_gpus:
                    out.append([a, b, *it[2:]])
        return out

    for key in ("switches", "nvlink", "p2p"):
        if key in node:
            spec[key] = [x for n in range(nodes) for x in shift(node[key], n, key)]
    unknown = set(node) - {"pcie_GBps", "switches", "switch_GBps", "nvlink", "nvlink_GBps", "p2p"}
    if unknown:
        raise TopologyError(f"node: unknown field(s) {sorted(unknown)}")
    return LinkMap.from_dict(names, spec, where="node")


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------

DEFAULT_TRACE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "torpor-trace-samples.npy"
TRACE_MINUTE_S = 60.0


class WorkloadError(ValueError):
    """A bad workload field; the message starts with the field's name."""


def load_trace(path: str | Path | None = None) -> np.ndarray:
    """The (functions x minutes) count matrix (see ../shared/data/README.md); no pickle."""
    p = Path(path) if path else DEFAULT_TRACE
    if p.is_dir():
        p = p / "torpor-trace-samples.npy"
    try:
        a = np.load(p, allow_pickle=False)
    except OSError as e:
        raise WorkloadError(f"trace: cannot read {p}: {e} (use a synthetic workload without it)") from None
    if a.ndim != 2 or a.min() < 0:
        raise WorkloadError(f"trace: {p} is not a (functions x minutes) count matrix")
    return a.astype(np.int64)


def trace_counts(trace: np.ndarray, functions: int, minutes: int, rng: np.random.Generator) -> np.ndarray:
    """N rows drawn from the trace (with replacement only when N exceeds its rows); minutes past
    its end wrap around. Returns (functions x minutes)."""
    rows = rng.choice(trace.shape[0], size=functions, replace=functions > trace.shape[0])
    cols = np.arange(minutes) % trace.shape[1]
    return trace[rows][:, cols]


def synthetic_counts(functions: int, minutes: int, rng: np.random.Generator, *, mean_per_min: float = 9.8,
                     mean_spread: tuple[float, float] = (4.9, 14.4), minute_cv: float = 0.30, zipf: float = 0.0,
                     burst_on_frac: float = 1.0, burst_mean_min: float = 5.0, diurnal_amplitude: float = 0.0
                     ) -> np.ndarray:
    """Per-minute counts with the trace's statistics by default: per-function means spread
    uniformly over [4.9, 14.4]/min (the trace's range; mean 9.8), and minute-to-minute
    variation of a Poisson count around a gamma-distributed rate with coefficient of variation
    `minute_cv` (0.30 with the Poisson noise gives the trace's ~0.44 per-function CV).
    Options: `zipf` > 0 gives function i a mean proportional to 1/(i+1)^zipf (same total);
    `burst_on_frac` < 1 makes each function alternate on/off periods (exponential, mean
    `burst_mean_min` minutes on) with the rate raised while on to keep the mean; `diurnal_amplitude`
    in [0, 1) scales the whole load by 1 + a*sin over one period across the run."""
    if zipf > 0:
        w = 1.0 / np.arange(1, functions + 1) ** zipf
        means = w / w.mean() * mean_per_min
        rng.shuffle(means)
    else:
        lo, hi = mean_spread
        means = rng.uniform(lo, hi, size=functions)
        means *= mean_per_min / means.mean()
    shape = 1.0 / minute_cv**2 if minute_cv > 0 else None
    rate = np.repeat(means[:, None], minutes, axis=1)
    if shape is not None:
        rate = rate * rng.gamma(shape, 1.0 / shape, size=rate.shape)
    if burst_on_frac < 1.0:
        on = np.zeros((functions, minutes), dtype=bool)
        off_mean = burst_mean_min * (1 - burst_on_frac) / burst_on_frac
        for f in range(functions):
            t, state = 0.0, rng.random() < burst_on_frac
            while t < minutes:
                length = rng.exponential(burst_mean_min if state else off_mean)
                a, b = int(t), int(min(minutes, math.ceil(t + length)))
                if state:
                    on[f, a:b] = True
                t += max(length, 1.0)
                state = not state
        rate = rate * on / burst_on_frac
    if diurnal_amplitude:
        rate = rate * (1.0 + diurnal_amplitude * np.sin(2 * np.pi * np.arange(minutes) / minutes))[None, :]
    return rng.poisson(rate)


def counts_to_arrivals(counts: np.ndarray, rng: np.random.Generator, scale: float = 1.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The paper's harness: for each minute, exponential gaps of mean 60 s / (that minute's total
    x scale) across the minute, each arrival given to a function with probability proportional
    to its count in that minute. Returns (times in seconds, function index), sorted by time."""
    ts, fs = [], []
    for m in range(counts.shape[1]):
        col = counts[:, m]
        total = float(col.sum()) * scale
        if total <= 0:
            continue
        gaps = rng.exponential(TRACE_MINUTE_S / total, size=int(total * 1.3 + 30))
        t = np.cumsum(gaps)
        while t[-1] < TRACE_MINUTE_S:
            t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(TRACE_MINUTE_S / total, size=int(total) + 30))])
        t = t[t < TRACE_MINUTE_S]
        ts.append(m * TRACE_MINUTE_S + t)
        fs.append(rng.choice(len(col), size=len(t), p=col / col.sum()))
    if not ts:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(ts), np.concatenate(fs).astype(np.int64)


def make_arrivals(workload: dict[str, Any], functions: int, *, seed: int = 0,
                  trace_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """From a scenario's workload section: {"kind": "trace" | "synthetic", "duration_s": 1800,
    "rate_scale": 1.0, "trace": path, plus synthetic_counts' options}. (times, fns, duration)."""
    known = {"kind", "duration_s", "rate_scale", "trace", "mean_per_min", "minute_cv", "zipf",
             "burst_on_frac", "burst_mean_min", "diurnal_amplitude"}
    unknown = set(workload) - known
    if unknown:
        raise WorkloadError(f"{min(unknown)}: unknown field (expected {sorted(known)})")
    kind = workload.get("kind", "trace")
    duration = workload.get("duration_s", 1800)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
        raise WorkloadError(f"duration_s: must be a positive number of seconds, got {duration!r}")
    scale = workload.get("rate_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise WorkloadError(f"rate_scale: must be positive, got {scale!r}")
    minutes = math.ceil(duration / TRACE_MINUTE_S)
    rng = np.random.default_rng(seed)
    if kind == "trace":
        counts = trace_counts(load_trace(trace_path or workload.get("trace")), functions, minutes, rng)
    elif kind == "synthetic":
        opts = {k: workload[k] for k in ("mean_per_min", "minute_cv", "zipf", "burst_on_frac", "burst_mean_min",
                                         "diurnal_amplitude") if k in workload}
        for k, v in opts.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise WorkloadError(f"{k}: must be a non-negative number, got {v!r}")
        if "burst_on_frac" in opts and not 0 < opts["burst_on_frac"] <= 1:
            raise WorkloadError(f"burst_on_frac: must be in (0, 1], got {opts['burst_on_frac']!r}")
        counts = synthetic_counts(functions, minutes, rng, **opts)
    else:
        raise WorkloadError(f"kind: unknown workload kind {kind!r}; expected 'trace' or 'synthetic'")
    t, fn = counts_to_arrivals(counts, rng, float(scale))
    keep = t < duration
    return t[keep], fn[keep], float(duration)


# ------------------------------------------------------------------------------------------------
# Simulation
# ------------------------------------------------------------------------------------------------

class Transfer:
    """One copy in flight (see `LinkSharing`). `end` is when it lands at the current rates."""

    __slots__ = ("end", "left", "owner", "path", "pending", "rate", "t", "version")

    def __init__(self, path: tuple[str, ...], nbytes: float, now: float, owner: Any):
        self.path = path
        self.left = float(nbytes)  # bytes still to move, as of `t`
        self.rate = 0.0
        self.t = now
        self.end = now
        self.version = 0
        self.owner = owner
        self.pending = False  # waiting for its path to clear (processor sharing: not moving yet)

    def left_at(self, now: float) -> float:
        """Bytes still to move at `now`, at the rate it has (all of them while it waits)."""
        return self.left if self.pending else max(0.0, self.left - self.rate * (now - self.t))


class LinkSharing:
    """Copies in flight sharing links by processor sharing, the physics both simulators use.

    Every copy moves at the narrowest share on its path, `min(bw[l] / n[l])` over its links,
    where `n[l]` counts the copies on link `l`; whenever a copy starts or lands the copies
    sharing a link with it are re-rated, so a copy that started beside another speeds up when
    the other lands (DMA engines and PCIe switches share bandwidth among the copies active at
    each moment; a rate fixed at the start over-commits a link when a later copy joins it and
    leaves bandwidth idle when an earlier one leaves). A copy lands `latency_s` after its last
    byte moves. `counts` is the live per-link count (`Snapshot.inflight`); `get(link)` gives
    the bytes each copy still has to move at `now` (`Snapshot.inflight_bytes`)."""

    def __init__(self, links: LinkMap, latency_s: float, counts: dict[str, int] | None = None,
                 shared: bool = True):
        self.shared = shared
        self.links = links
        self.latency_s = latency_s
        self.counts: dict[str, int] = {} if counts is None else counts
        self.on: dict[str, list[Transfer]] = {}
        self.waiting: dict[str, list[Transfer]] = {}  # processor sharing: copies not started yet
        self.now = 0.0
        self.slack: dict[int, float] = {}

    def _rerate(self, trs: list[Transfer], now: float) -> None:
        bw, on = self.links.bandwidth, self.on
        for tr in trs:
            tr.rate = min(bw(lk) / len(on[lk]) for lk in tr.path)
            tr.end = now + (self.latency_s + tr.left / tr.rate)  # the same sum as CostModel.transfer_seconds
            tr.version += 1

    def _full_rate(self, path: tuple[str, ...]) -> float:
        return min(self.links.bandwidth(lk) for lk in path)

    def _touching(self, path: tuple[str, ...], now: float) -> list[Transfer]:
        seen: dict[int, Transfer] = {}
        for lk in path:
            for tr in self.on.get(lk, ()):
                seen[id(tr)] = tr
        out = list(seen.values())
        for tr in out:  # bytes moved at the old rate up to now
            tr.left = tr.left_at(now)
            tr.t = now
        return out

    def start(self, now: float, nbytes: float, path: tuple[str, ...], owner: Any = None,
              begin: float | None = None) -> tuple[Transfer, list[Transfer]]:
        """A new copy; returns it and every copy whose landing time changed (itself included).
        `begin`: the copy waits for its path to clear and moves from then at the path's full
        bandwidth (`CostModel.copy_plan`). Fixed shares: it holds its place on the links from
        now, so copies started meanwhile count it when they take their share. Processor
        sharing: it takes no share and slows nobody until the caller calls `activate` (or
        `postpone`, where it `would_harm` copies started meanwhile); `get` and `clear_at`
        count it meanwhile."""
        affected = self._touching(path, now) if self.shared else []
        tr = Transfer(path, nbytes, now, owner)
        for lk in path:
            self.on.setdefault(lk, []).append(tr)
            self.counts[lk] = self.counts.get(lk, 0) + 1
        if begin is not None and begin > now and not self.shared:
            tr.rate = self._full_rate(path)
            tr.t = begin
            tr.end = begin + (self.latency_s + tr.left / tr.rate)
            tr.version += 1
            return tr, [tr]
        if begin is not None and begin > now:
            # processor sharing: it moves nothing, and takes no share, until the caller calls
            # `activate` at `begin`; until then it counts as landing at full rate from `begin`
            for lk in path:
                self.on[lk].remove(tr)
                self.waiting.setdefault(lk, []).append(tr)
            tr.pending = True
            tr.t = begin
            tr.end = begin + (self.latency_s + tr.left / self._full_rate(path))
            tr.version += 1
            return tr, [tr]
        affected.append(tr)
        self._rerate(affected, now)
        return tr, affected

    def busy_until(self, path: tuple[str, ...], now: float) -> float:
        """When the copies moving on `path` now should all have landed (processor sharing, none
        joining): the latest over its links of the bytes they have left at the link's bandwidth;
        `now` where nothing moves there. Copies waiting to start are not counted."""
        t = now
        for lk in path:
            trs = self.on.get(lk)
            if trs:
                left = sum(o.left_at(now) for o in trs)
                t = max(t, now + self.latency_s + left / self.links.bandwidth(lk))
        return t

    def would_harm(self, tr: Transfer, now: float) -> bool:
        """Whether starting `tr` now would delay a copy moving on its path past its slack
        (`self.slack`, as the caller last set it): sharing link l it lands min(its bytes left,
        tr's bytes) / bw[l] later (`CostModel.delays`)."""
        slack = self.slack
        for lk in tr.path:
            bw = self.links.bandwidth(lk)
            for o in self.on.get(lk, ()):
                s = slack.get(id(o.owner[1]), math.inf) if o.owner is not None else math.inf
                if s < math.inf and min(o.left_at(now), tr.left) / bw > s:
                    return True
        return False

    def postpone(self, tr: Transfer, begin: float) -> list[Transfer]:
        """A copy waiting to start (`start(begin=...)`) waits until `begin` instead; returns it
        (its landing moved)."""
        tr.t = begin
        tr.end = begin + (self.latency_s + tr.left / self._full_rate(tr.path))
        tr.version += 1
        return [tr]

    def activate(self, tr: Transfer, now: float) -> list[Transfer]:
        """A copy that waited (`start(begin=...)`, processor sharing) starts moving now; returns
        every copy whose landing time changed (itself included)."""
        if not tr.pending:
            return []
        tr.pending = False
        for lk in tr.path:
            self.waiting[lk].remove(tr)
        affected = self._touching(tr.path, now)
        for lk in tr.path:
            self.on.setdefault(lk, []).append(tr)
        tr.t = now
        affected.append(tr)
        self._rerate(affected, now)
        return affected

    def eta(self, tr: Transfer, now: float) -> float:
        """When `tr` lands if no further copy joins its links (`CostModel.transfer_seconds`'s
        estimate for the bytes it has left): every copy beside it with fewer bytes left lands
        first and frees its share. Its `end` is the landing at the rate it has now."""
        if tr.pending:
            return tr.end
        left = tr.left_at(now)
        worst = 0.0
        bw = self.links.bandwidth
        for lk in tr.path:
            ahead = 0.0
            for o in self.on.get(lk, ()):
                if o is not tr:
                    ahead += min(o.left_at(now), left)
            worst = max(worst, (left + ahead) / bw(lk))
        return min(tr.end, now + self.latency_s + worst)

    def clear_at(self, link: str) -> float:
        """When every copy now on `link` will have landed (`Snapshot.link_clear`). Processor
        sharing: the bytes they have left at the link's bandwidth from `self.now` (set by the
        caller), or the end of a copy waiting to start there, whichever is later."""
        if not self.shared:
            return max((tr.end for tr in self.on.get(link, ())), default=-math.inf)
        trs, waiting = self.on.get(link), self.waiting.get(link)
        if not trs and not waiting:
            return -math.inf
        now = self.now
        t = -math.inf
        if trs:
            left = sum(tr.left_at(now) for tr in trs)
            t = now + self.latency_s + left / self.links.bandwidth(link)
        for tr in waiting or ():
            t = max(t, tr.end)
        return t

    def finish(self, tr: Transfer, now: float) -> list[Transfer]:
        """`tr` has landed; returns the copies re-rated because it left."""
        for lk in tr.path:
            (self.waiting if tr.pending else self.on)[lk].remove(tr)
            self.counts[lk] -= 1
        tr.left = 0.0
        if not self.shared:
            return []
        affected = self._touching(tr.path, now)
        self._rerate(affected, now)
        return affected

    def get(self, link: str, default: Any = ()) -> list[tuple[float, float]]:
        """(bytes still to move, slack) for each copy on `link` at `self.now` (set by the caller):
        slack is how much later the copy may land before a request waiting on it misses its
        deadline, `self.slack[id(owner[1])]` where the caller set it, else unbounded."""
        trs = self.on.get(link)
        waiting = self.waiting.get(link)
        if waiting:
            trs = [*(trs or ()), *waiting]  # a copy waiting to start will share the link with it
        if not trs:
            return list(default)
        now, slack = self.now, self.slack
        return [(tr.left_at(now),
                 slack.get(id(tr.owner[1]), math.inf) if tr.owner is not None else math.inf) for tr in trs]


_DONE, _LANDED, _WAKE, _BEGIN, _COPIED, _STAGE, _RELEASE = 0, 1, 2, 3, 4, 5, 6


def _links_from_env() -> bool:
    """`TORPOR_SIM_LINKS=shared` (processor sharing) or `fixed` (the default: a copy keeps the
    share it started with); read once at import, `SHARED_LINKS` may be set after that."""
    v = os.environ.get("TORPOR_SIM_LINKS", "fixed").strip().lower()
    if v not in ("shared", "fixed", ""):
        raise ValueError(f"TORPOR_SIM_LINKS: expected 'shared' or 'fixed', got {v!r}")
    return v == "shared"


# The link physics of both simulators (this one and `torpor.paper_sim`), read when a simulation
# is built: False, fixed shares; True, processor sharing (`LinkSharing`).
SHARED_LINKS = _links_from_env()
LATENCY_PCTS = [*range(0, 90, 2), *np.round(np.arange(90, 100, 0.25), 2).tolist(), 99.5, 99.9, 100]
_RETRIES = 4
# what became of each request (`Simulation.status`)
ANSWERED, SHED_ARRIVAL, SHED_QUEUED, DROPPED, UNSERVED = 0, 1, 2, 3, 4
_ACTION_CODE = {"run": 1, "queue": 2, "swap": 3, "peer": 4}


class _Job:
    """A request admitted to a device; what `torpor.admission` reads of it (`Queued`) are the
    same fields as the server's `torpor.placer.Ticket`."""

    __slots__ = ("arrival", "copy_s", "defer_until", "due", "enqueued", "estimate", "first_at", "fn", "guard",
                 "key", "meets_pred", "passed", "ready", "resident", "rid", "source", "staged", "started_at",
                 "transfer")

    def __init__(self, rid: int, fn: int, arrival: float, estimate: float, resident: ResidentState | None,
                 meets_pred: bool, enqueued: float = 0.0, first_at: float = 0.0, due: float = math.inf):
        self.rid = rid
        self.fn = fn
        self.arrival = arrival
        self.estimate = estimate  # seconds of device time it adds (a batch member: less than a run)
        self.resident = resident  # its model on the device (None: not staged yet, no copy started)
        self.meets_pred = meets_pred
        self.enqueued = enqueued
        self.first_at = first_at  # when its model's first group lands on the device
        self.due = due  # arrival + SLO
        self.key = math.inf  # its place in a deadline-ordered queue (its deadline, or behind all)
        self.guard = math.inf  # arrival + SLO x the scheduler's margin: no one may push it past that
        self.ready = 0.0  # before it holds its model: when the plan lands it (0: resident)
        self.transfer = 0.0  # seconds its copy takes once it starts (0: none planned)
        self.staged = resident is not None
        self.started_at: float | None = None
        # staging (`Simulation.staging`): where its copy comes from (a peer device, else the
        # host), a host copy's seconds alone on the link, until when it may be passed over
        self.source: str | None = None
        self.copy_s = 0.0
        self.defer_until = 0.0
        # its stage queue is passing it over (deferred) now: ahead of no one (`admission.work_ahead`);
        # kept as torpor.staging.StagingQueue keeps the placer's `Ticket.passed`
        self.passed = False

    @property
    def seq(self) -> int:
        return self.rid

    @property
    def model(self) -> int:
        """The model it runs (queued requests of one model share one copy, `torpor.admission`)."""
        return self.fn

    @property
    def ready_at(self) -> float:
        """When its model has landed: the copy's (expected) landing once it holds the model."""
        r = self.resident
        return self.ready if r is None else r.expected()


def _order(j: _Job) -> tuple[float, int]:
    return j.key, j.rid  # admission's queue order (key, seq)


def _defer_until(j: _Job) -> float:
    return j.defer_until


@dataclass
class _Dev:
    state: DeviceState
    queue: deque = field(default_factory=deque)
    busy_until: float = 0.0
    running: bool = False
    busy_s: float = 0.0
    proj_end: float = 0.0  # when the work queued so far should be done (estimates, transfer stalls)
    queued_fn: dict = field(default_factory=dict)  # function -> requests of it in the queue
    hold_until: float = -1.0  # a short batch waits for more requests until then
    next_key: float = 0.0  # deadline queue: where the request being placed would go
    batches: int = 0
    batched: int = 0  # requests run in those batches
    run_start: float = 0.0
    exec_end: float = 0.0  # when the running batch's compute would end if its copy had landed
    cur_res: Any = None  # the running batch's resident (its copy may still be landing)
    cur_batch: Any = None  # (batch, exec seconds) of the running batch
    cur_deadline: float = math.inf  # the earliest deadline among the running batch's requests
    tok: int = 0  # the running batch's completion event; bumped when a re-rated copy moves it
    cur_hit: bool = True  # the running batch's model had landed when it started
    # the server's staging (`Simulation.staging`)
    tickets: list = field(default_factory=list)  # admitted, not finished: running, staged, waiting
    waiting: list = field(default_factory=list)  # waiting for a stage, in stage order (key, seq)
    holders: list = field(default_factory=list)  # holding a stage
    memwait: list = field(default_factory=list)  # holding a stage, waiting for memory
    wanted: dict = field(default_factory=dict)  # model -> requests waiting for a stage
    protected: dict = field(default_factory=dict)  # the same, counting those that may be deferred
    copy_free_at: float = 0.0  # when its copy engine has moved every copy issued so far
    wake_at: float = math.inf  # a deferral runs out then: stage again


@dataclass
class SimResult:
    policy: str
    gpus: int
    requests: int
    served: int
    unserved: int
    attainment: float  # requests within their SLO / all requests
    compliant_functions: float  # functions whose p98 latency is within SLO / functions with requests
    p50_ms: float
    p99_ms: float
    swaps: int
    peer_copies: int
    bytes_moved: int
    evictions: int
    gpu_busy: float  # busy seconds / (GPUs x duration)
    waits: int  # requests that found no room at first and waited
    wall_s: float
    duration_s: float
    latency_pct_ms: list = field(default_factory=list)  # at LATENCY_PCTS, unserved as None (the CDF)
    batches: int = 0  # executions (a batch of several requests counts once)
    mean_batch: float = 1.0  # requests per execution
    gpus_needed: int | None = None
    gpus_searched: int = 0
    stopped: bool = False
    actions: dict[str, int] = field(default_factory=dict)
    shed_arrival: int = 0  # answered UNAVAILABLE at once (staging with shedding)
    shed_queued: int = 0  # answered UNAVAILABLE when their turn came
    dropped: int = 0  # arrivals the client did not send (`max_outstanding` in flight)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Simulation:
    def __init__(self, scenario: Scenario, policy: str, n_gpus: int | None = None, *,
                 staging: Staging | None = None):
        """`staging`: the server's admission (`Staging`); default the scenario's."""
        if policy not in POLICIES:
            raise ScenarioError(f"policy: unknown policy {policy!r}; expected one of {list(POLICIES)}")
        self.sc = scenario
        self.policy = policy
        self.n = n_gpus or scenario.gpus
        self.links = scenario.links(self.n)
        mix = scenario.models
        self.fn_model = [mix[f % len(mix)] for f in range(scenario.functions)]
        est = ExecEstimator()
        for f, m in enumerate(self.fn_model):
            for b in range(1, m.max_batch + 1):  # the load-time profile (a few warm runs in the engine)
                est.seed(f, m.exec_seconds(b), b)
        self.cost = CostModel(self.links, est)
        self.devs = [_Dev(DeviceState(name, scenario.weight_budget, scenario.weight_budget, version=0))
                     for name in self.links.devices]
        self.by_name = {d.state.name: d for d in self.devs}
        self.rates = [RateMeter(tau=60.0) for _ in range(scenario.functions)]
        self.holder_count: dict[int, int] = {}
        self.inflight: dict[str, int] = {}
        self.xfer = LinkSharing(self.links, self.cost.transfer_latency_s, self.inflight, SHARED_LINKS)
        self.snap = Snapshot(0.0, [d.state for d in self.devs], self.inflight,
                             lambda k: self.rates[k].rate(self.snap.now), self.holder_count,
                             self.xfer if SHARED_LINKS else None, self.xfer.clear_at)
        self.first_at: dict[tuple[str, int], float] = {}
        self.static_map: dict[int, str] = {}
        self.scheduler = Scheduler(self.cost, policy)
        self.queue_order = "deadline" if policy == "torpor" else "fifo"
        self.models = [ModelInfo(f, m.nbytes, m.first_group_bytes, m.slo_s) for f, m in enumerate(self.fn_model)]
        self.staging = staging if staging is not None else scenario.staging
        if self.staging is not None:
            # as the server's placer sees copies: counts per link and when each link clears,
            # not the bytes each copy has left; copies are the devices' own (`_start_copy`)
            clear = self._clear = {}
            self.snap.inflight_bytes = None
            self.snap.link_clear = lambda lk: clear.get(lk, -math.inf)

    def preload(self, functions: list[int]) -> None:
        """Models resident before traffic, as a warm-up leaves them: one request per function in
        this order, each on the first device, the least recently used going where it does not fit."""
        d = self.devs[0]
        for i, f in enumerate(functions):
            if f in d.state.residents:
                continue
            while d.state.free_bytes < self.models[f].nbytes and d.state.residents:
                self._evict(d, min(d.state.residents.values(), key=lambda r: r.last_used).key)
            r = self._add_resident(d, f, 0.0, 0.0)
            r.last_used = i - len(functions)

    def _prepare_static(self, arrivals_fn: np.ndarray, duration: float) -> None:
        counts = np.bincount(arrivals_fn, minlength=self.sc.functions)
        items = [(f, m.nbytes, counts[f] / duration * m.exec_s) for f, m in enumerate(self.fn_model)]
        self.static_map = static_assignment(items, [(d.state.name, d.state.capacity) for d in self.devs])
        self.scheduler.static_map = self.static_map
        for f, name in self.static_map.items():  # native: loaded before traffic, resident forever
            self._add_resident(self.by_name[name], f, 0.0, 0.0)

    def _add_resident(self, d: _Dev, f: int, first: float, full: float) -> ResidentState:
        r = ResidentState(f, self.models[f].nbytes, ready_at=full, last_used=self.snap.now)
        d.state.residents[f] = r
        d.state.version += 1
        d.state.free_bytes -= r.nbytes
        self.holder_count[f] = self.holder_count.get(f, 0) + 1
        self.first_at[(d.state.name, f)] = first
        return r

    def _evict(self, d: _Dev, f: int) -> None:
        r = d.state.residents.pop(f)
        d.state.version += 1
        d.state.free_bytes += r.nbytes
        self.holder_count[f] -= 1
        self.first_at.pop((d.state.name, f), None)

    def run(self, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float, *,
            stop_below: float | None = None, max_outstanding: int | None = None) -> SimResult:
        """Replay the arrivals. `stop_below`: give up (attainment reported as an upper bound,
        `stopped` set) once more requests have missed their SLO than that attainment allows;
        the GPU-count search uses it to skip hopeless configurations. `max_outstanding` (with
        `staging`): an arrival finding that many requests unanswered is not sent (a load
        client's cap, as loadtest/e2e.py's --max-outstanding). Per request afterwards:
        `latency` (inf: not answered) and `status` (ANSWERED, SHED_ARRIVAL, ...)."""
        t_wall = time.perf_counter()
        rng = np.random.default_rng(self.sc.seed + 1)
        noise = (rng.lognormal(0.0, self.sc.exec_noise, size=len(arrivals_t)) if self.sc.exec_noise
                 else np.ones(len(arrivals_t)))
        if self.policy == "static":
            self._prepare_static(arrivals_fn, duration)
        n_req = len(arrivals_t)
        latency = np.full(n_req, np.inf)
        # per request, for diagnosis: the scheduler's predicted latency and chosen action
        self.predicted = predicted = np.full(n_req, np.nan)
        self.action_of = action_of = np.zeros(n_req, dtype=np.int8)
        self.latency = latency
        self.status = status = np.zeros(n_req, dtype=np.int8)
        self.copies: list[tuple[float, int, float, float]] = []  # staging: (issued, request, starts, lands)
        # staging: when each request held its stage and its model (the engine's compute_infer
        # counts from then: the wait for the device and for its copy, and its run)
        self.acquired = acquired = np.full(n_req, np.nan)
        heap: list = []
        seq = 0
        pending: deque = deque()
        swaps = peers = moved = evictions = waits = unserved = 0
        shed_arrival = shed_queued = dropped = in_system = 0
        actions: dict[str, int] = {}
        misses = 0
        allowed = math.inf if stop_below is None else (1.0 - stop_below) * len(arrivals_t)
        stopped = False
        snap, sched, cost = self.snap, self.scheduler, self.cost
        devs, by_name = self.devs, self.by_name
        fn_model, models, rates = self.fn_model, self.models, self.rates
        edf = self.queue_order == "deadline"
        # processor sharing: Torpor's scheduler sees when each copy should land if no other joins
        # (`ResidentState.eta`), not the landing at the rate it has now
        staging = self.staging
        staged = staging is not None
        etas = edf and self.xfer.shared and not staged
        listq = edf or staged  # queues kept sorted by (key, seq) in a list
        if listq:
            for d in devs:
                d.queue = []
        if staged:
            permits = 1 + staging.lookahead  # one execution at a time per device
            shedding = staging.shed
            evict_policy = sched.eviction

            def size_of(f: int) -> int:
                return models[f].nbytes

        def start_next(d: _Dev, now: float) -> None:
            nonlocal seq
            if d.running or not d.queue:
                return
            head: _Job = d.queue[0]
            f = head.fn
            spec = fn_model[f]
            same = d.queued_fn.get(f, 0)
            if spec.max_batch > 1 and same < spec.max_batch and spec.max_queue_delay_s > 0:
                # dynamic batching: a short batch waits for more requests up to the queue delay
                hold = head.enqueued + spec.max_queue_delay_s
                if now < hold:
                    if d.hold_until != hold:
                        d.hold_until = hold
                        heapq.heappush(heap, (hold, seq, _WAKE, d))
                        seq += 1
                    return
            if listq:
                d.queue.pop(0)
            else:
                d.queue.popleft()
            batch = [head]
            if spec.max_batch > 1 and same > 1:
                # requests of one model function anywhere in the queue join the head's batch
                # (Triton's dynamic batcher); the rest keep their order
                keep = []
                for j in d.queue:
                    if j.fn == f and len(batch) < spec.max_batch:
                        batch.append(j)
                    else:
                        keep.append(j)
                d.queue = keep if listq else deque(keep)
            b = len(batch)
            d.queued_fn[f] = same - b
            r = head.resident
            begin = max(now, self.first_at.get((d.state.name, f), 0.0))
            ex = spec.exec_seconds(b) * noise[head.rid]
            done = max(begin + ex, r.ready_at)
            d.running = True
            d.busy_until = done
            d.run_start = now
            d.exec_end = begin + ex
            d.cur_res = r
            d.cur_batch = (batch, ex)
            d.cur_deadline = min(j.due for j in batch)
            d.cur_hit = r.ready_at <= now
            for j in batch:
                j.started_at = now
            d.tok += 1
            d.batches += 1
            d.batched += b
            if not edf:  # re-anchor the projection of queued work on this batch's real end
                t_end = done
                for j in d.queue:
                    t_end = max(max(t_end, j.first_at) + j.estimate, j.resident.ready_at)
                d.proj_end = t_end
            heapq.heappush(heap, (done, seq, _DONE, (d, batch, ex, d.tok)))
            seq += 1

        def rerated(trs: list, now: float) -> None:
            # copies whose landing moved: their residents, locks, events and any run waiting on them
            nonlocal seq
            for tr in trs:
                d, r, src = tr.owner
                r.ready_at = tr.end
                if etas:
                    r.eta = self.xfer.eta(tr, now)
                if src is not None:
                    src.locked_until = max(src.locked_until, tr.end)
                heapq.heappush(heap, (tr.end, seq, _LANDED, (tr, tr.version)))
                seq += 1
                if d.running and d.cur_res is r:
                    done = max(d.exec_end, tr.end)
                    if done != d.busy_until:
                        d.busy_until = done
                        d.tok += 1
                        batch, ex = d.cur_batch
                        heapq.heappush(heap, (done, seq, _DONE, (d, batch, ex, d.tok)))
                        seq += 1

        # ---- the server's staging (`Staging`): the rules are torpor.admission's ----------------
        def candidates(d: _Dev, now: float, idle_only: bool) -> list[Candidate]:
            # the residents of `d` as the server's eviction sees them (torpor.memory.candidates)
            bw = self.links.bandwidth(self.links.host_path(d.state.name)[0])
            return [Candidate(r.key, r.nbytes, r.last_used, rates[r.key].rate(now), r.nbytes / bw,
                              self.holder_count.get(r.key, 1) - 1)
                    for r in d.state.residents.values() if not idle_only or r.evictable(now)]

        def level(d: _Dev, f: int, now: float) -> int:
            # what staging f on d now does to requests with an objective waiting there
            # (torpor.residency's `_blocker`)
            res = d.state.residents
            need = models[f].nbytes - d.state.free_bytes
            if f in res or need <= 0:
                return FREE
            wanted = d.protected
            victims = ((c.key, c.nbytes, c.rate) for c in victim_order(evict_policy, candidates(d, now, False), now,
                                                                        wanted))
            return harm_level(f, need, res, victims, wanted, rates[f].rate(now))

        def want(d: _Dev, job: _Job, n: int) -> None:
            for counts in (d.wanted, d.protected) if job.defer_until > 0 else (d.wanted,):
                c = counts.get(job.fn, 0) + n
                if c > 0:
                    counts[job.fn] = c
                else:
                    del counts[job.fn]

        def enter_stage(d: _Dev, job: _Job, now: float) -> None:
            # torpor.staging.StagingQueue.enter
            # (a request that waits is marked passed over where it would be deferred right away,
            # before it counts among those waiting: the tag)
            head = d.waiting[0].key if d.waiting else None
            at_once = stage_at_once(job.key, len(d.holders), permits, head, (h.key for h in d.holders))
            passed = deferred(now, job.defer_until, lambda: level(d, job.fn, now))
            if at_once and not passed:
                stage(d, job, now, stage_level(job.defer_until, lambda: level(d, job.fn, now)))
            else:
                bisect.insort(d.waiting, job, key=_order)
                job.passed = passed
                want(d, job, 1)
            grant(d, now)

        def grant(d: _Dev, now: float) -> None:
            # torpor.staging.StagingQueue._grant: the lowest waiting request not deferred, while
            # stages are free; a timer for when the first one passed over runs out of deferral
            nonlocal seq
            i: int | None = 0
            while len(d.holders) < permits and d.waiting:
                start = i
                i, wake = stage_next(d.waiting, now, _defer_until, lambda j: level(d, j.fn, now), i)
                for j in d.waiting[start:i]:  # those it scanned past were deferred: passed over
                    j.passed = True
                if wake < d.wake_at:
                    d.wake_at = wake
                    heapq.heappush(heap, (wake, seq, _STAGE, d))
                    seq += 1
                if i is None:
                    break
                job = d.waiting.pop(i)
                job.passed = False
                want(d, job, -1)
                stage(d, job, now, stage_level(job.defer_until, lambda j=job: level(d, j.fn, now)))

        def finish(d: _Dev, job: _Job) -> None:
            nonlocal in_system
            d.tickets.remove(job)
            in_system -= 1

        def stage(d: _Dev, job: _Job, now: float, lvl: int) -> None:
            # it holds a stage: a last look (the engine's on_stage), then memory, then the
            # device's queue
            nonlocal shed_queued, misses
            why = None
            if shedding and job.due < math.inf:
                why = shed_when_staged(now, job.estimate, job.copy_s, job.fn in d.state.residents, job.due, lvl,
                                       lambda: would_delay([k for k in d.tickets if k is not job], now,
                                                           job.estimate + job.copy_s, staging.lookahead))
            if why is not None:
                status[job.rid] = SHED_QUEUED
                shed_queued += 1
                misses += 1
                finish(d, job)
                return
            d.holders.append(job)
            if not acquire(d, job, now):
                d.memwait.append(job)

        def acquire(d: _Dev, job: _Job, now: float) -> bool:
            # torpor.residency._acquire_staged: pin it where resident, else evict idle residents
            # (models others wait for last) and start its copy; False: no room yet
            nonlocal evictions
            f = job.fn
            r = d.state.residents.get(f)
            if r is None:
                nbytes = models[f].nbytes
                if d.state.free_bytes < nbytes:
                    for c in victim_order(evict_policy, candidates(d, now, True), now, d.wanted):
                        self._evict(d, c.key)
                        evictions += 1
                        if d.state.free_bytes >= nbytes:
                            break
                    else:
                        return False
                r = start_copy(d, f, job.rid, job.source, now)
            r.pins += 1
            r.last_used = now
            acquired[job.rid] = now
            job.resident = r
            job.staged = True
            job.first_at = self.first_at.get((d.state.name, f), 0.0)
            bisect.insort(d.queue, job, key=_order)
            d.queued_fn[f] = d.queued_fn.get(f, 0) + 1
            start_next(d, now)
            return True

        def start_copy(d: _Dev, f: int, rid: int, source: str | None, now: float) -> ResidentState:
            # one copy at a time per device, each at its path's full rate; from the peer
            # device `source` where it holds a landed copy and there is a path, else the host
            nonlocal seq, swaps, peers, moved
            name = d.state.name
            path = self.links.host_path(name)
            src = None
            if source is not None:
                s = by_name[source].state.residents.get(f)
                ppath = self.links.peer_path(source, name)
                if s is not None and s.ready_at <= now and ppath is not None:
                    src, path = s, ppath
            begin = max(now + staging.copy_delay_s, d.copy_free_at)
            full = begin + cost.nominal_seconds(models[f].nbytes, path)
            d.copy_free_at = full
            self.copies.append((now, rid, begin, full))
            r = self._add_resident(d, f, begin + cost.nominal_seconds(models[f].first_group_bytes, path), full)
            if src is not None:
                src.locked_until = max(src.locked_until, full)
                peers += 1
            else:
                swaps += 1
            moved += models[f].nbytes
            clear = self._clear
            for lk in path:
                self.inflight[lk] = self.inflight.get(lk, 0) + 1
                clear[lk] = max(clear.get(lk, -math.inf), full)
            heapq.heappush(heap, (full, seq, _COPIED, (d, path)))
            seq += 1
            return r

        def retry_memory(d: _Dev, now: float) -> None:
            while d.memwait and acquire(d, d.memwait[0], now):
                d.memwait.pop(0)

        def admit(rid: int, f: int, arrival: float, now: float) -> bool:
            # the engine's way in (torpor.engine._run_on_device, torpor.placer): place, shed at
            # arrival, open a ticket, wait for a stage
            nonlocal unserved, misses, shed_arrival, in_system, evictions
            snap.now = now
            spec = fn_model[f]
            due = arrival + spec.slo_s
            ex_new = cost.exec_seconds(f)
            planned = []
            for d in devs:
                ends: list = []
                backlog, d.next_key, stage_in = work_ahead(d.tickets, now, due if edf else None, ex_new,
                                                           staging.lookahead, ends=ends)
                d.state.backlog_s = max(0.0, backlog)
                d.state.stage_in_s = max(0.0, stage_in)
                d.state.queue_len = len(d.tickets)
                # as torpor.placer's snapshot: a model a queued request will copy in shows as a
                # resident landing by the time that request runs, its bytes off the free bytes;
                # the device's own state carries them for this decision only
                plan = planned_residents(ends, d.state.residents, size_of, now)
                if plan:
                    planned.append((d, plan, d.state.free_bytes))
                    free = d.state.free_bytes
                    for r in plan:
                        d.state.residents[r.key] = r
                        self.holder_count[r.key] = self.holder_count.get(r.key, 0) + 1
                        free = max(0, free - r.nbytes)
                    d.state.free_bytes = free
            model = models[f]
            if now > arrival:
                model = ModelInfo(f, model.nbytes, model.first_group_bytes, model.slo_s, 1, now - arrival)
            dec = sched.place(model, snap)
            for d, plan, free in planned:
                for r in plan:
                    del d.state.residents[r.key]
                    self.holder_count[r.key] -= 1
                d.state.free_bytes = free
            if dec is None:
                return False
            o = dec.option
            if o is None:
                status[rid] = UNSERVED
                unserved += 1
                misses += 1
                return True
            actions[o.action] = actions.get(o.action, 0) + 1
            predicted[rid] = now - arrival + o.completion_s
            action_of[rid] = _ACTION_CODE[o.action]
            if shedding and shed_at_arrival(dec):
                status[rid] = SHED_ARRIVAL
                shed_arrival += 1
                misses += 1
                return True
            d = by_name[o.device]
            copy_s = cost.nominal_seconds(spec.nbytes, self.links.host_path(d.state.name))
            copy = o.action in ("swap", "peer")
            if shedding and copy and level(d, f, now) == HARMS:
                # its copy would evict a model waiting requests want: it would wait for them, and
                # be shed if they outlast its slack; when the work queued there already does, now
                slack = arrival + spec.slo_s - now - o.exec_s - copy_s
                if outlasted(work_ahead(d.tickets, now, None, 0.0, staging.lookahead)[0], slack):
                    status[rid] = SHED_ARRIVAL
                    shed_arrival += 1
                    misses += 1
                    return True
            if copy and f not in d.state.residents:
                # the copy starts now where it evicts only idle models no waiting request wants
                # (torpor.residency.DevicePool.start_copy); the request finds it when staged
                victims = victim_order(evict_policy, candidates(d, now, True), now, d.wanted)
                spare = spare_victims(victims, d.state.free_bytes, spec.nbytes, d.wanted)
                if spare is not None:
                    for c in spare:
                        self._evict(d, c.key)
                        evictions += 1
                    start_copy(d, f, rid, o.source if o.action == "peer" else None, now)
            job = _Job(rid, f, arrival, ex_new, None, dec.meets_slo, now, 0.0, due)
            job.key = (d.next_key + HOPELESS_DELAY_S if hopeless(dec) else d.next_key) if edf else math.inf
            job.guard = arrival + spec.slo_s * sched.slo_margin
            if copy:  # as Placer.admit
                job.transfer = o.transfer_s - o.start_s
                job.ready = now + o.transfer_s
                job.source = o.source if o.action == "peer" else None
            else:
                r = d.state.residents.get(f)
                job.ready = r.ready_at if r is not None and r.ready_at > now else 0.0
            job.copy_s = copy_s
            job.defer_until = defer_deadline(due, ex_new, copy_s) if shedding else 0.0
            d.tickets.append(job)
            in_system += 1
            enter_stage(d, job, now)
            return True

        def try_place(rid: int, f: int, arrival: float, now: float) -> bool:
            nonlocal seq, swaps, peers, moved, evictions, unserved, misses
            snap.now = now
            self.xfer.now = now
            if edf:
                # Work ahead of this request, and its place in each queue: `admission.work_ahead`,
                # the server's own rule (torpor.placer). The simulator knows when the running
                # batch ends, and when the request's own model would land on each device (it
                # holds the device until then once it runs).
                due = arrival + fn_model[f].slo_s
                ex_new = cost.exec_seconds(f)
                # How much later each copy in flight may land before a request misses its
                # deadline: the request waiting on it, or any queued behind that one on the same
                # device (a request already past its deadline has nothing left to protect).
                slack = self.xfer.slack
                slack.clear()
                ends: list | None = [] if self.xfer.shared else None

                for d in devs:
                    free = d.busy_until if d.running else now
                    if d.running and d.cur_res is not None and d.cur_res.eta is not None:
                        free = max(d.exec_end, d.cur_res.expected())

                    def own_ready(d: _Dev = d) -> float:
                        # a host copy, the slowest it may get
                        r = d.state.residents.get(f)
                        if r is not None:
                            return r.expected()
                        hp = self.links.host_path(d.state.name)
                        return now + cost.copy_plan(models[f].nbytes, 0, hp, self.inflight,
                                                    snap.inflight_bytes, snap.clear_in(hp))[1]

                    if ends is not None:
                        ends.clear()
                    backlog, d.next_key, _ = work_ahead(d.queue, now, due, ex_new, 0, free_at=free,
                                                       own_ready=own_ready, ends=ends)
                    d.state.backlog_s = max(0.0, backlog)
                    if ends is None:
                        continue
                    least = math.inf  # protect every copy a request waits on, latest first
                    for r, t, deadline in reversed([*([(d.cur_res, free, d.cur_deadline)] if d.running and d.cur_res
                                                       is not None else []),
                                                    *((j.resident, t, j.due) for j, t in ends)]):
                        if t <= deadline:
                            least = min(least, deadline - t)
                        if r.ready_at > now and least < slack.get(id(r), math.inf):
                            slack[id(r)] = least
            else:
                for d in devs:
                    d.state.backlog_s = max(0.0, d.proj_end - now)
            dec = sched.place(models[f], snap)
            if dec is None:
                return False
            o = dec.option
            if o is None:
                unserved += 1
                misses += 1
                return True
            actions[o.action] = actions.get(o.action, 0) + 1
            d = by_name[o.device]
            if o.action in ("swap", "peer"):
                for v in o.evict:
                    self._evict(d, v)
                    evictions += 1
                # the first group moves at the share the copy starts with (it lands in well
                # under a millisecond; re-rating it is not worth the events); a copy waiting
                # for its path to clear moves it at full bandwidth once it starts
                if o.start_s > 0:
                    first = o.start_s + cost.nominal_seconds(models[f].first_group_bytes, o.path)
                else:
                    first = cost.transfer_seconds(models[f].first_group_bytes, o.path, self.inflight)
                r = self._add_resident(d, f, now + first, now + o.transfer_s)
                src = by_name[o.source].state.residents[f] if o.action == "peer" else None
                _, moved_trs = self.xfer.start(now, models[f].nbytes, o.path, (d, r, src),
                                               begin=now + o.start_s if o.start_s > 0 else None)
                rerated(moved_trs, now)
                if o.start_s > 0 and self.xfer.shared:
                    heapq.heappush(heap, (now + o.start_s, seq, _BEGIN, moved_trs[0]))
                    seq += 1
                moved += o.bytes_moved
                if o.action == "peer":
                    peers += 1
                else:
                    swaps += 1
            else:
                r = d.state.residents[f]
            r.pins += 1
            r.last_used = now
            spec = fn_model[f]
            same = d.queued_fn.get(f, 0)
            # what this request adds to the device's work: a whole run, or one more member of a
            # batch already queued there
            if spec.max_batch > 1 and same % spec.max_batch:
                est = cost.exec_seconds(f) * spec.batch_scale
            else:
                est = cost.exec_seconds(f)
            predicted[rid] = now - arrival + o.completion_s
            action_of[rid] = _ACTION_CODE[o.action]
            first_at = self.first_at.get((d.state.name, f), 0.0)
            job = _Job(rid, f, arrival, est, r, dec.meets_slo, now, first_at, arrival + spec.slo_s)
            if edf:
                # A request predicted to miss its SLO wherever it goes queues behind every one
                # that can still meet its own (among themselves by deadline): under overload,
                # serving the hopeless first only makes the next ones late too.
                job.key = d.next_key if not hopeless(dec) else d.next_key + HOPELESS_DELAY_S
                job.guard = arrival + spec.slo_s * sched.slo_margin
                bisect.insort(d.queue, job, key=_order)
            else:
                d.queue.append(job)
            d.queued_fn[f] = same + 1
            d.proj_end = max(max(d.proj_end, now, first_at) + est, r.ready_at)
            start_next(d, now)
            return True

        place = admit if staged else try_place

        def handle(ev: tuple) -> None:
            nonlocal seq, misses
            t, _, kind, data = ev
            if kind == _LANDED:
                tr, version = data
                if version == tr.version:
                    tr.owner[1].ready_at = t
                    tr.owner[1].eta = None
                    rerated(self.xfer.finish(tr, t), t)
                return
            if kind == _BEGIN:
                if not data.pending:
                    return
                # a copy that waited for its path starts as planned, unless copies started
                # since then still move there and it would slow one past the deadline of a
                # request waiting on it: then it waits until they have landed
                clear = self.xfer.busy_until(data.path, t) if self.xfer.would_harm(data, t) else t
                if clear > t + 1e-6:
                    rerated(self.xfer.postpone(data, clear), t)
                    heapq.heappush(heap, (clear, seq, _BEGIN, data))
                    seq += 1
                    return
                rerated(self.xfer.activate(data, t), t)
                return
            if kind == _WAKE:
                if data.hold_until == t:
                    data.hold_until = -1.0
                    start_next(data, t)
                return
            if kind == _COPIED:  # staging: a device's copy landed
                d, path = data
                for lk in path:
                    self.inflight[lk] -= 1
                retry_memory(d, t)
                return
            if kind == _STAGE:  # staging: a deferral ran out
                if data.wake_at == t:
                    data.wake_at = math.inf
                    grant(data, t)
                return
            if kind == _RELEASE:
                release(*data, t)
                return
            d, batch, ex, tok = data
            if tok != d.tok:
                return  # its copy's landing moved, and the completion with it
            d.busy_s += t - d.run_start
            d.cur_res = None
            if d.cur_hit or not staged:  # the server learns only from runs that found their model landed
                cost.observe_exec(batch[0].fn, ex, len(batch))
            d.running = False
            if staged and staging.release_s > 0:
                heapq.heappush(heap, (t + staging.release_s, seq, _RELEASE, (d, batch)))
                seq += 1
                start_next(d, t)  # the worker goes on with what is staged
                return
            release(d, batch, t)

        def release(d: _Dev, batch: list, t: float) -> None:
            # answered; the model unpinned; with staging, their stages given back
            # (torpor.residency.Placement._release), the next staged
            nonlocal misses
            for job in batch:
                latency[job.rid] = t - job.arrival
                if t - job.arrival > fn_model[job.fn].slo_s:
                    misses += 1
            r = batch[0].resident
            r.pins -= len(batch)
            r.last_used = t
            if staged:
                for job in batch:
                    finish(d, job)
                    d.holders.remove(job)
                retry_memory(d, t)
                grant(d, t)
            start_next(d, t)
            # Waiting requests retry in arrival order, a few per completion (a completion frees
            # at most one pin; rescanning a long backlog each time would be quadratic).
            for _ in range(min(len(pending), _RETRIES)):
                rid, f, arr = pending[0]
                if not place(rid, f, arr, t):
                    break
                pending.popleft()

        for i in range(n_req):
            t = float(arrivals_t[i])
            while heap and heap[0][0] <= t:
                handle(heapq.heappop(heap))
            f = int(arrivals_fn[i])
            rates[f].hit(t)
            if max_outstanding is not None and in_system + len(pending) >= max_outstanding:
                status[i] = DROPPED
                dropped += 1
                misses += 1
                continue
            # Torpor: a request that can be placed now is not held behind one waiting for room
            # (under overload every device can be full of models pinned by queued requests)
            if (pending and not edf) or not place(i, f, t, t):
                waits += 1
                pending.append((i, f, t))
            if misses > allowed:
                stopped = True
                break
        while heap and not stopped:
            handle(heapq.heappop(heap))
            if misses > allowed:
                stopped = True

        slo = np.array([fn_model[int(f)].slo_s for f in arrivals_fn]) if n_req else np.zeros(0)
        ok = latency <= slo
        served = latency[np.isfinite(latency)]
        # per-function compliance at p98, as the paper counts it
        compliant = total_fns = 0
        if n_req:
            order = np.argsort(arrivals_fn, kind="stable")
            fns_sorted = arrivals_fn[order]
            bounds = np.flatnonzero(np.diff(fns_sorted)) + 1
            for grp in np.split(order, bounds):
                total_fns += 1
                lat = latency[grp]
                p98 = np.inf if not np.all(np.isfinite(lat)) else float(np.percentile(lat, 98))
                compliant += p98 <= fn_model[int(arrivals_fn[grp[0]])].slo_s
        span = max(duration, float(max((d.busy_until for d in devs), default=0.0)))
        return SimResult(
            policy=self.policy,
            gpus=self.n,
            requests=n_req,
            served=int(served.size),
            unserved=unserved,
            attainment=(1.0 - misses / n_req if stopped else float(ok.mean())) if n_req else 1.0,
            compliant_functions=compliant / total_fns if total_fns else 1.0,
            p50_ms=float(np.percentile(served, 50) * 1e3) if served.size else math.nan,
            p99_ms=float(np.percentile(served, 99) * 1e3) if served.size else math.nan,
            swaps=swaps,
            peer_copies=peers,
            bytes_moved=moved,
            evictions=evictions,
            gpu_busy=sum(d.busy_s for d in devs) / (self.n * span) if span else 0.0,
            waits=waits,
            wall_s=time.perf_counter() - t_wall,
            duration_s=duration,
            latency_pct_ms=[None if not math.isfinite(x) else round(x * 1e3, 3)
                            for x in (np.percentile(latency, LATENCY_PCTS, method="lower") if n_req and not stopped
                                      else [])],
            batches=sum(d.batches for d in devs),
            mean_batch=sum(d.batched for d in devs) / max(1, sum(d.batches for d in devs)),
            actions=actions,
            stopped=stopped,
            shed_arrival=shed_arrival,
            shed_queued=shed_queued,
            dropped=dropped,
        )


def scenario_arrivals(sc: Scenario, trace_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    try:
        return make_arrivals(sc.workload, sc.functions, seed=sc.seed, trace_path=trace_path)
    except WorkloadError as e:
        raise ScenarioError(f"scenario.workload.{e}") from None


# The Torpor paper's own policies (torpor.paper_sim), run beside ours on the same arrivals:
# its system (`paper`), its ablations and its baselines. `lru` is the paper's ablation (its
# system with LRU eviction), not our `lru-swap`.
PAPER_POLICIES = ("paper", "fifo", "random", "lru", "native", "keepalive")
CLI_POLICIES = (*POLICIES, *PAPER_POLICIES)


def paper_extras(spec: dict[str, Any], *, base: Path | None = None, source: str = "scenario") -> list[Any]:
    """The per-model numbers only the paper's policies read (native latency and footprint, cold
    start, Table 4 classes), from `<stem>.paper.csv` beside the scenario file where there is one
    (as `loadtest/paper_eval.py` reads them), else their defaults."""
    from .paper_sim import parse_with_extras, read_extras_csv

    side = Path(source).with_name(Path(source).stem + ".paper.csv")
    rows = read_extras_csv(side) if side.is_file() else {}
    return parse_with_extras(spec, rows, base=base, source=source)[1]


def simulate(sc: Scenario, policy: str, n_gpus: int | None = None, *, arrivals=None,
             trace_path: str | Path | None = None, stop_below: float | None = None,
             extras: list[Any] | None = None) -> SimResult:
    t, fn, duration = arrivals if arrivals is not None else scenario_arrivals(sc, trace_path)
    if policy in PAPER_POLICIES:
        from .paper_sim import PaperSim

        sim = PaperSim(sc, policy, extras, n_gpus)  # extras None: paper_sim's defaults
        r = sim.run(t, fn, duration)
        lat = sim.latency
        if len(lat):
            r.latency_pct_ms = [None if not math.isfinite(x) else round(x * 1e3, 3)
                                for x in np.percentile(lat, LATENCY_PCTS, method="lower")]
        return r
    return Simulation(sc, policy, n_gpus).run(t, fn, duration, stop_below=stop_below)


def gpus_needed(sc: Scenario, policy: str, arrivals, *, limit: int, target: float | None = None,
                start: int | None = None, extras: list[Any] | None = None) -> int | None:
    """The fewest GPUs (1..limit) at which `policy` reaches the target SLO attainment, taking
    attainment to grow with GPUs; None if `limit` is not enough. The search starts at `start`
    (default: the scenario's GPU count), steps outward doubling the step until the answer is
    bracketed, then bisects: a few runs near the answer, and runs that fall short stop early."""
    target = sc.target_attainment if target is None else target
    memo: dict[int, bool] = {}

    def ok(n: int) -> bool:
        if n not in memo:
            kw = {"extras": extras} if extras is not None else {}
            memo[n] = simulate(sc, policy, n, arrivals=arrivals, stop_below=target, **kw).attainment >= target
        return memo[n]

    n = max(1, min(limit, start or sc.gpus))
    step = 1
    if ok(n):
        hi, lo = n, 0  # hi reaches the target, lo does not (0: nothing tried below)
        while hi > 1:
            m = max(1, hi - step)
            if not ok(m):
                lo = m
                break
            hi, step = m, step * 2
    else:
        lo = n
        while True:
            if lo >= limit:
                return None
            m = min(limit, lo + step)
            if ok(m):
                hi = m
                break
            lo, step = m, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def compare(sc: Scenario, *, policies: list[str] | None = None, trace_path: str | Path | None = None,
            search_gpus: int | None = None, extras: list[Any] | None = None) -> dict[str, Any]:
    """Every policy on the same arrivals; the fewest GPUs each needs when `search_gpus` > 0.
    Policies are ours (`POLICIES`) or the paper's (`PAPER_POLICIES`, which read `extras`: see
    `paper_extras`; None gives paper_sim's defaults)."""
    arrivals = scenario_arrivals(sc, trace_path)
    search = sc.search_gpus if search_gpus is None else search_gpus
    results = []
    for p in policies or sc.policies:
        if p not in CLI_POLICIES:
            raise ScenarioError(f"policy: unknown policy {p!r}; expected one of {list(CLI_POLICIES)}")
        r = simulate(sc, p, arrivals=arrivals, extras=extras)
        if search:
            t0 = time.perf_counter()
            r.gpus_needed = gpus_needed(sc, p, arrivals, limit=search, extras=extras)
            r.gpus_searched = search
            r.wall_s += time.perf_counter() - t0
        results.append(r)
    t, _, duration = arrivals
    return {
        "scenario": sc.name,
        "source": sc.source,
        "gpus": sc.gpus,
        "gpu_memory_GB": sc.gpu_memory / GB,
        "weight_budget_GB": sc.weight_budget / GB,
        "functions": sc.functions,
        "models": [m.__dict__ for m in sc.models],
        "total_model_GB": sum(sc.models[f % len(sc.models)].nbytes for f in range(sc.functions)) / GB,
        "requests": len(t),
        "duration_s": duration,
        "workload": sc.workload,
        "target_attainment": sc.target_attainment,
        "topology": sc.links(sc.gpus).as_dict(),
        "results": [r.as_dict() for r in results],
    }


def format_table(report: dict[str, Any]) -> str:
    head = (f"{report['scenario']}: {report['gpus']} GPUs x {_memory(report)}, "
            f"{report['functions']} functions ({report['total_model_GB']:.0f} GB of models), "
            f"{report['requests']} requests over {report['duration_s'] / 60:.0f} min")
    cols = ["policy", "SLO met", "fns ok", "p50 ms", "p99 ms", "swaps", "peer", "GB moved", "evict",
            "batch", "busy", "unserved", f"GPUs@{report['target_attainment']:.0%}", "wall s"]
    rows = []
    for r in report["results"]:
        rows.append([
            r["policy"], f"{r['attainment']:.2%}", f"{r['compliant_functions']:.1%}", f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}", str(r["swaps"]), str(r["peer_copies"]), f"{r['bytes_moved'] / GB:.0f}",
            str(r["evictions"]), f"{r.get('mean_batch', 1.0):.2f}", f"{r['gpu_busy']:.0%}", str(r["unserved"]),
            _gpus_cell(r), f"{r['wall_s']:.1f}",
        ])
    return "\n".join([head, *_grid(cols, rows)])


def _memory(report: dict[str, Any]) -> str:
    mem, budget = report["gpu_memory_GB"], report.get("weight_budget_GB", report["gpu_memory_GB"])
    return f"{mem:g} GB" + (f" ({budget:g} GB for weights)" if budget < mem else "")


def _gpus_cell(r: dict[str, Any]) -> str:
    if not r.get("gpus_searched"):
        return "-"
    return f">{r['gpus_searched']}" if r.get("gpus_needed") is None else str(r["gpus_needed"])


def _grid(cols: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))

    return [line(cols), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def with_param(spec: dict[str, Any], param: str, value: float) -> dict[str, Any]:
    """A copy of a scenario dict with one sweep parameter set."""
    out = dict(spec)
    out.pop("sweep", None)
    if param == "rate_scale":
        out["workload"] = {**(spec.get("workload") or {}), "rate_scale": value}
    else:
        out[param] = value
    return out


def sweep(spec: dict[str, Any], param: str, values: list[float], *, base: Path | None = None,
          source: str = "scenario", policies: list[str] | None = None, trace_path: str | Path | None = None,
          search_gpus: int | None = None, progress: Any = None) -> dict[str, Any]:
    """`compare` at each value of one parameter (the same seed at every point, so at one point
    every policy sees the same arrivals). Returns {"sweep": {...}, "points": [compare reports]}."""
    points = []
    for v in values:
        point = with_param(spec, param, v)
        sc = parse_scenario(point, base=base, source=source)
        extras = (paper_extras(point, base=base, source=source)
                  if any(p in PAPER_POLICIES for p in policies or sc.policies) else None)
        rep = compare(sc, policies=policies, trace_path=trace_path, search_gpus=search_gpus, extras=extras)
        rep["sweep_value"] = v
        points.append(rep)
        if progress is not None:
            progress(f"{param}={v}: " + ", ".join(f"{r['policy']} {r['attainment']:.2%}" for r in rep["results"]))
    first = points[0]
    return {"scenario": first["scenario"], "source": source, "sweep": {"param": param, "values": list(values)},
            "target_attainment": first["target_attainment"], "points": points}


def format_sweep(report: dict[str, Any]) -> str:
    param = report["sweep"]["param"]
    pts = report["points"]
    p0 = pts[0]
    policies = [r["policy"] for r in p0["results"]]
    searched = any(r.get("gpus_searched") for p in pts for r in p["results"])
    need = f" (GPUs needed for {report['target_attainment']:.0%} in brackets)" if searched else ""
    head = (f"{report['scenario']}: SLO attainment per policy over {param}{need}; "
            f"{p0['gpus']} GPUs x {_memory(p0)}, {p0['duration_s'] / 60:.0f} min per point")
    cols = [param, "requests", "GB of models", *policies]
    rows = []
    for p in pts:
        cells = []
        for r in p["results"]:
            cell = f"{r['attainment']:.2%}"
            if r.get("gpus_searched"):
                cell += f" ({_gpus_cell(r)})"
            cells.append(cell)
        v = p["sweep_value"]
        rows.append([f"{v:g}", str(p["requests"]), f"{p['total_model_GB']:.0f}", *cells])
    return "\n".join([head, *_grid(cols, rows)])


def _nines(attainment: float) -> float:
    # "nines" scale: 90% -> 1, 99% -> 2, 99.9% -> 3; shows 40% and 99.5% on one readable axis
    return -math.log10(max(1.0 - attainment, 1e-4))


def _nines_axis(ax: Any, target: float) -> None:
    ticks = [0.0, 50.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99]
    ax.set_yticks([_nines(t / 100) for t in ticks], [f"{t:g}%" for t in ticks])
    ax.set_ylim(0, _nines(0.9999) + 0.05)
    ax.axhline(_nines(target), ls="--", lw=0.8, color="k")
    ax.set_ylabel("requests within SLO")


def write_plot(report: dict[str, Any], path: str | Path) -> str:
    """A PNG of the report: attainment (and GPUs needed) against the swept parameter, or for one
    point the latency CDF and attainment per policy. Returns a line saying what was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'torpor[sim]'): no plot written"
    colors = {"torpor": "tab:blue", "lru-swap": "tab:orange", "static": "tab:gray", "paper": "tab:green",
              "fifo": "tab:olive", "random": "tab:pink", "lru": "tab:brown", "native": "tab:purple",
              "keepalive": "tab:cyan"}
    target = report["target_attainment"]
    if "sweep" in report:
        param = report["sweep"]["param"]
        pts = report["points"]
        xs = [p["sweep_value"] for p in pts]
        policies = [r["policy"] for r in pts[0]["results"]]
        searched = any(r.get("gpus_searched") for p in pts for r in p["results"])
        fig, axes = plt.subplots(1, 2 if searched else 1, figsize=(11 if searched else 6, 4), squeeze=False)
        ax = axes[0][0]
        for i, pol in enumerate(policies):
            ax.plot(xs, [_nines(p["results"][i]["attainment"]) for p in pts], "o-", label=pol, color=colors.get(pol))
        _nines_axis(ax, target)
        ax.set_xlabel(param)
        ax.set_title(f"{report['scenario']}: SLO attainment ({pts[0]['gpus']} GPUs)")
        ax.legend()
        ax.grid(alpha=0.3)
        if searched:
            ax = axes[0][1]
            for i, pol in enumerate(policies):
                ys = [p["results"][i].get("gpus_needed") for p in pts]
                ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], "o-",
                        label=pol, color=colors.get(pol))
            ax.set_xlabel(param)
            ax.set_ylabel(f"fewest GPUs for {target:.0%} within SLO")
            ax.set_ylim(bottom=0)
            ax.set_title("GPUs needed")
            ax.legend()
            ax.grid(alpha=0.3)
    else:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        ax = axes[0]
        for r in report["results"]:
            ys = [(q, v) for q, v in zip(LATENCY_PCTS, r.get("latency_pct_ms") or []) if v is not None]
            if ys:
                ax.plot([v for _, v in ys], [q for q, _ in ys], label=r["policy"], color=colors.get(r["policy"]))
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("requests (%)")
        ax.set_title(f"{report['scenario']}: latency CDF ({report['functions']} functions)")
        ax.legend()
        ax.grid(alpha=0.3)
        ax = axes[1]
        pols = [r["policy"] for r in report["results"]]
        ax.bar(pols, [_nines(r["attainment"]) for r in report["results"]], color=[colors.get(p) for p in pols])
        _nines_axis(ax, target)
        ax.set_title(f"SLO attainment ({report['gpus']} GPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"wrote {path}"


# ------------------------------------------------------------------------------------------------
# Command line (`torpor simulate`, loadtest/simulate.py)
# ------------------------------------------------------------------------------------------------

DEFAULT_SCENARIO = Path(__file__).resolve().parent.parent / "loadtest" / "scenarios" / "h100x4.json"


def add_arguments(p: Any) -> None:
    p.add_argument("--scenario", default=str(DEFAULT_SCENARIO), help="scenario JSON (default: %(default)s)")
    p.add_argument("--policy", action="append", choices=list(CLI_POLICIES),
                   help="policy to run (repeatable; default: the scenario's list); also the paper's "
                        f"{', '.join(PAPER_POLICIES)} (torpor.paper_sim) on the same arrivals")
    p.add_argument("--gpus", type=int, default=None, help="override the scenario's GPU count")
    p.add_argument("--functions", type=int, default=None, help="override the scenario's function count")
    p.add_argument("--duration", type=float, default=None, help="override the workload's duration (s)")
    p.add_argument("--workload", choices=["trace", "synthetic"], default=None, help="override the workload kind")
    p.add_argument("--trace", default=None, help="trace .npy (default: ../shared/data/ beside the project)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--search-gpus", type=int, default=None,
                   help="find the fewest GPUs (up to N) reaching the target attainment; 0: skip")
    p.add_argument("--sweep", default=None, metavar="PARAM=START:STOP:STEP",
                   help=f"run every policy at each value of one of {list(SWEEP_PARAMS)} "
                        "(e.g. functions=300:600:50; overrides the scenario's 'sweep'); 'none': no sweep")
    p.add_argument("--json", default=None, help="write the report here (default: sim-<scenario>.json)")
    p.add_argument("--plot", default=None, help="write the PNG here (default: the JSON's name with .png)")


def run_cli(args: Any) -> int:
    try:
        p = Path(args.scenario)
        spec = json.loads(p.read_text())
        for attr, key in (("gpus", "gpus"), ("functions", "functions"), ("seed", "seed")):
            if getattr(args, attr) is not None:
                spec[key] = getattr(args, attr)
        if args.duration is not None or args.workload is not None:
            spec["workload"] = dict(spec.get("workload") or {})
            if args.duration is not None:
                spec["workload"]["duration_s"] = args.duration
            if args.workload is not None:
                spec["workload"]["kind"] = args.workload
        sweep_arg = getattr(args, "sweep", None)
        if sweep_arg is not None:
            if sweep_arg.strip().lower() == "none":
                spec.pop("sweep", None)
            else:
                spec["sweep"] = sweep_arg
        sc = parse_scenario(spec, base=p.parent, source=str(p))
        if sc.sweep is not None:
            param, values = sc.sweep
            report = sweep(spec, param, values, base=p.parent, source=str(p), policies=args.policy,
                           trace_path=args.trace, search_gpus=args.search_gpus,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
            table = format_sweep(report)
        else:
            extras = (paper_extras(spec, base=p.parent, source=str(p))
                      if any(x in PAPER_POLICIES for x in args.policy or sc.policies) else None)
            report = compare(sc, policies=args.policy, trace_path=args.trace, search_gpus=args.search_gpus,
                             extras=extras)
            table = format_table(report)
    except (OSError, json.JSONDecodeError) as e:
        print(f"torpor simulate: cannot read scenario {args.scenario}: {e}", file=sys.stderr)
        return 2
    except (ScenarioError, WorkloadError, TopologyError) as e:
        print(f"torpor simulate: {e}", file=sys.stderr)
        return 2
    print(table)
    out = Path(args.json or f"sim-{sc.name}.json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    print(write_plot(report, getattr(args, "plot", None) or out.with_suffix(".png")))
    return 0
