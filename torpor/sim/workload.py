"""Simulator workloads: the paper's trace or a synthetic generator turned into arrivals
(`make_arrivals`, `scenario_arrivals`), and the synthetic generator in place of the default
trace where that is absent (`without_missing_trace`). See `torpor.sim.simulation`.

Per-minute counts become arrivals one of two ways (the workload's `arrivals` field):

- `prototype` (`prototype_arrivals`): what the Torpor authors' prototype sends
  (`sender_from_trace.py`, ../shared/data/README.md): each minute exactly its total count, the
  gaps Poisson-distributed whole milliseconds of mean 60,000 / total, carried across minute
  boundaries, each arrival given to a function with probability proportional to its count in
  that minute. Nearly regular (gap CV 1/sqrt(mean gap in ms): about 0.35 at 8 ms).
- `poisson` (`counts_to_arrivals`, the default where a workload does not say): exponential
  gaps of mean 60 s / total within each minute, so a random count per minute; burstier
  (gap CV 1.0), and every policy's capacity is lower under it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from torpor.sim.scenario import Scenario, ScenarioError

# The paper's trace, in ../shared/data/ beside the project (torpor/sim/ is two levels below the
# project root); not shipped in the wheel, where this path does not exist.
DEFAULT_TRACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "torpor-trace-samples.npy"
TRACE_MINUTE_S = 60.0
ARRIVALS = ("poisson", "prototype")


class WorkloadError(ValueError):
    """A bad workload field; the message starts with the field's name."""


def load_trace(path: str | Path | None = None) -> np.ndarray:
    """The (functions x minutes) count matrix (see ../shared/data/README.md); no pickle."""
    p = Path(path) if path else DEFAULT_TRACE
    if p.is_dir():
        p = p / "torpor-trace-samples.npy"
    try:
        a = np.load(p, allow_pickle=False)
    except OSError as e:
        raise WorkloadError(f"trace: cannot read {p}: {e} (use a synthetic workload without it)") from None
    if a.ndim != 2 or a.min() < 0:
        raise WorkloadError(f"trace: {p} is not a (functions x minutes) count matrix")
    return a.astype(np.int64)


def trace_counts(trace: np.ndarray, functions: int, minutes: int, rng: np.random.Generator) -> np.ndarray:
    """N rows drawn from the trace (with replacement only when N exceeds its rows); minutes past
    its end wrap around. Returns (functions x minutes)."""
    rows = rng.choice(trace.shape[0], size=functions, replace=functions > trace.shape[0])
    cols = np.arange(minutes) % trace.shape[1]
    return trace[rows][:, cols]


def synthetic_counts(functions: int, minutes: int, rng: np.random.Generator, *, mean_per_min: float = 9.8,
                     mean_spread: tuple[float, float] = (4.9, 14.4), minute_cv: float = 0.30, zipf: float = 0.0,
                     burst_on_frac: float = 1.0, burst_mean_min: float = 5.0, diurnal_amplitude: float = 0.0
                     ) -> np.ndarray:
    """Per-minute counts with the trace's statistics by default: per-function means spread
    uniformly over [4.9, 14.4]/min (the trace's range; mean 9.8), and minute-to-minute
    variation of a Poisson count around a gamma-distributed rate with coefficient of variation
    `minute_cv` (0.30 with the Poisson noise gives the trace's ~0.44 per-function CV).
    Options: `zipf` > 0 gives function i a mean proportional to 1/(i+1)^zipf (same total);
    `burst_on_frac` < 1 makes each function alternate on/off periods (exponential, mean
    `burst_mean_min` minutes on) with the rate raised while on to keep the mean; `diurnal_amplitude`
    in [0, 1) scales the whole load by 1 + a*sin over one period across the run."""
    if zipf > 0:
        w = 1.0 / np.arange(1, functions + 1) ** zipf
        means = w / w.mean() * mean_per_min
        rng.shuffle(means)
    else:
        lo, hi = mean_spread
        means = rng.uniform(lo, hi, size=functions)
        means *= mean_per_min / means.mean()
    shape = 1.0 / minute_cv**2 if minute_cv > 0 else None
    rate = np.repeat(means[:, None], minutes, axis=1)
    if shape is not None:
        rate = rate * rng.gamma(shape, 1.0 / shape, size=rate.shape)
    if burst_on_frac < 1.0:
        on = np.zeros((functions, minutes), dtype=bool)
        off_mean = burst_mean_min * (1 - burst_on_frac) / burst_on_frac
        for f in range(functions):
            t, state = 0.0, rng.random() < burst_on_frac
            while t < minutes:
                length = rng.exponential(burst_mean_min if state else off_mean)
                a, b = int(t), int(min(minutes, math.ceil(t + length)))
                if state:
                    on[f, a:b] = True
                t += max(length, 1.0)
                state = not state
        rate = rate * on / burst_on_frac
    if diurnal_amplitude:
        rate = rate * (1.0 + diurnal_amplitude * np.sin(2 * np.pi * np.arange(minutes) / minutes))[None, :]
    return rng.poisson(rate)


