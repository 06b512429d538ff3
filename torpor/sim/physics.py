"""Copies in flight on shared links, the link physics both simulators use (`Transfer`,
`LinkSharing`), its two settings (`LINK_PHYSICS`), and the command lines' default for it,
`TORPOR_SIM_LINKS` (`link_physics_from_env`); the true links under a bandwidth misestimate
(`true_links`) and compute slowed by copies landing beside it (`Compute`). See
`torpor.sim.simulation` and `torpor.sim.errors`."""

from __future__ import annotations

import math
import os
from typing import Any

from torpor.scheduling.costmodel import LinkMap


class Transfer:
    """One copy in flight (see `LinkSharing`). `end` is when it lands at the current rates."""

    __slots__ = ("began", "bend", "end", "left", "nbytes", "owner", "path", "pending", "plan", "rate", "scale",
                 "t", "version")

    def __init__(self, path: tuple[str, ...], nbytes: float, now: float, owner: Any, scale: float = 1.0):
        self.path = path
        self.nbytes = nbytes
        # link-bytes still to move, as of `t`: its bytes times `scale`, the link time it truly
        # needs per byte the scheduler counts (`torpor.sim.errors`: per-copy jitter)
        self.left = float(nbytes) * scale
        self.scale = scale
        self.rate = 0.0
        self.t = now
        self.end = now  # when it truly lands at the rates it has
        self.bend = now  # when the scheduler believes it lands (its bytes left at the believed bandwidths)
        self.began = now  # when it started moving
        self.version = 0
        self.owner = owner
        self.pending = False  # waiting for its path to clear (not moving yet)
        self.plan: float | None = None  # seconds its owner's scheduler predicted it takes once moving

    def left_at(self, now: float) -> float:
        """Bytes still to move at `now`, at the rate it has (all of them while it waits)."""
        return self.left if self.pending else max(0.0, self.left - self.rate * (now - self.t))

    def believed_left(self, now: float) -> float:
        """The bytes the scheduler sees it still has to move at `now` (its progress times its bytes)."""
        return self.left_at(now) / self.scale


