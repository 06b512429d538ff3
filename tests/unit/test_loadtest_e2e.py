"""loadtest/e2e.py's pure parts: its arrival generators (trace replay and Zipf), the outcome
accounting (shed, lost, goodput) and the load list. (One tiny end-to-end run of it against real
servers: tests/compat/test_e2e_smoke.py.)"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.e2e_report import DROPPED, FAILED, LOST, OK, SHED, RunLog, summarize
from loadtest.e2e_workloads import trace_arrivals, zipf_arrivals

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "loadtest" / "e2e.py"


def load_e2e():
    """loadtest/e2e.py as a module (it is a script, not in a package)."""
    spec = importlib.util.spec_from_file_location("torpor_e2e", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_trace_arrivals_follow_the_counts():
    trace = np.random.default_rng(1).integers(0, 20, size=(50, 31))
    speedup = 60.0  # one trace minute per second
    times, funcs, rows = trace_arrivals(trace, 6, speedup, 5.0, seed=3)
    counts = trace[rows]
    assert np.all(np.diff(times) >= 0) or times.size == 0
    assert times.min() >= 0 and times.max() < 5.0
    for minute in range(5):  # every minute's total lands inside its (compressed) minute
        sel = (times >= minute) & (times < minute + 1)
        assert sel.sum() == counts[:, minute].sum()
        for f in np.unique(funcs[sel]):
            assert counts[f, minute] > 0  # only functions with requests in that minute get any


def test_zipf_arrivals_mean_rate_and_skew():
    times, funcs = zipf_arrivals(20, rate=50.0, duration=200.0, seed=0, s=1.0, burst_factor=4.0)
    assert 0.8 * 50 * 200 < times.size < 1.2 * 50 * 200
    top = np.bincount(funcs, minlength=20).max()
    assert top > 3 * times.size / 20  # the most popular model gets far more than its even share


def test_outcomes_shed_lost_goodput():
    """A 503 / UNAVAILABLE with Triton's shedding text is shed, not failed; an arrival cancelled at
    the drain deadline is lost; goodput is answers within SLO per second of the run."""
    e2e = load_e2e()
    from tritonclient.utils import InferenceServerException as Err

    assert e2e.is_shed(Err("Exceeds maximum queue size: model 'a' ...", status="503"))
    assert e2e.is_shed(Err("Request timeout expired", status="StatusCode.UNAVAILABLE"))
    assert not e2e.is_shed(Err("Request timeout expired", status="500"))
    assert not e2e.is_shed(Err("model busy", status="StatusCode.UNAVAILABLE"))
    assert not e2e.is_shed(RuntimeError("Exceeds maximum queue size"))

    status = np.array([OK, OK, OK, SHED, SHED, FAILED, DROPPED, LOST, OK, SHED], dtype=np.int8)
    latency = np.array([10, 50, 300, 1, 2, 5, np.nan, np.nan, 90, 3.0])
    n = status.size
    log = RunLog(np.arange(n) * 0.1, np.array([0, 1] * 5), np.zeros(n, int), latency, np.zeros(n), status)
    rows = summarize(log, ["mlp_small", "mlp_large"], ["a", "b"], {"mlp_small": 100, "mlp_large": 200},
                     ["http"], {}, {}, {}, {}, duration=2.0)
    a = rows["all"]
    assert (a["answered"], a["shed"], a["failed"], a["dropped"], a["lost"]) == (4, 3, 1, 1, 1)
    assert a["sent"] == 9 and a["within_slo"] == 3 and a["goodput_rps"] == 1.5
    assert a["shed_p99_ms"] <= 3.0 and a["slo_attainment"] == 0.3
    assert rows["mlp_small"]["goodput_rps"] + rows["mlp_large"]["goodput_rps"] == a["goodput_rps"]


def test_load_list():
    e2e = load_e2e()
    assert e2e.parse_loads("0.5") == [0.5]
    assert e2e.parse_loads("0.25,0.5") == [0.25, 0.5]
    for bad in ("", "0", "-1,0.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            e2e.parse_loads(bad)
