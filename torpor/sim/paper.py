"""The Torpor paper's own policies, as pure decision logic over small state objects.

These are the baseline our scheduler (`torpor.scheduling.scheduler`) is measured against; `torpor.sim.paper_sim`
runs them on virtual time. Everything here follows the paper (USENIX ATC '25, §3; see
`../shared/background/torpor.md`) and, where the paper leaves a point open, its authors'
prototype; every such choice is listed in `AMBIGUITIES` (README repeats it).

- **Model classes** (`classify`): light / medium / heavy from a profile of resident vs host-swap
  latency (the paper's "heavy if a PCIe swap makes it noticeably slower").
- **Placement** (`algorithm1`, `random_placement`): Algorithm 1 over the idle GPUs: run where an
  idle GPU holds the model; else the fastest NVLink copy from a busy holder to an idle GPU; else a
  host copy to the idle GPU whose PCIe-switch siblings are doing the least interfering work.
- **Eviction** (`evict_two_list`, `evict_lru`): the cheap list (light models, and models with a
  replica elsewhere) first, then the protected list (medium/heavy single copies), each least
  recently used first; models a peer copy is reading are skipped.
- **Queue** (`RRCQueue`, `FIFOQueue`): the required-request-count queue with its two groups and
  adaptive boundary, or plain arrival order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

LIGHT, MEDIUM, HEAVY = 0, 1, 2
CLASS_NAMES = {LIGHT: "light", MEDIUM: "medium", HEAVY: "heavy"}

# What a GPU is doing, in the order the host-copy rule prefers for a candidate's PCIe-switch
# sibling (the prototype's ranking): idle < running a resident model < receiving an NVLink copy
# < host copy of a light / medium / heavy model.
ACT_IDLE, ACT_LOCAL, ACT_NVLINK, ACT_PCIE_LIGHT, ACT_PCIE_MEDIUM, ACT_PCIE_HEAVY = -1, 0, 1, 2, 3, 4


def host_activity(cls: int) -> int:
    return ACT_PCIE_LIGHT + cls


def classify(resident_s: float, host_swap_s: float, *, medium_at: float = 1.3, heavy_at: float = 2.0) -> int:
    """A model's class from its profiled latency resident vs swapped in from host. The
    thresholds put the paper's V100 profile (Table 4) into the prototype's classes: ResNets
    (1.44-1.57x) medium, BERT-large (3.3x) heavy, DenseNets, Inception, EfficientNet (<= 1.21x)
    light."""
    ratio = host_swap_s / resident_s if resident_s > 0 else 1.0
    return HEAVY if ratio >= heavy_at else MEDIUM if ratio >= medium_at else LIGHT


# ------------------------------------------------------------------------------------------------
# Placement (Algorithm 1)
# ------------------------------------------------------------------------------------------------


@dataclass
class GpuView:
    """What placement needs to know about one GPU."""

    name: str
    idle: bool
    models: set = field(default_factory=set)  # keys with a fully landed copy (usable as a source)
    activity: int = ACT_IDLE  # see ACT_*; ACT_IDLE when idle
    siblings: Sequence[str] = ()  # GPUs behind the same PCIe switch


@dataclass(frozen=True)
class Placement:
    gpu: str
    action: str  # "run" (resident), "peer" (NVLink copy), "host" (PCIe copy)
    source: str | None = None  # the peer GPU for "peer"
    branch: str = ""  # which rule chose it, for tests and counters


def _idle_or_resident(key: Any, gpus: Sequence[GpuView]) -> tuple[list[GpuView], Placement | None]:
    """The idle GPUs, and the first rule both placements share: run on an idle GPU that holds
    the model."""
    idle = [g for g in gpus if g.idle]
    for g in idle:
        if key in g.models:
            return idle, Placement(g.name, "run", None, "resident-idle")
    return idle, None


def algorithm1(key: Any, gpus: Sequence[GpuView], nvlink_bw: Callable[[str, str], float | None]) -> Placement | None:
    """The paper's Algorithm 1. `nvlink_bw(src, dst)`: bandwidth of the direct NVLink path, or
    None. Returns None when no GPU is idle (the request waits)."""
    idle, placed = _idle_or_resident(key, gpus)
    if placed is not None or not idle:
        return placed
    holders = [g for g in gpus if not g.idle and key in g.models]
    best: tuple[float, str, str] | None = None
    for dst in idle:
        for src in holders:
            bw = nvlink_bw(src.name, dst.name)
            if bw is not None and (best is None or bw > best[0]):
                best = (bw, dst.name, src.name)
    if best is not None:
        return Placement(best[1], "peer", best[2], "nvlink")
    by_name = {g.name: g for g in gpus}

    def sibling_rank(g: GpuView) -> int:
        return max((by_name[s].activity for s in g.siblings if s in by_name), default=ACT_IDLE)

    target = min(idle, key=sibling_rank)  # min() keeps the first (lowest-index) GPU on ties
    rank = sibling_rank(target)
    branch = "host-quiet-sibling" if rank <= ACT_NVLINK else "host-light-sibling" if rank == ACT_PCIE_LIGHT \
        else "host-any"
    return Placement(target.name, "host", None, branch)


def random_placement(key: Any, gpus: Sequence[GpuView], pick: Callable[[int], int]) -> Placement | None:
    """The 'random' ablation (the prototype's RAND policy): an idle GPU holding the model runs
    it; otherwise a random idle GPU copies it from host (never from a peer). `pick(n)` returns an
    index in [0, n)."""
    idle, placed = _idle_or_resident(key, gpus)
    if placed is not None or not idle:
        return placed
    return Placement(idle[pick(len(idle))].name, "host", None, "random")


# ------------------------------------------------------------------------------------------------
# Eviction
# ------------------------------------------------------------------------------------------------


@dataclass
class ResidentView:
    key: Any
    nbytes: int
    last_used: float
    cls: int = LIGHT
    holders: int = 1  # GPUs holding it, this one included
    locked: bool = False  # a peer copy is reading it

    @property
    def protected(self) -> bool:
        return self.cls >= MEDIUM and self.holders <= 1


def _take(order: Iterable[ResidentView], need: int, victims: list, freed: int) -> int:
    for r in order:
        if freed >= need:
            break
        if r.locked:
            continue
        victims.append(r.key)
        freed += r.nbytes
    return freed


def evict_two_list(residents: Iterable[ResidentView], need: int) -> list | None:
    """Victims freeing `need` bytes: the cheap list (light, or with another replica) least
    recently used first, then the protected list the same way. None: not enough even so."""
    if need <= 0:
        return []
    lru = sorted(residents, key=lambda r: r.last_used)
    victims: list = []
    freed = _take((r for r in lru if not r.protected), need, victims, 0)
    freed = _take((r for r in lru if r.protected), need, victims, freed)
    return victims if freed >= need else None


def evict_lru(residents: Iterable[ResidentView], need: int) -> list | None:
    """The 'lru' ablation: one list, least recently used first, locked entries skipped."""
    if need <= 0:
        return []
    victims: list = []
    freed = _take(sorted(residents, key=lambda r: r.last_used), need, victims, 0)
    return victims if freed >= need else None


# ------------------------------------------------------------------------------------------------
# Queues
# ------------------------------------------------------------------------------------------------


@dataclass
class FnStats:
    n: int = 0  # requests completed
    m: int = 0  # of them within the deadline
    lat_sum: float = 0.0

    def rrc(self, p: float) -> float:
        """Required request count: further on-time requests needed to reach percentile p."""
        return (p * self.n - self.m) / (1.0 - p)

    def expected(self, p: float) -> float:
        """E = mean latency x RRC: the queue's deficit measure (0 before the first completion)."""
        return 0.0 if self.n == 0 else self.lat_sum / self.n * self.rrc(p)


class _ReadyHeap:
    """Functions ready to dispatch (queued, none in flight) ordered by a key fixed while they
    stay ready; stale entries are skipped lazily."""

    def __init__(self) -> None:
        self.heap: list = []
        self.token: dict[Any, int] = {}
        self._n = 0

    def push(self, fn: Any, key: tuple) -> None:
        self._n += 1
        self.token[fn] = self._n
        heapq.heappush(self.heap, (key, self._n, fn))

    def discard(self, fn: Any) -> None:
        self.token.pop(fn, None)

    def pop(self) -> Any | None:
        while self.heap:
            _, tok, fn = heapq.heappop(self.heap)
            if self.token.get(fn) == tok:
                del self.token[fn]
                return fn
        return None

    def __len__(self) -> int:
        return len(self.token)


class FIFOQueue:
    """The 'fifo' ablation: the function whose oldest waiting request arrived first."""

    name = "fifo"

    def __init__(self) -> None:
        self._ready = _ReadyHeap()

    def ready(self, fn: Any, head_arrival: float) -> None:
        self._ready.push(fn, (head_arrival,))

    def pop(self) -> Any | None:
        return self._ready.pop()

    def record(self, fn: Any, latency_s: float, deadline_s: float) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def __len__(self) -> int:
        return len(self._ready)


class RRCQueue:
    """The paper's SLO-aware queue (§3.5, with the prototype's constants).

    Per function: n, m and the mean latency; RRC = (p n - m) / (1 - p), E = mean x RRC. Every
    `interval_s` the groups are recomputed: functions sorted by E ascending; those with E <= 0
    are high; positive ones join the high group while the running sum of positive E stays within
    alpha x (total positive E); the rest are low. Every `window` updates alpha adapts to the
    change in the fraction of compliant functions (relative change, threshold 4%): up -> doubled
    (capped at 1), down -> halved, else x1.01. Dispatch: the high group by E descending (most
    deficit first), then the low group by E ascending (least deficit first); ties by the oldest
    waiting request. Functions with a request in flight are not ready (the caller says when a
    function becomes ready)."""

    name = "rrc"

    def __init__(self, p: float = 0.98, *, interval_s: float = 2.0, window: int = 20, threshold: float = 0.04,
                 scale: float = 2.0, creep: float = 1.01, alpha: float = 1.0):
        self.p = p
        self.interval_s = interval_s
        self.window = window
        self.threshold = threshold
        self.scale = scale
        self.creep = creep
        self.alpha = alpha
        self.stats: dict[Any, FnStats] = {}
        self.low: set = set()  # everything else (new functions included) is high
        self.updates = 0
        self.next_update = interval_s
        self.old_ratio = 0.0
        self.alpha_history: list[tuple[float, float, float]] = []  # (time, compliant ratio, alpha)
        self._high = _ReadyHeap()
        self._low = _ReadyHeap()
        self._head: dict[Any, float] = {}

    # bookkeeping ---------------------------------------------------------------------------------
    def record(self, fn: Any, latency_s: float, deadline_s: float) -> None:
        s = self.stats.get(fn)
        if s is None:
            s = self.stats[fn] = FnStats()
        s.n += 1
        s.m += latency_s <= deadline_s
        s.lat_sum += latency_s

    def expected(self, fn: Any) -> float:
        s = self.stats.get(fn)
        return 0.0 if s is None else s.expected(self.p)

    def compliant_ratio(self) -> float:
        seen = [s for s in self.stats.values() if s.n > 0]
        if not seen:
            return 0.0
        return sum(s.m >= self.p * s.n for s in seen) / len(seen)

    # dispatch ------------------------------------------------------------------------------------
    def ready(self, fn: Any, head_arrival: float) -> None:
        self._head[fn] = head_arrival
        e = self.expected(fn)
        if fn in self.low:
            self._high.discard(fn)
            self._low.push(fn, (e, head_arrival))
        else:
            self._low.discard(fn)
            self._high.push(fn, (-e, head_arrival))

    def pop(self) -> Any | None:
        fn = self._high.pop()
        if fn is None:
            fn = self._low.pop()
        if fn is not None:
            self._head.pop(fn, None)
        return fn

    def __len__(self) -> int:
        return len(self._high) + len(self._low)

    # the 2 s update --------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Run every update due by `now`."""
        while self.next_update <= now:
            self.update(self.next_update)
            self.next_update += self.interval_s

    def update(self, now: float = 0.0) -> None:
        self.updates += 1
        scored = sorted(((s.expected(self.p), fn) for fn, s in self.stats.items() if s.n > 0),
                        key=lambda t: t[0])
        budget = self.alpha * sum(e for e, _ in scored if e > 0)
        low, acc, cut = set(), 0.0, False
        for e, fn in scored:
            if not cut and e > 0:
                acc += e
                cut = acc > budget
            if cut:
                low.add(fn)
        self.low = low
        # regroup the waiting functions under the new boundary
        waiting = list(self._head.items())
        self._high = _ReadyHeap()
        self._low = _ReadyHeap()
        for fn, head in waiting:
            self.ready(fn, head)
        if self.updates % self.window == 0:
            self.adapt(now)

    def adapt(self, now: float = 0.0) -> None:
        ratio = self.compliant_ratio()
        diff = (ratio - self.old_ratio) / self.old_ratio if self.old_ratio > 0 else self.threshold
        if diff >= self.threshold:
            self.alpha = min(1.0, self.alpha * self.scale)
            self.old_ratio = ratio
        elif diff < -self.threshold:
            self.alpha = self.alpha / self.scale
            self.old_ratio = ratio
        else:
            self.alpha = min(1.0, self.alpha * self.creep)
        self.alpha_history.append((now, ratio, self.alpha))


AMBIGUITIES = [
    ("Model classes", ("The paper says only 'heavy if a PCIe swap makes it noticeably slower'. We use three "
     "classes (the prototype's) from resident vs host-swap latency: >= 2.0x heavy, >= 1.3x medium, else "
     "light. On V100 the profile is the paper's Table 4 (giving the prototype's own classes: ResNets medium, "
     "BERT heavy, the rest light); on other nodes it is the simulator's own swap latency.")),
    ("'Heavy' in eviction", ("The protected list holds medium and heavy single copies (the prototype protects "
     "every non-light model), not heavy ones only.")),
    ("Peer copy with no NVLink", ("Algorithm 1 picks the fastest NVLink pair; when no idle GPU has an NVLink "
     "path to any holder (not the case on either bundled node) we fall through to the host copy.")),
    ("Peer sources", ("A copy still landing on a busy GPU is not a source (the prototype registers a replica "
     "only when its request finishes); the destination counts as a holder from the moment its copy starts.")),
    ("Sibling activity", ("The paper asks for a sibling 'not loading anything'; the prototype ranks the "
     "sibling's whole current request. We rank what the sibling is doing now: its copy while in flight "
     "(NVLink, or host copy of a light/medium/heavy model), a local run once the copy has landed, idle.")),
    ("LRU order within the lists", ("Both lists are ordered by last use; the prototype moves an entry that "
     "changes lists to the front of its new list, which we do not.")),
    ("RRC ordering", ("Inside a group the prototype sorts by mean latency x (p n - m) when a request is "
     "queued and re-sorts every 2 s; we order a function by E when it becomes ready to dispatch and regroup "
     "every 2 s (the same order, E differing only by the constant 1/(1-p)).")),
    ("Alpha", ("Starts at 1 (every function high) and the 4% threshold is a relative change of the compliant "
     "ratio, both as in the prototype; the reference ratio moves only when alpha doubles or halves.")),
    ("One in flight", ("At most one request per function is dispatched at a time, for every queue (the "
     "prototype's FIFO baseline did not enforce it; we do, so the ablation changes only the order).")),
    ("Random ablation", ("Keeps 'run where an idle GPU holds it' (as the prototype's RAND policy does) and "
     "otherwise copies from host to a uniformly random idle GPU.")),
]