class LinkSharing:
    """Copies in flight sharing links, the physics both simulators use.

    Processor sharing (`shared`, the default): every copy moves at the narrowest share on its
    path, `min(bw[l] / n[l])` over its links, where `n[l]` counts the copies on link `l`;
    whenever a copy starts or lands the copies sharing a link with it are re-rated, so a copy
    that started beside another speeds up when the other lands (DMA engines and PCIe switches
    share bandwidth among the copies active at each moment). Fixed shares (`shared=False`): a
    copy keeps the share it started with (a rate fixed at the start over-commits a link when a
    later copy joins it and leaves bandwidth idle when an earlier one leaves). A copy lands
    `latency_s` after its last byte moves. `counts` is the live per-link count
    (`Snapshot.inflight`).

    `links` are the TRUE bandwidths; `belief` (default: the same) those the scheduler plans
    with (its cost model's `LinkMap`, which online learning may change). Everything the
    scheduler reads is in its terms: the bytes each copy has left (`get`, its progress times
    its bytes, whatever its jitter `Transfer.scale`), when a link clears (`clear_at`), when a
    copy should land (`Transfer.bend`, `eta`), and the checks a waiting copy makes before it
    starts (`busy_until`, `would_harm`). `Transfer.end`, the true landing, drives the events.
    With `belief` equal to `links` and no jitter the two are the same numbers."""

    def __init__(self, links: LinkMap, latency_s: float, counts: dict[str, int] | None = None,
                 shared: bool = True, belief: LinkMap | None = None):
        self.shared = shared
        self.links = links
        self.belief = links if belief is None else belief
        self.latency_s = latency_s
        self.counts: dict[str, int] = {} if counts is None else counts
        self.on: dict[str, list[Transfer]] = {}
        self.waiting: dict[str, list[Transfer]] = {}  # processor sharing: copies not started yet
        self.now = 0.0
        self.slack: dict[int, float] = {}

    def _rerate(self, trs: list[Transfer], now: float) -> None:
        bw, bbw, on, lat = self.links.bandwidth, self.belief.bandwidth, self.on, self.latency_s
        for tr in trs:
            tr.rate = min(bw(lk) / len(on[lk]) for lk in tr.path)
            tr.end = now + (lat + tr.left / tr.rate)  # the same sum as CostModel.transfer_seconds
            tr.bend = now + (lat + (tr.left / tr.scale) / min(bbw(lk) / len(on[lk]) for lk in tr.path))
            tr.version += 1

    def _full_rate(self, path: tuple[str, ...]) -> float:
        return min(self.links.bandwidth(lk) for lk in path)

    def _wait_until(self, tr: Transfer, begin: float) -> None:
        # not moving until `begin`; until then it counts as landing at full rate from then
        tr.pending = True
        tr.t = begin
        tr.end = begin + (self.latency_s + tr.left / self._full_rate(tr.path))
        tr.bend = begin + (self.latency_s + (tr.left / tr.scale) / min(self.belief.bandwidth(lk) for lk in tr.path))
        tr.version += 1

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
              begin: float | None = None, scale: float = 1.0) -> tuple[Transfer, list[Transfer]]:
        """A new copy; returns it and every copy whose landing time changed (itself included).
        `scale`: the link time it truly needs per byte (per-copy jitter; 1: as the bytes say).
        `begin`: the copy waits for its path to clear (`CostModel.copy_plan`) and moves nothing
        until the caller calls `activate` at `begin`; until then it counts as landing at the
        path's full bandwidth from `begin`. Fixed shares: it holds its place on the links
        meanwhile (copies started meanwhile count it when they take their share), and at
        `activate` takes the share any copy starting then takes, so it shares the link with
        copies started meanwhile (it never runs at full rate beside them). Processor sharing:
        it takes no share and slows nobody until `activate` (or `postpone`, where it
        `would_harm` copies started meanwhile); `get` and `clear_at` count it meanwhile."""
        affected = self._touching(path, now) if self.shared else []
        tr = Transfer(path, nbytes, now, owner, scale)
        for lk in path:
            self.on.setdefault(lk, []).append(tr)
            self.counts[lk] = self.counts.get(lk, 0) + 1
        if begin is not None and begin > now:
            if self.shared:
                for lk in path:
                    self.on[lk].remove(tr)
                    self.waiting.setdefault(lk, []).append(tr)
            self._wait_until(tr, begin)
            return tr, [tr]
        affected.append(tr)
        self._rerate(affected, now)
        return tr, affected

    def busy_until(self, path: tuple[str, ...], now: float) -> float:
        """When the copies moving on `path` now should all have landed (processor sharing, none
        joining), as the scheduler sees them: the latest over its links of the bytes they have
        left at the link's believed bandwidth; `now` where nothing moves there. Copies waiting
        to start are not counted."""
        t = now
        for lk in path:
            trs = self.on.get(lk)
            if trs:
                left = sum(o.believed_left(now) for o in trs)
                t = max(t, now + self.latency_s + left / self.belief.bandwidth(lk))
        return t

    def would_harm(self, tr: Transfer, now: float) -> bool:
        """Whether starting `tr` now would delay a copy moving on its path past its slack
        (`self.slack`, as the caller last set it), as the scheduler sees them: sharing link l it
        lands min(its bytes left, tr's bytes) / bw[l] later (`CostModel.delays`)."""
        slack = self.slack
        mine = tr.believed_left(now)
        for lk in tr.path:
            bw = self.belief.bandwidth(lk)
            for o in self.on.get(lk, ()):
                s = slack.get(id(o.owner[1]), math.inf) if o.owner is not None else math.inf
                if s < math.inf and min(o.believed_left(now), mine) / bw > s:
                    return True
        return False

    def postpone(self, tr: Transfer, begin: float) -> list[Transfer]:
        """A copy waiting to start (`start(begin=...)`) waits until `begin` instead; returns it
        (its landing moved)."""
        self._wait_until(tr, begin)
        return [tr]

    def activate(self, tr: Transfer, now: float) -> list[Transfer]:
        """A copy that waited (`start(begin=...)`) starts moving now; returns every copy whose
        landing time changed (itself included)."""
        if not tr.pending:
            return []
        tr.pending = False
        tr.t = tr.began = now
        if not self.shared:  # the share a copy starting now gets; nobody else changes
            self._rerate([tr], now)
            return [tr]
        for lk in tr.path:
            self.waiting[lk].remove(tr)
        affected = self._touching(tr.path, now)
        for lk in tr.path:
            self.on.setdefault(lk, []).append(tr)
        affected.append(tr)
        self._rerate(affected, now)
        return affected

    def eta(self, tr: Transfer, now: float) -> float:
        """When `tr` lands if no further copy joins its links (`CostModel.transfer_seconds`'s
        estimate for the bytes it has left), as the scheduler sees it: every copy beside it
        with fewer bytes left lands first and frees its share. Its `bend` is the landing at
        the rate it has now."""
        if tr.pending:
            return tr.bend
        left = tr.believed_left(now)
        worst = 0.0
        bw = self.belief.bandwidth
        for lk in tr.path:
            ahead = 0.0
            for o in self.on.get(lk, ()):
                if o is not tr:
                    ahead += min(o.believed_left(now), left)
            worst = max(worst, (left + ahead) / bw(lk))
        return min(tr.bend, now + self.latency_s + worst)

    def clear_at(self, link: str) -> float:
        """When every copy now on `link` should have landed, as the scheduler sees them
        (`Snapshot.link_clear`). Fixed shares: the latest believed landing. Processor sharing:
        the bytes they have left at the link's believed bandwidth from `self.now` (set by the
        caller), or the believed landing of a copy waiting to start there, whichever is later."""
        if not self.shared:
            return max((tr.bend for tr in self.on.get(link, ())), default=-math.inf)
        trs, waiting = self.on.get(link), self.waiting.get(link)
        if not trs and not waiting:
            return -math.inf
        now = self.now
        t = -math.inf
        if trs:
            left = sum(tr.believed_left(now) for tr in trs)
            t = now + self.latency_s + left / self.belief.bandwidth(link)
        for tr in waiting or ():
            t = max(t, tr.bend)
        return t

    def finish(self, tr: Transfer, now: float) -> list[Transfer]:
        """`tr` has landed; returns the copies re-rated because it left."""
        for lk in tr.path:
            (self.waiting if tr.pending and self.shared else self.on)[lk].remove(tr)
            self.counts[lk] -= 1
        tr.left = 0.0
        if not self.shared:
            return []
        affected = self._touching(tr.path, now)
        self._rerate(affected, now)
        return affected

    def get(self, link: str, default: Any = ()) -> list[tuple[float, float]]:
        """(bytes still to move, slack) for each copy on `link` at `self.now` (set by the caller),
        as the scheduler sees them: slack is how much later the copy may land before a request
        waiting on it misses its deadline, `self.slack[id(owner[1])]` where the caller set it,
        else unbounded."""
        trs = self.on.get(link)
        waiting = self.waiting.get(link)
        if waiting:
            trs = [*(trs or ()), *waiting]  # a copy waiting to start will share the link with it
        if not trs:
            return list(default)
        now, slack = self.now, self.slack
        return [(tr.believed_left(now),
                 slack.get(id(tr.owner[1]), math.inf) if tr.owner is not None else math.inf) for tr in trs]


