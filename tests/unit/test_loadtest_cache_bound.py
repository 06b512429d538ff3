"""loadtest/cache_bound.py: the same arrivals as the simulator's, and its rules as caches."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from torpor.sim.workload import prototype_arrivals, prototype_arrivals_by_minute

_spec = importlib.util.spec_from_file_location(
    "cache_bound", Path(__file__).resolve().parents[2] / "loadtest" / "cache_bound.py")
cb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cb)


def _counts(rng: np.random.Generator, functions: int = 30, minutes: int = 3) -> np.ndarray:
    return rng.integers(0, 12, size=(functions, minutes))


def test_arrivals_are_the_simulators():
    counts = _counts(np.random.default_rng(5))
    t, fn, minute = prototype_arrivals_by_minute(counts, np.random.default_rng(9))
    t2, fn2 = prototype_arrivals(counts, np.random.default_rng(9))
    assert np.array_equal(t, t2) and np.array_equal(fn, fn2)
    # each arrival's minute is the one whose count it was drawn from
    for m in range(counts.shape[1]):
        got = np.bincount(fn[minute == m], minlength=counts.shape[0])
        assert got.sum() == counts[:, m].sum()
        assert not np.any(got[counts[:, m] == 0])


def test_rules_as_caches():
    rng = np.random.default_rng(3)
    counts = _counts(rng)
    t, fn, minute = prototype_arrivals_by_minute(counts, rng)
    # models of one size: Belady's rule is the optimum there, so foresight copies least
    ones = np.ones(counts.shape[0], dtype=np.int64)
    copies = {r: int(cb.replay(r, t, fn, minute, ones, counts, capacity=10).sum()) for r in cb.RULES}
    first = len(np.unique(fn))
    assert all(c >= first for c in copies.values())
    assert copies["belady"] == min(copies.values()) and copies["belady"] < copies["lru"]
    # room for everything: only each function's first request copies
    size = rng.integers(1, 5, size=counts.shape[0])
    big = {r: int(cb.replay(r, t, fn, minute, size, counts, capacity=int(size.sum())).sum()) for r in cb.RULES}
    assert set(big.values()) == {first}
