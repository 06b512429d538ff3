"""Discrete-event simulator: the real Scheduler, CostModel and eviction policies on virtual time.

    result = simulate(load_scenario("torpor/sim/scenarios/h100x4.json"), policy="torpor")  # torpor.sim.report
    result = Simulation(scenario, "torpor").run(times, fns, duration)

`Simulation` (here) is the node: its devices and their residents, the cost model, the
scheduler and the links. `run` replays arrivals through it: `torpor.sim.replay.Replay` is the
event loop and its handlers (requests placed at arrival, copies started at placement), and
`torpor.sim.staged.StagedReplay` the same loop with the server's admission (`Staging`).

What is simulated, and how:

- **Devices**: N GPUs, each with a weight budget (bytes; no fragmentation: the block arena's
  fragmentation is bounded by eviction, see `torpor.runtime.memory`), one request executing at a time,
  a FIFO queue. Topology is a node template (PCIe per GPU, PCIe-switch siblings, NVLink pairs
  with bandwidths; `torpor.scheduling.costmodel.LinkMap`) repeated for every `gpus_per_node` GPUs.
- **Transfers** (`torpor.sim.physics.LinkSharing`): under processor sharing (the default,
  `link_physics="shared"`; the command lines take it from `--links` or `TORPOR_SIM_LINKS`)
  every copy on a link moves at its share of the narrowest link on its path and is re-rated
  as copies start and land; Torpor's scheduler sees when each copy should land if none joins
  (`ResidentState.eta`). Under fixed shares (`"fixed"`) a copy keeps the share it started
  with. Torpor's scheduler may have a copy wait for its path to clear (`Option.start_s`);
  such a copy moves nothing until then, and then takes the share any copy starting then
  gets, so it shares the link with copies started meanwhile (under processor sharing it
  takes no share until then, and waits longer where starting would slow a copy started
  meanwhile past the deadline of a request waiting on it; under fixed shares it holds its
  place on the links meanwhile). A device computing a request whose model is still landing
  starts when the first group has landed and ends no earlier than the last group lands
  (pipelined swap).
- **Execution**: the model's profiled time times lognormal noise (`exec_noise`); each measured
  time refines the CostModel's moving estimate exactly as the engine's measurements do.
- **Prediction error** (`errors`, `torpor.sim.errors.Errors`; default the scenario's, none):
  the TRUE times drive the events, and differ from what the scheduler is told by per-copy
  jitter, a bandwidth misestimate (true links `true_links`; the scheduler's cost model keeps
  the scenario's), heavy-tailed execution noise and compute slowed while copies move into the
  device. The scheduler sees its own estimates: copies in flight by their progress at the
  bandwidths it believes (`ResidentState.ready_at` is its belief until the copy lands), the
  running batch by its start and its time without the errors; it learns from each run's
  measured execution (`CostModel.observe_exec`) and, where the cost model has it, from each
  landed copy (`observe_copy(path, nbytes, seconds, predicted_s=...)`). The scenario's
  `exec_noise` is drawn as before and the scheduler is told when the running batch ends with
  it (as this simulator always has); only the errors' execution noise is hidden from it.
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
  (`scheduler.HOPELESS_DELAY_S`). The rule is the server's own (`torpor.scheduling.admission.work_ahead`,
  which `torpor.runtime.placer` calls too); the simulator tells it when the running batch ends and when
  the new request's model would land on each device.
- **Work ahead** (`DeviceState.backlog_s`, what the scheduler is told): the projected end of the
  work queued ahead of the request being placed (all of it in FIFO order; under deadline order,
  what runs now and what is due before it, `torpor.scheduling.admission.work_ahead`), counting for each
  queued request the wait for its own copy to land, not only execution estimates (a queue of
  cold requests holds a device longer than the sum of their run times).
- **The server's admission** (`Staging`, a scenario's `"staging"` field, or
  `Simulation(..., staging=Staging())`): as `torpor.runtime.staging`, `torpor.runtime.residency` and the engine
  do it, with `torpor.scheduling.admission`'s rules. Each device hands out `1 + lookahead` stages in queue
  order (urgent requests at once); only a staged request pins its model and evicts (idle
  residents, those other requests wait for last). A request whose decision is a copy starts it
  at arrival where that evicts only idle models no waiting request wants (`spare_victims`),
  else when it is staged, roughly when the request `lookahead` places ahead of it starts to
  run. Copies to one device go one at a time at the path's full rate (the CPU device's copy
  thread, a CUDA device's copy stream). The scheduler sees when a new request would be staged
  (`DeviceState.stage_in_s`), and, as the server's placer shows it, a model a queued request
  not yet staged will copy in as a resident (pinned, its bytes taken from the free bytes)
  landing by the time that request runs (`torpor.scheduling.admission.planned_residents`), so later
  requests of that model queue behind it rather than each pricing a copy. With `shed`: a request predicted past its whole SLO is answered
  UNAVAILABLE at arrival, and so is one whose copy would evict a model waiting requests want
  when the work queued there outlasts its slack; a request whose copy would harm or cost
  waiting requests is deferred while it has slack (`harm_level`); when staged, one that can no
  longer be on time, still harms them, or costs them and would stall the device past a queued
  request's guard (`would_delay`) is answered then. The run reports `shed_arrival`,
  `shed_queued` and, with `max_outstanding`, arrivals the client `dropped`. Without it (the
  default) copies start at placement and nothing is shed: the model the README's simulator
  numbers were measured with.
- **Decisions**: `torpor.scheduling.scheduler.Scheduler.place` on a `Snapshot` the simulator keeps up to
  date (device states are the simulator's own state objects, not copies); eviction order from
  `torpor.scheduling.eviction` (CostAwarePolicy for "torpor", LRUPolicy for "lru-swap"). When no device
  can make room (everything pinned), the request waits and is retried when work finishes.
- **Workload** (`torpor.sim.workload.make_arrivals`): the paper's trace turned into arrivals as its README
  says, or a synthetic generator with the trace's statistics (optionally Zipf, on/off bursts,
  diurnal).

Nothing here imports torch: it runs on any machine with numpy.
"""