def true_links(links: LinkMap, factor: float) -> LinkMap:
    """A copy of `links` with every bandwidth times `factor` (`Errors.bandwidth_factor`: the
    truth when the scheduler believes `links`)."""
    return LinkMap(list(links.devices), {d: bw * factor for d, bw in links.pcie.items()}, dict(links.switch),
                   {s: bw * factor for s, bw in links.switch_bw.items()},
                   {k: bw * factor for k, bw in links.nvlink.items()}, set(links.p2p))


class Compute:
    """A device's compute when copies moving into it slow it (`Errors.copy_slowdown`): while at
    least one copy lands on the device, a run progresses `slowdown` times slower. `copies`
    counts them (the caller reports each start and landing); `start` begins a run of `work`
    seconds (at full speed) at `begin` and gives when it ends; `moved` re-plans that end
    whenever the count changes (True: it moved)."""

    __slots__ = ("begin", "end", "left", "mult", "n", "running", "slowdown", "t")

    def __init__(self, slowdown: float):
        self.slowdown = slowdown
        self.n = 0
        self.running = False
        self.begin = self.end = self.left = self.t = 0.0
        self.mult = 1.0

    def start(self, now: float, begin: float, work: float) -> float:
        self.running = True
        self.begin, self.left, self.t = begin, work, now
        self.mult = self.slowdown if self.n else 1.0
        self.end = begin + work * self.mult
        return self.end

    def stop(self) -> float:
        """The run ended; its measured compute seconds."""
        self.running = False
        return self.end - self.begin

    def copies(self, now: float, delta: int) -> bool:
        self.n += delta
        if not self.running:
            return False
        mult = self.slowdown if self.n else 1.0
        if mult == self.mult:
            return False
        if self.end <= now:  # its compute is done (it waits for its copy)
            self.mult = mult
            return False
        start = max(self.t, self.begin)
        if now > start:
            self.left -= (now - start) / self.mult
        self.t, self.mult = now, mult
        self.end = max(now, self.begin) + self.left * mult
        return True


# Every copy on a link is re-rated as copies start and land ("shared", processor sharing, the
# default), or a copy keeps the share of its links it started with ("fixed"); `Simulation` and
# `PaperSim` take one as `link_physics`.
LINK_PHYSICS = ("fixed", "shared")
DEFAULT_LINK_PHYSICS = "shared"


def link_physics_from_env() -> str:
    """`TORPOR_SIM_LINKS` (`shared` or `fixed`; unset or empty: `shared`), the default of the
    command lines' `--links`; the simulators themselves never read the environment."""
    v = os.environ.get("TORPOR_SIM_LINKS", "").strip().lower() or DEFAULT_LINK_PHYSICS
    if v not in LINK_PHYSICS:
        raise ValueError(f"TORPOR_SIM_LINKS: expected 'shared' or 'fixed', got {v!r}")
    return v
