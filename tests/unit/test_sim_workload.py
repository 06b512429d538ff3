"""Simulator arrivals: the authors' prototype's process (`prototype_arrivals`) beside the
exponential one, and the workload field that picks between them."""

import numpy as np
import pytest

from torpor.sim.scenario import ScenarioError
from torpor.sim.workload import (
    DEFAULT_TRACE,
    counts_to_arrivals,
    make_arrivals,
    prototype_arrivals,
    scenario_arrivals,
)
from torpor.sim.scenario import parse_scenario


def _counts(functions=40, minutes=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 34, size=(functions, minutes))


def test_prototype_sends_exactly_each_minutes_count():
    counts = _counts()
    t, fn = prototype_arrivals(counts, np.random.default_rng(1))
    assert len(t) == counts.sum() == len(fn)
    assert np.all(np.diff(t) >= 0)
    # the k-th minute's arrivals are the next `total` ones: their gaps carry on from the previous
    # minute's last arrival, so the minute spans 60 s give or take a fraction of a second
    ends = np.cumsum(counts.sum(axis=0))
    starts = np.concatenate([[0], ends[:-1]])
    for m, (a, b) in enumerate(zip(starts, ends)):
        span_end = t[b - 1]
        assert abs(span_end - 60.0 * (m + 1)) < 0.1 * (m + 1) + 1.0
    # windows of whole minutes hold that minute's count, but for the few arrivals the drift moves over a boundary
    per_min = np.bincount((t // 60).astype(int), minlength=counts.shape[1])[:counts.shape[1]]
    assert np.all(np.abs(per_min - counts.sum(axis=0)) <= 0.02 * counts.sum(axis=0) + 5)


def test_prototype_gaps_are_whole_ms_poisson():
    # 7,500 requests a minute: mean gap 8 ms, a Poisson gap's CV 1/sqrt(8) = 0.354
    counts = np.full((300, 10), 25)
    t, _ = prototype_arrivals(counts, np.random.default_rng(2))
    gaps_ms = np.diff(np.concatenate([[0.0], t])) * 1000
    assert np.allclose(gaps_ms, np.round(gaps_ms), atol=1e-6)  # whole milliseconds
    assert abs(gaps_ms.mean() - 8.0) < 0.05
    cv = gaps_ms.std() / gaps_ms.mean()
    assert 0.33 < cv < 0.37
    # the exponential process on the same counts: CV near 1
    te, _ = counts_to_arrivals(counts, np.random.default_rng(2))
    ge = np.diff(te)
    assert 0.95 < ge.std() / ge.mean() < 1.05


def test_prototype_gives_functions_in_proportion():
    counts = np.zeros((3, 20), dtype=np.int64)
    counts[0], counts[1], counts[2] = 600, 300, 100
    counts[2, 10:] = 0  # function 2 silent for the second half
    t, fn = prototype_arrivals(counts, np.random.default_rng(3))
    first = np.arange(len(t)) < counts[:, :10].sum()
    share = np.bincount(fn[first], minlength=3) / first.sum()
    assert np.allclose(share, [0.6, 0.3, 0.1], atol=0.02)
    assert not np.any(fn[~first] == 2)
    share2 = np.bincount(fn[~first], minlength=3)[:2] / (~first).sum()
    assert np.allclose(share2, [2 / 3, 1 / 3], atol=0.02)


def test_prototype_scale_and_empty_minutes():
    counts = np.array([[10, 0, 10], [10, 0, 30]])
    t, fn = prototype_arrivals(counts, np.random.default_rng(4), scale=1.5)
    assert len(t) == 30 + 60  # round(total x scale) per minute
    # the silent minute moves the clock on: the third minute's arrivals come after 120 s, near enough
    assert t[30] > 119.0 and t[-1] > 170.0


def test_workload_field_selects_process():
    wl = {"kind": "synthetic", "duration_s": 300}
    tp, fp, d = make_arrivals({**wl, "arrivals": "prototype"}, 30, seed=5)
    te, fe, _ = make_arrivals(wl, 30, seed=5)  # poisson stays the default
    assert d == 300 and tp.max() < 300 and te.max() < 300
    cv = lambda t: np.diff(t).std() / np.diff(t).mean()
    assert cv(tp) < 0.6 < 0.9 < cv(te)
    again = make_arrivals({**wl, "arrivals": "prototype"}, 30, seed=5)
    assert np.array_equal(again[0], tp) and np.array_equal(again[1], fp)


def test_bad_arrivals_names_field():
    spec = {"name": "s", "gpus": 1, "gpu_memory_GB": 2, "node": {"pcie_GBps": 25},
            "models": [{"name": "a", "size_MB": 30, "exec_ms": 5, "slo_ms": 50}], "functions": 4,
            "workload": {"kind": "synthetic", "duration_s": 60, "arrivals": "bursty"}}
    with pytest.raises(ScenarioError, match=r"scenario\.workload\.arrivals: expected one of"):
        scenario_arrivals(parse_scenario(spec))


@pytest.mark.skipif(not DEFAULT_TRACE.exists(), reason="trace not present beside the project")
def test_full_trace_run():
    # the whole trace: 31 minutes, every minute's count sent, none wrapped around
    trace = np.load(DEFAULT_TRACE)
    t, fn, d = make_arrivals({"kind": "trace", "duration_s": 31 * 60, "arrivals": "prototype"}, 203, seed=1)
    assert d == 1860
    # 203 functions are the trace's 203 rows (drawn without replacement): its whole count, but for
    # the few arrivals the carried clock moves past the end
    assert 0.995 * trace.sum() < len(t) <= trace.sum()
    assert fn.max() < 203
