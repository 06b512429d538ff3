"""Which idle resident leaves a device first. Pure logic over a snapshot (the simulator runs it).

A policy orders candidates (idle residents only: never one that is pinned by a request,
still being copied in, or being read by a peer copy); `DeviceMemory.make_room` evicts in that
order until the new model fits.

- `LRUPolicy`: least recently used first (the baseline).
- `CostAwarePolicy` (default): cheapest expected reload per byte freed first. The score of a
  resident is `reload_s x rate / nbytes`: the seconds of swap-in per second it would cost if
  evicted, where `reload_s` is its bytes over the link it would come back on (host PCIe, or the
  much faster peer link when another device also holds it) and `rate` its recent request rate
  (an exponentially decayed count, time constant `tau`), divided by the bytes it gives back.
  Eviction frees a number of bytes, so the cost that matters is per byte: scored per model
  instead, ten small warm models went before one large cold one and all ten came back soon
  (more swaps and more bytes moved than LRU on the paper's model mix). Rarely used models and
  models with a replica elsewhere go first. Ties fall back to LRU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Candidate:
    key: Any
    nbytes: int
    last_used: float  # time.monotonic()
    rate: float  # requests per second, recent
    reload_s: float  # estimated seconds to bring it back from host
    replicas: int = 0  # other devices holding it


class EvictionPolicy(Protocol):
    name: str

    def order(self, candidates: list[Candidate], now: float) -> list[Candidate]:
        """Candidates, first to evict first."""
        ...


class LRUPolicy:
    name = "lru"

    def order(self, candidates: list[Candidate], now: float) -> list[Candidate]:
        return sorted(candidates, key=lambda c: c.last_used)


class CostAwarePolicy:
    name = "cost"

    def __init__(self, peer_speedup: float = 8.0):
        self.peer_speedup = peer_speedup  # reload from a peer is this much faster than from host

    def score(self, c: Candidate) -> float:
        reload_s = c.reload_s / self.peer_speedup if c.replicas else c.reload_s
        return reload_s * c.rate / max(c.nbytes, 1)

    def order(self, candidates: list[Candidate], now: float) -> list[Candidate]:
        return sorted(candidates, key=lambda c: (self.score(c), c.last_used))


class RateMeter:
    """Exponentially decayed request count; `rate()` is in requests per second."""

    __slots__ = ("_count", "_t", "tau")

    def __init__(self, tau: float = 60.0):
        self.tau = tau
        self._count = 0.0
        self._t = 0.0

    def hit(self, now: float) -> None:
        self._count = self._count * math.exp(-(now - self._t) / self.tau) + 1.0 if self._t else 1.0
        self._t = now

    def rate(self, now: float) -> float:
        if not self._t:
            return 0.0
        return self._count * math.exp(-(now - self._t) / self.tau) / self.tau


def make_policy(name: str) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name in ("cost", "cost-aware", "default"):
        return CostAwarePolicy()
    raise ValueError(f"unknown eviction policy {name!r}: expected 'cost' or 'lru'")