def counts_to_arrivals(counts: np.ndarray, rng: np.random.Generator, scale: float = 1.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The paper's harness: for each minute, exponential gaps of mean 60 s / (that minute's total
    x scale) across the minute, each arrival given to a function with probability proportional
    to its count in that minute. Returns (times in seconds, function index), sorted by time."""
    ts, fs = [], []
    for m in range(counts.shape[1]):
        col = counts[:, m]
        total = float(col.sum()) * scale
        if total <= 0:
            continue
        gaps = rng.exponential(TRACE_MINUTE_S / total, size=int(total * 1.3 + 30))
        t = np.cumsum(gaps)
        while t[-1] < TRACE_MINUTE_S:
            t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(TRACE_MINUTE_S / total, size=int(total) + 30))])
        t = t[t < TRACE_MINUTE_S]
        ts.append(m * TRACE_MINUTE_S + t)
        fs.append(rng.choice(len(col), size=len(t), p=col / col.sum()))
    if not ts:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(ts), np.concatenate(fs).astype(np.int64)


def prototype_arrivals(counts: np.ndarray, rng: np.random.Generator, scale: float = 1.0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The authors' prototype's sender: for each minute, exactly round(total x scale) arrivals,
    each gap a Poisson-distributed whole number of milliseconds with mean 60,000 / that total,
    the clock carried on from the previous minute's last arrival (so a minute's arrivals span
    60 s give or take a fraction of a second, and minutes do not restart at whole minutes),
    each arrival given to a function with probability proportional to its count in that
    minute. A minute with no requests (the prototype would divide by zero) moves the clock on
    by 60 s. Returns (times in seconds, function index), sorted by time."""
    t, fn, _ = prototype_arrivals_by_minute(counts, rng, scale)
    return t, fn


def prototype_arrivals_by_minute(counts: np.ndarray, rng: np.random.Generator, scale: float = 1.0
                                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`prototype_arrivals` (the same draws) with the column of `counts` each arrival was drawn
    from: (times, function index, minute)."""
    ts, fs, ms = [], [], []
    clock_ms = 0
    for m in range(counts.shape[1]):
        col = counts[:, m]
        total = round(float(col.sum()) * scale)
        if total <= 0:
            clock_ms += int(TRACE_MINUTE_S * 1000)
            continue
        gaps = rng.poisson(TRACE_MINUTE_S * 1000 / total, size=total)
        t_ms = clock_ms + np.cumsum(gaps)
        clock_ms = int(t_ms[-1])
        ts.append(t_ms / 1000.0)
        fs.append(rng.choice(len(col), size=total, p=col / col.sum()))
        ms.append(np.full(total, m, dtype=np.int64))
    if not ts:
        return np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(ts), np.concatenate(fs).astype(np.int64), np.concatenate(ms)


def make_arrivals(workload: dict[str, Any], functions: int, *, seed: int = 0,
                  trace_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """From a scenario's workload section: {"kind": "trace" | "synthetic", "duration_s": 1800,
    "rate_scale": 1.0, "arrivals": "poisson" | "prototype" (default poisson; module docstring),
    "trace": path, plus synthetic_counts' options}. (times, fns, duration)."""
    known = {"kind", "duration_s", "rate_scale", "arrivals", "trace", "mean_per_min", "minute_cv", "zipf",
             "burst_on_frac", "burst_mean_min", "diurnal_amplitude"}
    unknown = set(workload) - known
    if unknown:
        raise WorkloadError(f"{min(unknown)}: unknown field (expected {sorted(known)})")
    kind = workload.get("kind", "trace")
    duration = workload.get("duration_s", 1800)
    if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0:
        raise WorkloadError(f"duration_s: must be a positive number of seconds, got {duration!r}")
    scale = workload.get("rate_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise WorkloadError(f"rate_scale: must be positive, got {scale!r}")
    arrivals = workload.get("arrivals", "poisson")
    if arrivals not in ARRIVALS:
        raise WorkloadError(f"arrivals: expected one of {list(ARRIVALS)}, got {arrivals!r}")
    minutes = math.ceil(duration / TRACE_MINUTE_S)
    rng = np.random.default_rng(seed)
    if kind == "trace":
        counts = trace_counts(load_trace(trace_path or workload.get("trace")), functions, minutes, rng)
    elif kind == "synthetic":
        opts = {k: workload[k] for k in ("mean_per_min", "minute_cv", "zipf", "burst_on_frac", "burst_mean_min",
                                         "diurnal_amplitude") if k in workload}
        for k, v in opts.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise WorkloadError(f"{k}: must be a non-negative number, got {v!r}")
        if "burst_on_frac" in opts and not 0 < opts["burst_on_frac"] <= 1:
            raise WorkloadError(f"burst_on_frac: must be in (0, 1], got {opts['burst_on_frac']!r}")
        counts = synthetic_counts(functions, minutes, rng, **opts)
    else:
        raise WorkloadError(f"kind: unknown workload kind {kind!r}; expected 'trace' or 'synthetic'")
    to_arrivals = prototype_arrivals if arrivals == "prototype" else counts_to_arrivals
    t, fn = to_arrivals(counts, rng, float(scale))
    keep = t < duration
    return t[keep], fn[keep], float(duration)


def without_missing_trace(workload: dict[str, Any], trace_path: str | Path | None = None
                          ) -> tuple[dict[str, Any], str | None]:
    """`workload` as it is, or, where it would read the default trace (kind `trace`, no trace
    named here or in it) and that is absent (an installed wheel has no ../shared/data), the
    synthetic generator with the trace's statistics instead, and a line saying so."""
    if workload.get("kind", "trace") != "trace" or trace_path or workload.get("trace") or DEFAULT_TRACE.exists():
        return workload, None
    # from a wheel DEFAULT_TRACE points into site-packages' parents, a path nobody made: name the
    # file as a checkout has it instead of that path
    note = ("the paper's trace (torpor-trace-samples.npy, in ../shared/data/ beside a source checkout) "
            "is not here; using the synthetic generator with its statistics (--trace PATH to use the trace)")
    return {**workload, "kind": "synthetic"}, note


def scenario_arrivals(sc: Scenario, trace_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    try:
        return make_arrivals(sc.workload, sc.functions, seed=sc.seed, trace_path=trace_path)
    except WorkloadError as e:
        raise ScenarioError(f"scenario.workload.{e}") from None
