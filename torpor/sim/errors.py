"""What the simulator's scheduler is told versus what happens: the error model (`Errors`).

The scheduler plans with its cost model (the scenario's bandwidths, the profiled execution
times, learned online from what it observes); the simulated node moves copies and runs
requests at TRUE times that differ from those by:

- **per-copy jitter** (`jitter`): each copy needs `j` times the link time the scheduler
  counts for its bytes, `j` lognormal with mean 1 (`exp(sigma z - sigma^2 / 2)`);
- **a bandwidth misestimate** (`bandwidth_factor`): every link's true bandwidth is that factor
  times what the scheduler believes (0.8: 20% slower than configured);
- **execution-time noise with heavy tails** (`exec_sigma`, `straggler_p`, `straggler_x`): each
  run takes its time (the profile times the scenario's `exec_noise`, as before) times a
  lognormal body of mean 1 (`exec_sigma`) and, with probability `straggler_p`, a straggler
  multiplier drawn uniformly from `straggler_x` (default 2-5x; stragglers raise the mean);
- **compute slowed by copies** (`copy_slowdown`): while at least one copy is moving into a
  device, compute on that device progresses `copy_slowdown` times slower (1: no effect).

Draws are per request (`draws`): the copy a request's placement starts takes that request's
jitter, and its run that request's execution factor. They come from their own seeded streams
(the scenario's seed), so ours (`torpor.sim.simulation.Simulation`) and the paper's policy
(`torpor.sim.paper_sim.PaperSim`) on the same arrivals face the same draws request by request,
and turning one error on does not change another's draws. `Errors()` is no error: the draws
are exactly 1 and the simulators run exactly as without it.

What the scheduler sees (`torpor.sim.physics.LinkSharing`, `torpor.sim.replay.Replay`): the
bytes each copy in flight has left (its progress times its bytes), when each copy should land
at the bandwidths its cost model believes, and when the running batch should end by its
estimate; it learns from each run's measured execution (`CostModel.observe_exec`) and, where
the cost model has one, each landed copy's measured seconds (`observe_copy`).

Settable from a scenario's JSON (`"errors": {"jitter": 0.1, "bandwidth_factor": 0.8}`), from
`torpor simulate --errors jitter=0.1,bandwidth_factor=0.8`, and for the command lines that load
paper scenarios (`loadtest/paper_eval.py`) from `TORPOR_SIM_ERRORS` in the same syntax.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

ERRORS_ENV = "TORPOR_SIM_ERRORS"


class ErrorsError(ValueError):
    """A bad error-model setting; the message names the field."""


@dataclass(frozen=True)
class Errors:
    """The gap between the scheduler's beliefs and the simulated truth (module docstring)."""

    jitter: float = 0.0  # sigma of each copy's lognormal link-time factor (mean 1)
    bandwidth_factor: float = 1.0  # true bandwidth / believed, every link
    exec_sigma: float = 0.0  # sigma of each run's lognormal factor (mean 1), beside the scenario's exec_noise
    straggler_p: float = 0.0  # probability that a run is a straggler
    straggler_x: tuple[float, float] = (2.0, 5.0)  # a straggler's multiplier, uniform in this range
    copy_slowdown: float = 1.0  # compute time multiplier while copies move into the device

    def __post_init__(self) -> None:
        for name in ("jitter", "exec_sigma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ErrorsError(f"errors.{name}: must be a number >= 0, got {v!r}")
        for name in ("bandwidth_factor", "copy_slowdown"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ErrorsError(f"errors.{name}: must be a positive number, got {v!r}")
        if not 0 <= self.straggler_p <= 1:
            raise ErrorsError(f"errors.straggler_p: must be in [0, 1], got {self.straggler_p!r}")
        lo, hi = self.straggler_x
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            raise ErrorsError(f"errors.straggler_x: expected [low, high] with 0 < low <= high, got {[lo, hi]}")

    @property
    def none(self) -> bool:
        """No error at all: the truth is what the scheduler is told."""
        return self == Errors()

    @property
    def copies_exact(self) -> bool:
        return self.jitter == 0 and self.bandwidth_factor == 1

    @property
    def exec_exact(self) -> bool:
        return self.exec_sigma == 0 and self.straggler_p == 0

    def draws(self, n: int, seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per request: the link-time factor of the copy its placement starts and its run's
        execution factor (None where that error is off: exactly 1)."""
        copy = run = None
        if self.jitter:
            z = np.random.default_rng([seed, 101]).standard_normal(n)
            copy = np.exp(self.jitter * z - self.jitter ** 2 / 2)
        if not self.exec_exact:
            g = np.random.default_rng([seed, 102])
            z, u, m = g.standard_normal(n), g.random(n), g.random(n)
            lo, hi = self.straggler_x
            run = np.exp(self.exec_sigma * z - self.exec_sigma ** 2 / 2) * np.where(
                u < self.straggler_p, lo + (hi - lo) * m, 1.0)
        return copy, run

    def as_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


_FIELDS = {f.name for f in fields(Errors)}


def parse_errors(value: Any, where: str = "errors") -> Errors:
    """`{"jitter": 0.1, "bandwidth_factor": 0.8, "exec_sigma": 0.1, "straggler_p": 0.01,
    "straggler_x": [2, 5], "copy_slowdown": 1.2}` (all optional; null or absent: no error), or
    the same as a string `jitter=0.1,bandwidth_factor=0.8,straggler_x=2:5`."""
    if value is None:
        return Errors()
    if isinstance(value, str):
        value = _parse_string(value, where)
    if isinstance(value, Errors):
        return value
    if not isinstance(value, dict):
        raise ErrorsError(f"{where}: expected an object, got {value!r}")
    unknown = set(value) - _FIELDS
    if unknown:
        raise ErrorsError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(_FIELDS)}")
    kw: dict[str, Any] = {}
    for k, v in value.items():
        if k == "straggler_x":
            if (not isinstance(v, (list, tuple)) or len(v) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                raise ErrorsError(f"{where}.straggler_x: expected [low, high], got {v!r}")
            kw[k] = (float(v[0]), float(v[1]))
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ErrorsError(f"{where}.{k}: expected a number, got {v!r}")
            kw[k] = float(v)
    try:
        return Errors(**kw)
    except ErrorsError as e:
        raise ErrorsError(str(e).replace("errors.", f"{where}.", 1)) from None


def _parse_string(text: str, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq:
            raise ErrorsError(f"{where}: expected KEY=VALUE, got {item!r}")
        try:
            out[k] = [float(x) for x in v.split(":")] if k == "straggler_x" else float(v)
        except ValueError:
            raise ErrorsError(f"{where}.{k}: expected a number, got {v!r}") from None
    return out


def merge_errors(base: Any, extra: Any, where: str = "errors") -> dict[str, Any]:
    """A scenario's `errors` field (`base`, dict or None) with `extra` (dict, string or None)
    laid over it, as a dict for the scenario JSON."""
    out = parse_errors(base, where).as_dict()
    if isinstance(extra, str):
        extra = _parse_string(extra, where)
    out.update(extra or {})
    parse_errors(out, where)  # validate
    return out


def errors_from_env() -> str | None:
    """`TORPOR_SIM_ERRORS` (KEY=VALUE,...; unset or empty: None), laid over a scenario's own
    errors by the command lines that load paper scenarios; the simulators never read it."""
    v = os.environ.get(ERRORS_ENV, "").strip()
    if v:
        _parse_string(v, ERRORS_ENV)
    return v or None