from __future__ import annotations

import math
import time

import numpy as np

from torpor.scheduling.costmodel import CostModel, ExecEstimator
from torpor.scheduling.eviction import RateMeter
from torpor.scheduling.scheduler import (
    POLICIES,
    DeviceState,
    ModelInfo,
    ResidentState,
    Scheduler,
    Snapshot,
    static_assignment,
)
from torpor.sim.errors import Errors
from torpor.sim.physics import DEFAULT_LINK_PHYSICS, LINK_PHYSICS, LinkSharing, true_links
from torpor.sim.replay import Replay
from torpor.sim.scenario import Scenario, ScenarioError, Staging
from torpor.sim.staged import StagedReplay
from torpor.sim.state import SimResult, _Dev


class Simulation:
    """The simulated node: devices, residents, the cost model, the scheduler and the links.
    `run` replays arrivals through it."""

    def __init__(self, scenario: Scenario, policy: str, n_gpus: int | None = None, *,
                 staging: Staging | None = None, link_physics: str = DEFAULT_LINK_PHYSICS,
                 errors: Errors | None = None):
        """`staging`: the server's admission (`Staging`); default the scenario's.
        `link_physics`: "shared" (processor sharing, the default) or "fixed" (a copy keeps the
        share it started with); `torpor.sim.physics.LinkSharing`. `errors`: how the true
        transfer and execution times differ from what the scheduler is told
        (`torpor.sim.errors.Errors`); default the scenario's."""
        if policy not in POLICIES:
            raise ScenarioError(f"policy: unknown policy {policy!r}; expected one of {list(POLICIES)}")
        if link_physics not in LINK_PHYSICS:
            raise ScenarioError(f"link_physics: expected one of {list(LINK_PHYSICS)}, got {link_physics!r}")
        self.sc = scenario
        self.policy = policy
        self.n = n_gpus or scenario.gpus
        self.errors = scenario.errors if errors is None else errors
        self.links = scenario.links(self.n)  # what the scheduler believes (its cost model's)
        # the truth: the copies' physics (`true_cost`: first groups, staged copies)
        self.true_links = true_links(scenario.links(self.n), self.errors.bandwidth_factor)
        mix = scenario.models
        self.fn_model = [mix[f % len(mix)] for f in range(scenario.functions)]
        est = ExecEstimator()
        for f, m in enumerate(self.fn_model):
            for b in range(1, m.max_batch + 1):  # the load-time profile (a few warm runs in the engine)
                est.seed(f, m.exec_seconds(b), b)
        self.cost = CostModel(self.links, est, scenario.copy_latency_s)
        self.true_cost = CostModel(self.true_links, transfer_latency_s=scenario.copy_latency_s)
        self.devs = [_Dev(DeviceState(name, scenario.weight_budget, scenario.weight_budget, version=0))
                     for name in self.links.devices]
        self.by_name = {d.state.name: d for d in self.devs}
        self.rates = [RateMeter(tau=60.0) for _ in range(scenario.functions)]
        self.holder_count: dict[int, int] = {}
        self.inflight: dict[str, int] = {}
        shared = link_physics == "shared"
        self.xfer = LinkSharing(self.true_links, self.cost.transfer_latency_s, self.inflight, shared,
                                belief=self.links)
        self.snap = Snapshot(0.0, [d.state for d in self.devs], self.inflight,
                             lambda k: self.rates[k].rate(self.snap.now), self.holder_count,
                             self.xfer if shared else None, self.xfer.clear_at)
        self.first_at: dict[tuple[str, int], float] = {}
        self.static_map: dict[int, str] = {}
        self.scheduler = Scheduler(self.cost, policy)
        self.queue_order = "deadline" if policy == "torpor" else "fifo"
        self.models = [ModelInfo(f, m.nbytes, m.first_group_bytes, m.slo_s) for f, m in enumerate(self.fn_model)]
        self.staging = staging if staging is not None else scenario.staging
        if self.staging is not None:
            # as the server's placer sees copies: counts per link and when each link clears,
            # not the bytes each copy has left; copies are the devices' own
            # (`StagedReplay.start_copy`), which keep `link_clear_at` up to date
            clear: dict[str, float] = {}
            self.link_clear_at = clear
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
                self.evict(d, min(d.state.residents.values(), key=lambda r: r.last_used).key)
            r = self.add_resident(d, f, 0.0, 0.0)
            r.last_used = i - len(functions)

    def prepare_static(self, arrivals_fn: np.ndarray, duration: float) -> None:
        """`static`: every function assigned to one device by its load and loaded before traffic."""
        counts = np.bincount(arrivals_fn, minlength=self.sc.functions)
        items = [(f, m.nbytes, counts[f] / duration * m.exec_s) for f, m in enumerate(self.fn_model)]
        self.static_map = static_assignment(items, [(d.state.name, d.state.capacity) for d in self.devs])
        self.scheduler.static_map = self.static_map
        for f, name in self.static_map.items():  # native: loaded before traffic, resident forever
            self.add_resident(self.by_name[name], f, 0.0, 0.0)

    def add_resident(self, d: _Dev, f: int, first: float, full: float) -> ResidentState:
        """`f` resident on `d`, its first group landing at `first`, the rest at `full`."""
        r = ResidentState(f, self.models[f].nbytes, ready_at=full, last_used=self.snap.now)
        d.state.residents[f] = r
        d.state.version += 1
        d.state.free_bytes -= r.nbytes
        self.holder_count[f] = self.holder_count.get(f, 0) + 1
        self.first_at[(d.state.name, f)] = first
        return r

    def evict(self, d: _Dev, f: int) -> None:
        r = d.state.residents.pop(f)
        d.state.version += 1
        d.state.free_bytes += r.nbytes
        self.holder_count[f] -= 1
        self.first_at.pop((d.state.name, f), None)

    def run(self, arrivals_t: np.ndarray, arrivals_fn: np.ndarray, duration: float, *,
            stop_below: float | None = None, max_outstanding: int | None = None) -> SimResult:
        """Replay the arrivals (`torpor.sim.replay.Replay`; with `staging`, `torpor.sim.staged.StagedReplay`).
        `stop_below`: give up (attainment reported as an upper bound, `stopped` set) once more
        requests have missed their SLO than that attainment allows; the GPU-count search uses
        it to skip hopeless configurations. `max_outstanding` (with `staging`): an arrival
        finding that many requests unanswered is not sent (a load client's cap, as
        loadtest/e2e.py's --max-outstanding). Per request afterwards: `latency` (inf: not
        answered) and `status` (ANSWERED, SHED_ARRIVAL, ...)."""
        t_wall = time.perf_counter()
        replay = (StagedReplay if self.staging is not None else Replay)(
            self, arrivals_t, arrivals_fn, duration, stop_below=stop_below, max_outstanding=max_outstanding)
        replay.replay()
        return replay.result(time.perf_counter() - t_wall)
