"""The discrete-event simulator's state: a request admitted to a device (`_Job`), a device
(`_Dev`), event and status codes, and a run's `SimResult`. See `torpor.sim.simulation`."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torpor.scheduling.scheduler import DeviceState, ResidentState

_DONE, _LANDED, _WAKE, _BEGIN, _COPIED, _STAGE, _RELEASE = 0, 1, 2, 3, 4, 5, 6
_MOVING = 7  # a staged copy starts moving (compute slowed by copies, `torpor.sim.physics.Compute`)
_EXPIRE = 8  # a waiting request's last moment to be staged and still on time (`StagingQueue.enter`'s expire_at)


LATENCY_PCTS = [*range(0, 90, 2), *np.round(np.arange(90, 100, 0.25), 2).tolist(), 99.5, 99.9, 100]
_RETRIES = 4
# what became of each request (`Simulation.status`)
ANSWERED, SHED_ARRIVAL, SHED_QUEUED, DROPPED, UNSERVED = 0, 1, 2, 3, 4
_ACTION_CODE = {"run": 1, "queue": 2, "swap": 3, "peer": 4}


class _Job:
    """A request admitted to a device; what `torpor.scheduling.admission` reads of it (`Queued`) are the
    same fields as the server's `torpor.runtime.placer.Ticket`."""

    __slots__ = ("arrival", "copy_s", "defer_until", "due", "enqueued", "estimate", "first_at", "fn", "guard",
                 "key", "meets_pred", "passed", "probe", "ready", "resident", "rid", "riders", "source", "staged",
                 "started_at", "transfer")

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
        self.probe = False  # let through although predicted hopeless (admission.probe): never shed
        # its stage queue is passing it over (deferred) now: ahead of no one (`admission.work_ahead`);
        # kept as torpor.runtime.staging.StagingQueue keeps the placer's `Ticket.passed`
        self.passed = False
        # (rid, arrival) of the requests riding in its batch without a stage of their own (staging
        # with dynamic batching: torpor.runtime.device_path's open `_DeviceBatch`)
        self.riders: tuple[tuple[int, float], ...] = ()  # grown only when one rides (at most a batch)

    @property
    def seq(self) -> int:
        return self.rid

    @property
    def model(self) -> int:
        """The model it runs (queued requests of one model share one copy, `torpor.scheduling.admission`)."""
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
    compute_s: float = 0.0  # of that, computing (as started: a copy re-rating it later is not counted)
    copy_wait_s: float = 0.0  # and waiting for its model's copy (the placer's run account, simulated)
    proj_end: float = 0.0  # when the work queued so far should be done (estimates, transfer stalls)
    queued_fn: dict = field(default_factory=dict)  # function -> requests of it in the queue
    open_batch: dict = field(default_factory=dict)  # function -> the job whose batch is open (staging)
    hold_until: float = -1.0  # a short batch waits for more requests until then
    next_key: float = 0.0  # deadline queue: where the request being placed would go
    batches: int = 0
    batched: int = 0  # requests run in those batches
    run_start: float = 0.0
    exec_end: float = 0.0  # when the running batch's compute would end if its copy had landed
    bexec_end: float = 0.0  # the same as the scheduler sees it (`torpor.sim.errors`: without the errors)
    compute: Any = None  # compute slowed by copies moving into it (`torpor.sim.physics.Compute`; None: never)
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
