"""Copies in flight on shared links, the link physics both simulators use (`Transfer`,
`LinkSharing`), its two settings (`LINK_PHYSICS`), and the command lines' default for it,
`TORPOR_SIM_LINKS` (`link_physics_from_env`). See `torpor.sim.simulation`."""

from __future__ import annotations

import math
import os
from typing import Any

from torpor.scheduling.costmodel import LinkMap


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


# A copy keeps the share of its links it started with ("fixed"), or every copy on a link is
# re-rated as copies start and land ("shared", processor sharing); `Simulation` and `PaperSim`
# take one as `link_physics`.
LINK_PHYSICS = ("fixed", "shared")


def link_physics_from_env() -> str:
    """`TORPOR_SIM_LINKS` (`shared` or `fixed`; unset or empty: `fixed`), the default of the
    command lines' `--links`; the simulators themselves never read the environment."""
    v = os.environ.get("TORPOR_SIM_LINKS", "fixed").strip().lower() or "fixed"
    if v not in LINK_PHYSICS:
        raise ValueError(f"TORPOR_SIM_LINKS: expected 'shared' or 'fixed', got {v!r}")
    return v
