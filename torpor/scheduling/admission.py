"""Queue admission: where a request joins a device's queue, and when it may take device memory.

Pure functions over plain data (no asyncio, no torch, no clock): the server's placer
(`torpor.runtime.placer`) and staging queues (`torpor.runtime.staging`, `torpor.runtime.residency`) and the simulator
(`torpor.sim.simulation`) call the same ones, so the simulator predicts what the server does rather
than what a second copy of its policy does.

**Where a request queues** (`work_ahead`). A device serves its queue lowest key first. Under
deadline order a request's key is its deadline (arrival + SLO), so it goes ahead of queued work
with time to spare, unless going ahead would push a queued request that is still on time now
past its guard (arrival + SLO x the scheduler's margin): then it queues behind them all. The
work ahead of it (what the scheduler is told, `DeviceState.backlog_s`) is what runs now and the
requests queued before it, each ending no sooner than its estimate after the one before and its
model's landing. A request takes memory, and starts its copy, only once it is staged: when the
request `lookahead` places ahead of it starts to run. So a queued request whose copy has not
started lands its model `transfer` seconds after its projected stage time, and a new request
would be staged (`DeviceState.stage_in_s`) when the request `lookahead` places ahead of its
place starts.

**When it takes memory** (the staging rules; `torpor.runtime.staging` holds the queue itself). A device
hands out `permits` stages (execution slots + lookahead), lowest order first:

- `stage_at_once`: a free stage and nobody waiting, or urgent: more urgent than every waiting
  request and than a staged one (up to twice the permits), so that a request staged a moment
  earlier does not run first whatever its deadline.
- `stage_next`: the next waiting request to stage, passing over those deferred (`deferred`):
  with an objective, a request waits while staging it would evict a model other requests with
  an objective wait for (HARMS), or any model while requests needing no copy wait (COSTS)
  (`harm_level`), until `defer_deadline`; `stage_level` is what it still does
  when it gets its stage.
- `shed_when_staged`: once staged, a request that can no longer finish by its deadline, that
  still HARMS waiting requests, or that COSTS them and would stall the device past a queued
  request's guard (`would_delay`), is answered at once (UNAVAILABLE) instead of taking memory.
- `shed_at_arrival`: a request the scheduler predicts will finish past its whole SLO wherever
  it goes is answered at once; so is one whose copy would HARM waiting requests when the work
  queued on the device already outlasts its slack (`outlasted`). Except a `probe`: when the
  model's own execution estimate misses its objective and the model has not run for a while,
  one request goes through and is not shed, so that the estimate can correct itself.
- `spare_victims`: a copy may start at arrival, before its request is staged, where it evicts
  only idle models no waiting request wants.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, Protocol

from torpor.scheduling.eviction import Candidate, EvictionPolicy
from torpor.scheduling.scheduler import Decision, ResidentState, hopeless


class Queued(Protocol):
    """A request admitted to a device: the placer's `Ticket`, the simulator's job."""

    key: float  # its place in the device's queue (lowest first)
    seq: int  # admission order: ties in key go first come, first served
    estimate: float  # seconds of device time its run adds
    due: float  # arrival + SLO (inf: none)
    guard: float  # arrival + SLO x margin: no request may push it past that
    ready_at: float  # when its model has landed on the device (0: already; a copy not started: the plan's landing)
    transfer: float  # seconds its copy takes once it starts (0: none)
    staged: bool  # it holds a stage: its copy, if any, has started
    started_at: float | None  # its run began (None: still queued)
    # Optional: `first_at`, when its model's first group lands on the device (a pipelined run
    # cannot start before it); a ticket without one counts 0. `model`: the model it runs; where
    # given, only the first queued request of a model whose copy has not started counts the
    # copy (the others find the model landing when they are staged). `passed`: its staging
    # queue is passing it over (deferred) right now: it runs after the requests that pass it,
    # or is shed, so it is ahead of no one and left out of the projection.


def _first_at(k: Queued) -> float:
    return getattr(k, "first_at", 0.0)


# ------------------------------------------------------------------------------------------------
# where a request queues
# ------------------------------------------------------------------------------------------------


def work_ahead(tickets: Iterable[Queued], now: float, due: float | None, exec_s: float, lookahead: int = 1, *,
               free_at: float | None = None, own_ready: Callable[[], float] | None = None,
               ends: list[tuple[Queued, float]] | None = None) -> tuple[float, float, float]:
    """For a request due at `due` (None: first come, first served) taking `exec_s` to run on a
    device holding `tickets`: (seconds until the device reaches it, its queue key, seconds
    until it would be staged and could start its copy). See the module docstring.

    `tickets`: those running (`started_at` set) and those queued, in admission order.
    `free_at`: when the running work ends, where the caller knows it (the simulator's clock);
    else projected from the running tickets. `own_ready()`: when the request's own model would
    land there (it holds the device until then once it runs), asked only where it would go
    ahead of a queued request; None: it counts only its run.
    `ends`: filled with (ticket, projected end) for the queued tickets in queue order."""
    t = now
    queued = []
    landing: dict[Any, float] = {}  # model -> when it lands in this projection
    for k in tickets:
        if k.started_at is not None:
            if free_at is None:
                t = max(t, k.started_at + k.estimate, k.ready_at)
            _lands(landing, k, k.ready_at)
        elif not getattr(k, "passed", False):  # passed over (deferred) now: ahead of no one
            queued.append(k)
    if free_at is not None:
        t = max(t, free_at)
    if due is not None:
        queued.sort(key=_queue_order)
    starts: list[float] = []  # projected run start of each queued request

    def stage_at(i: int, t: float) -> float:
        if lookahead <= 0:
            return t  # staged when the device reaches it
        return starts[i - lookahead] if i >= lookahead else now

    def end(k: Queued, i: int, t: float) -> float:
        if k.staged or not k.transfer:
            ready = k.ready_at
        else:  # its copy starts when it is staged, unless an earlier request's copy brings its model
            ready = landing.get(getattr(k, "model", None), stage_at(i, t) + k.transfer)
        _lands(landing, k, ready)
        starts.append(t)
        t = max(max(t, _first_at(k)) + k.estimate, ready)
        if ends is not None:
            ends.append((k, t))
        return t

    if due is None:
        for i, k in enumerate(queued):  # tickets are kept in arrival order
            t = end(k, i, t)
        return t - now, math.inf, stage_at(len(queued), t) - now
    ahead = at = t2 = None
    harm = False
    for i, k in enumerate(queued):
        if ahead is None and k.key > due:
            ahead, at = t, i
            t2 = t + exec_s if own_ready is None else max(t + exec_s, own_ready())
        t = end(k, i, t)
        if t2 is not None and not harm:
            t2 = max(max(t2, _first_at(k)) + k.estimate, k.ready_at)
            if t2 > k.guard and t <= k.due:  # on time without it, past its guard with it in front
                harm = True
    if ahead is None or harm:
        return t - now, max(due, queued[-1].key) if queued else due, stage_at(len(queued), t) - now
    return ahead - now, due, stage_at(at, ahead) - now


def planned_residents(ends: Iterable[tuple[Queued, float]], residents: Collection[Any],
                      nbytes: Callable[[Any], int], now: float) -> list[ResidentState]:
    """The models queued requests will copy in, as the scheduler should see them: for the first
    request in `ends` (`work_ahead`'s (ticket, projected end), queue order) of each model not in
    `residents` that has a copy to make and no stage yet, a resident of `nbytes(model)` bytes,
    pinned, landing by the time that request runs (its projected end less its estimate). The
    caller adds them to the device's residents and takes their bytes off its free bytes."""
    out: dict[Any, ResidentState] = {}
    for k, end in ends:
        m = getattr(k, "model", None)
        if k.transfer and not k.staged and m is not None and m not in residents and m not in out:
            out[m] = ResidentState(m, nbytes(m), ready_at=end - k.estimate, pins=1, last_used=now)
    return list(out.values())


def _lands(landing: dict[Any, float], k: Queued, ready: float) -> None:
    m = getattr(k, "model", None)
    if m is not None and m not in landing:
        landing[m] = ready


def _queue_order(k: Queued) -> tuple[float, int]:
    return k.key, k.seq


# ------------------------------------------------------------------------------------------------
# when a request takes memory
# ------------------------------------------------------------------------------------------------

# What staging a request now would do to the requests waiting for the device (`harm_level`).
FREE, COSTS, HARMS = 0, 1, 2
# A deferred request is staged this long before the last moment it could start its copy and
# still be on time: its turn on the device comes a run or two later.
DEFER_MARGIN_S = 0.005


def shed_at_arrival(decision: Decision | None) -> bool:
    """Answer at once: predicted to finish past its whole SLO wherever it goes."""
    return decision is not None and hopeless(decision)


# A model none of whose requests ran for this long gets one predicted hopeless through (`probe`).
PROBE_INTERVAL_S = 0.5
# A model asked for whose requests have all been refused for this long gets one through (`probe`).
STARVED_S = 1.0


def probe(now: float, last_run: float, last_probe: float, exec_s: float, slo_s: float,
          interval: float = PROBE_INTERVAL_S, starved: float = STARVED_S) -> bool:
    """Serve a request that would be shed at arrival (`shed_at_arrival`, or its copy `outlasted`
    the requests it harms), and neither defer nor shed it when staged, when no probe of its
    model went in the last `interval` seconds and either

    - its own execution estimate (`exec_s`) already exceeds its objective, so it would be
      refused on an idle device too, and its model has not run for `interval` (`last_run`: its
      last run's end). A model's execution estimate corrects itself only when the model runs:
      without probes a pessimistic one (a profile taken on a busy machine, a slow first run)
      shed every request of that model for good, however idle the device; or
    - its model has not run for `starved` seconds: under overload the requests for the model
      the device does not hold were refused for good, at arrival for the queue ahead plus
      their copy, or because that copy would evict a model others wait for (three models
      asked for equally, room for two, eight times what the device serves: the third was not
      served once in 6 s). The probe takes its place in deadline order (not the hopeless
      key behind everyone, where under overload it would wait for good) and is served late
      rather than never.

    Costs at most one run (and its copy) per model per `interval`, and per `starved` seconds
    for a model the device otherwise does not serve."""
    if now - last_probe < interval:
        return False
    return now - last_run >= (interval if exec_s >= slo_s else starved)


def outlasted(backlog_s: float, slack_s: float) -> bool:
    """A request whose copy would HARM waiting requests waits for them (deferral) and is shed
    if they outlast its slack (`slack_s`: until it must start its copy and run to be on time);
    answer it at arrival when the work queued on the device (`backlog_s`) already does."""
    return backlog_s > slack_s


def urgent(order: float, held: int, permits: int, head: float, holders: Iterable[float]) -> bool:
    """More urgent than every waiting request (`head`: the lowest waiting order) and than a
    staged one (`holders`: their orders), with fewer than twice the permits held."""
    return order < head and held < 2 * permits and any(order < h for h in holders)


def stage_at_once(order: float, held: int, permits: int, head: float | None, holders: Iterable[float]) -> bool:
    """A request asking for a stage gets one without waiting (deferral aside): a stage is free
    and nobody waits (`head` None), or it is `urgent`."""
    if head is None and held < permits:
        return True
    return urgent(order, held, permits, math.inf if head is None else head, holders)


def expires_at(due: float, estimate: float) -> float:
    """The last moment a request still waiting for its stage could start its run and end by its
    deadline `due`: one still waiting then is refused then ("late"), not whenever a stage comes
    (the staging queue's `expire_at`, the simulator's `_EXPIRE`). inf without an objective."""
    return due - estimate if math.isfinite(due) else math.inf


def defer_deadline(due: float, estimate: float, copy_s: float, margin: float = DEFER_MARGIN_S) -> float:
    """Until when a request with an objective may be passed over: `margin` before it could no
    longer start its copy and run by its deadline. 0 (never deferred) without an objective."""
    return due - estimate - copy_s - margin if math.isfinite(due) else 0.0


def deferred(now: float, defer_until: float, level: Callable[[], int]) -> bool:
    """Passed over for now: it may be deferred, and staging it would cost or harm others
    (`level`, asked only when it matters: it walks the device's residents)."""
    return defer_until > 0 and now < defer_until and level() > FREE


def stage_level(defer_until: float, level: Callable[[], int]) -> int:
    """What staging it does to others when it gets its stage: FREE for a request that may not
    be deferred; else `level()`, above FREE only once its time ran out (else it would have been
    passed over)."""
    return FREE if defer_until <= 0 else level()


def stage_next(waiting: Sequence[Any], now: float, defer_until: Callable[[Any], float],
               level: Callable[[Any], int], start: int = 0) -> tuple[int | None, float]:
    """Which waiting request (`waiting` in stage order: lowest order first, ties first come) to
    stage next when a stage is free, scanning from `start`: the first not `deferred`. Returns
    (its index or None, the earliest time a request passed over stops being deferred, inf if
    none). The caller stages it, updates what is wanted, and asks again from that index while
    stages are free (those passed over are not looked at again until something changes)."""
    wake = math.inf
    for i in range(start, len(waiting)):
        w = waiting[i]
        until = defer_until(w)
        if deferred(now, until, lambda w=w: level(w)):
            wake = min(wake, until)
            continue
        return i, wake
    return None, wake


def harm_level(key: Any, need: int, residents: Collection[Any], victims: Iterable[tuple[Any, int]],
               wanted: Collection[Any]) -> int:
    """What making `need` bytes of room for `key` on a device holding `residents` (keys) does
    to the requests waiting there: HARMS where it would evict a model in `wanted` (models that
    waiting requests with an objective want); COSTS where it evicts only models no one waits
    for but a wanted model is resident (requests that need no copy wait); else FREE.
    `victims`: (key, bytes) in the order the device would evict them, residents in use
    included (`victim_order`), wanted ones last.

    COSTS defers the copy (`deferred`) to its last moment: copying now takes device time from
    the requests that need none (the copy cannot land while the model it replaces still runs),
    and later requests for `key` arriving meanwhile share the one copy. It once held only for
    victims requested more often than `key`, and copies over colder models went through a
    request or two at a time while the device's queue waited (docs/under-load.md)."""
    if key in residents or need <= 0:
        return FREE
    freed = 0
    for k, nbytes in victims:
        if k in wanted:
            return HARMS
        freed += nbytes
        if freed >= need:
            break
    return COSTS if any(k in residents for k in wanted) else FREE


def victim_order(policy: EvictionPolicy, candidates: list[Candidate], now: float,
                 keep: Collection[Any] = ()) -> list[Candidate]:
    """Residents in eviction order: the policy's, those in `keep` (models with requests waiting
    for this device) last."""
    ordered = policy.order(candidates, now)
    if keep:
        ordered.sort(key=lambda c: c.key in keep)  # stable: the policy's order within each part
    return ordered


def spare_victims(victims: Iterable[Candidate], free: int, need: int, keep: Collection[Any]) -> list[Candidate] | None:
    """A copy started before its request is staged (nothing pinned) may evict only idle models
    no waiting request wants (`victims`: the idle residents in eviction order), and nothing
    unless that makes room: the ones to evict, in order, or None."""
    out, room = [], free
    for c in victims:
        if room >= need:
            break
        if c.key in keep:
            continue
        out.append(c)
        room += c.nbytes
    return out if room >= need else None


def would_delay(others: Iterable[Queued], now: float, busy_s: float, lookahead: int = 1) -> bool:
    """Holding the device `busy_s` from now (a run, plus a copy that cannot land under the run
    ahead) would push a request queued there (`others`) that is on time now past its guard:
    the harm check of `work_ahead`, for a request due now."""
    return work_ahead(others, now, now, busy_s, lookahead)[1] != now


def shed_when_staged(now: float, estimate: float, copy_s: float, resident: bool, due: float, level: int,
                     stalls: Callable[[], bool] = lambda: False) -> str | None:
    """A staged request's last look before it takes memory: "late" if it can no longer finish
    by `due` (its run, plus a copy where its model is not on the device); "harms" if it was
    staged while its copy still evicts a model waiting requests want (`level` HARMS: only once
    its deferral ran out); "stalls" if it was passed over because its copy COSTS requests
    needing none, its model is not there, and stalling the device for the copy would make a
    queued request late (`stalls()`, e.g. `would_delay`); None: it goes ahead."""
    if now + estimate + (0.0 if resident else copy_s) > due:
        return "late"
    if level == HARMS:
        return "harms"
    if level == COSTS and not resident and stalls():
        return "stalls"
    return None
