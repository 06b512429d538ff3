"""CostModel: how long a transfer, an execution and a pipelined cold start take. Pure logic.

No torch, no devices: the engine and the simulator (`torpor.sim.simulation`) both feed it.

**Links.** A `LinkMap` names the links a copy crosses. A host->GPU copy crosses that GPU's own
PCIe link `pcie:<dev>` and, where GPUs sit behind one PCIe switch, the switch's uplink
`switch:<id>` (siblings share it). A GPU->GPU copy crosses the directed NVLink `nvlink:<src>><dst>`
when the pair has one; otherwise, where peer access is possible (`p2p`), both GPUs' PCIe links.
Copies on a link share it by processor sharing: each moves at its share of the narrowest link
on its path, re-rated whenever a copy on one of its links starts or lands (the simulator's
physics, `torpor.sim.simulation.LinkSharing`). The estimate for a new copy of B bytes follows:
knowing the bytes r_i each copy on link l still has to move, it lands after
`max over l of (B + sum_i min(r_i, B)) / bw[l]` (every copy smaller than it lands first and
frees its share; the others keep sharing with it to the end), assuming no further copies join.
Knowing only how many copies are on each link (`inflight`), it takes the share it gets at the
start for its whole life, `B / min(bw[l] / (inflight[l] + 1))`: an upper bound under processor
sharing when nothing else joins.

**Execution.** `ExecEstimator` keeps a moving estimate (exponentially weighted, `alpha`) of
execution seconds per (model, batch size): seeded from a profile (a few warm runs at load, or a
scenario's numbers) and refined online from every measured run. An unseen batch size scales the
nearest known one linearly in the batch (a pessimistic guess the first measurement replaces).

**Estimates against measurements.** A server only has estimates: a link slower than configured,
copies that vary, runs with a heavy tail. `Calibration` keeps, per link path, a moving mean and
spread of measured / predicted copy time (each copy compared with what this model predicted for
it when it started, sharing included), and per model the spread of measured runs around the
execution estimate. Transfer estimates on a path are scaled by its mean ratio once enough copies
were seen (a bandwidth believed 1.25x too high is learned within tens of copies); `risk_s` turns
the spreads into seconds of slack that the scheduler keeps when it asks whether an option meets
its objective (a calibrated upper quantile instead of the mean). With exact predictions the
ratios stay 1 and the spreads 0, and nothing changes.

**Pipelined completion.** Copies go group by group and compute waits only for the group it
needs, so a cold request finishes in about `wait + max(transfer, exec) + first_group`, where
`first_group` is the copy time of the first group (compute cannot start before it lands).
Transfer that overlaps queue wait is free: only what is left of it when the device frees counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

GB = 1e9

# Defaults when nothing is measured or configured (bytes/s): PCIe 4 x16 effective for a GPU,
# a plain memcpy for a CPU virtual device. Stated as assumptions, not measurements.
DEFAULT_PCIE_BW = 25 * GB
DEFAULT_CPU_BW = 5 * GB
DEFAULT_NVLINK_BW = 150 * GB
TRANSFER_LATENCY_S = 20e-6  # per copy: launch + first DMA (assumed)


class TopologyError(ValueError):
    """A topology description with a bad value; the message names the field."""


@dataclass
class LinkMap:
    """Devices and the links between them and the host.

    - `pcie`: device -> host link bandwidth (bytes/s, one direction)
    - `switch`: device -> PCIe switch id (devices with one id share the uplink `switch_bw[id]`)
    - `nvlink`: (src, dst) -> bandwidth of the directed NVLink path (give both directions)
    - `p2p`: unordered pairs that can copy device to device without NVLink (over PCIe)
    """

    devices: list[str]
    pcie: dict[str, float]
    switch: dict[str, str] = field(default_factory=dict)
    switch_bw: dict[str, float] = field(default_factory=dict)
    nvlink: dict[tuple[str, str], float] = field(default_factory=dict)
    p2p: set[frozenset] = field(default_factory=set)
    measured: dict[str, bool] = field(default_factory=dict)  # link id -> measured (vs configured)

    def __post_init__(self) -> None:
        self._bw: dict[str, float] = {}
        for d in self.devices:
            self._bw[f"pcie:{d}"] = self.pcie.get(d, DEFAULT_PCIE_BW)
        for sid, bw in self.switch_bw.items():
            self._bw[f"switch:{sid}"] = bw
        for (s, d), bw in self.nvlink.items():
            self._bw[f"nvlink:{s}>{d}"] = bw
        self._host_path = {d: self._make_host_path(d) for d in self.devices}
        self._peer_path: dict[tuple[str, str], tuple[str, ...] | None] = {}
        for s in self.devices:
            for d in self.devices:
                if s != d:
                    self._peer_path[(s, d)] = self._make_peer_path(s, d)

    # paths -------------------------------------------------------------------------------------
    def _make_host_path(self, dev: str) -> tuple[str, ...]:
        path = [f"pcie:{dev}"]
        sid = self.switch.get(dev)
        if sid is not None and f"switch:{sid}" in self._bw:
            path.append(f"switch:{sid}")
        return tuple(path)

    def _make_peer_path(self, src: str, dst: str) -> tuple[str, ...] | None:
        if (src, dst) in self.nvlink:
            return (f"nvlink:{src}>{dst}",)
        if frozenset((src, dst)) in self.p2p:
            if self.switch.get(src) is not None and self.switch.get(src) == self.switch.get(dst):
                return (f"pcie:{src}", f"pcie:{dst}")  # through the switch, not the uplink
            return self._host_path[src] + self._host_path[dst]
        return None

    def host_path(self, dev: str) -> tuple[str, ...]:
        return self._host_path[dev]

    def peer_path(self, src: str, dst: str) -> tuple[str, ...] | None:
        """Links a src->dst copy crosses, or None where the pair cannot copy directly."""
        return self._peer_path.get((src, dst))

    def bandwidth(self, link: str) -> float:
        return self._bw[link]

    def set_bandwidth(self, link: str, bytes_per_s: float, *, measured: bool = True) -> None:
        if not bytes_per_s > 0:
            raise TopologyError(f"{link}: bandwidth must be positive, got {bytes_per_s}")
        self._bw[link] = float(bytes_per_s)
        self.measured[link] = measured
        kind, _, rest = link.partition(":")
        if kind == "pcie":
            self.pcie[rest] = float(bytes_per_s)

    def effective_bandwidth(self, path: Iterable[str], inflight: Mapping[str, int]) -> float:
        """The share a new transfer gets: narrowest link over (transfers already on it + 1)."""
        return min(self._bw[lk] / (inflight.get(lk, 0) + 1) for lk in path)

    def siblings(self, dev: str) -> list[str]:
        sid = self.switch.get(dev)
        return [d for d in self.devices if d != dev and sid is not None and self.switch.get(d) == sid]

    # description -------------------------------------------------------------------------------
    def as_dict(self) -> dict[str, Any]:
        links = []
        for lk, bw in sorted(self._bw.items()):
            links.append({"link": lk, "bytes_per_s": bw, "GBps": round(bw / GB, 2),
                          "measured": bool(self.measured.get(lk, False))})
        return {
            "devices": [
                {"name": d, "host_path": list(self._host_path[d]), "switch": self.switch.get(d),
                 "pcie_siblings": self.siblings(d),
                 "peers": {p: list(path) for p in self.devices if p != d
                           and (path := self._peer_path[(p, d)]) is not None}}
                for d in self.devices
            ],
            "links": links,
        }

    @classmethod
    def from_dict(cls, devices: list[str], spec: Mapping[str, Any], *, where: str = "topology") -> LinkMap:
        """From a scenario/topology file section:

        {"pcie_GBps": 25 | [25, 25, ...] | {"gpu0": 25},
         "switches": [["gpu0", "gpu1"], ["gpu2", "gpu3"]], "switch_GBps": 32,
         "nvlink": [["gpu0", "gpu3", 150], ...]   (both directions, GB/s each),
         "p2p": [["gpu0", "gpu1"]]}

        Devices may be named or given by index. Bad values raise TopologyError naming the field.
        """
        known = {"pcie_GBps", "switches", "switch_GBps", "nvlink", "p2p", "nvlink_GBps"}
        unknown = set(spec) - known
        if unknown:
            raise TopologyError(f"{where}: unknown field(s) {sorted(unknown)}; expected {sorted(known)}")

        def dev(x: Any, fld: str) -> str:
            if isinstance(x, int) and 0 <= x < len(devices):
                return devices[x]
            if isinstance(x, str) and x in devices:
                return x
            raise TopologyError(f"{where}.{fld}: unknown device {x!r} (devices: {devices})")

        def gbps(x: Any, fld: str) -> float:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
                raise TopologyError(f"{where}.{fld}: bandwidth must be a positive number of GB/s, got {x!r}")
            return float(x) * GB

        pcie_spec = spec.get("pcie_GBps", DEFAULT_PCIE_BW / GB)
        if isinstance(pcie_spec, list):
            if len(pcie_spec) != len(devices):
                raise TopologyError(f"{where}.pcie_GBps: {len(pcie_spec)} values for {len(devices)} devices")
            pcie = {d: gbps(v, f"pcie_GBps[{i}]") for i, (d, v) in enumerate(zip(devices, pcie_spec))}
        elif isinstance(pcie_spec, dict):
            pcie = {d: DEFAULT_PCIE_BW for d in devices}
            for k, v in pcie_spec.items():
                pcie[dev(k, "pcie_GBps")] = gbps(v, f"pcie_GBps.{k}")
        else:
            bw = gbps(pcie_spec, "pcie_GBps")
            pcie = {d: bw for d in devices}
        switch: dict[str, str] = {}
        switch_bw: dict[str, float] = {}
        for i, group in enumerate(spec.get("switches", []) or []):
            if not isinstance(group, list):
                raise TopologyError(f"{where}.switches[{i}]: expected a list of devices")
            for x in group:
                d = dev(x, f"switches[{i}]")
                if d in switch:
                    raise TopologyError(f"{where}.switches[{i}]: device {d} is behind two switches")
                switch[d] = f"sw{i}"
            if "switch_GBps" in spec:
                switch_bw[f"sw{i}"] = gbps(spec["switch_GBps"], "switch_GBps")
            else:  # the uplink is as wide as one GPU's link: siblings share it
                switch_bw[f"sw{i}"] = max(pcie[dev(x, "switches")] for x in group)
        nvlink: dict[tuple[str, str], float] = {}
        for i, link in enumerate(spec.get("nvlink", []) or []):
            if not isinstance(link, list) or len(link) not in (2, 3):
                raise TopologyError(f"{where}.nvlink[{i}]: expected [dev, dev] or [dev, dev, GB/s]")
            a, b = dev(link[0], f"nvlink[{i}]"), dev(link[1], f"nvlink[{i}]")
            if a == b:
                raise TopologyError(f"{where}.nvlink[{i}]: a link needs two different devices")
            bw = gbps(link[2] if len(link) == 3 else spec.get("nvlink_GBps", DEFAULT_NVLINK_BW / GB),
                      f"nvlink[{i}]")
            nvlink[(a, b)] = nvlink[(b, a)] = bw
        p2p = set()
        for i, pair in enumerate(spec.get("p2p", []) or []):
            if not isinstance(pair, list) or len(pair) != 2:
                raise TopologyError(f"{where}.p2p[{i}]: expected [dev, dev]")
            p2p.add(frozenset((dev(pair[0], f"p2p[{i}]"), dev(pair[1], f"p2p[{i}]"))))
        return cls(list(devices), pcie, switch, switch_bw, nvlink, p2p)


class ExecEstimator:
    """Moving estimate of execution seconds per (model, batch); see the module docstring."""

    def __init__(self, alpha: float = 0.2, default_s: float = 0.010):
        self.alpha = alpha
        self.default_s = default_s
        self._est: dict[Any, dict[int, float]] = {}
        self.samples: dict[Any, int] = {}

    def seed(self, model: Any, seconds: float, batch: int = 1) -> None:
        """A profiled value (replaces any estimate for that batch size)."""
        self._est.setdefault(model, {})[batch] = float(seconds)

    def observe(self, model: Any, seconds: float, batch: int = 1) -> None:
        per = self._est.setdefault(model, {})
        old = per.get(batch)
        per[batch] = float(seconds) if old is None else old + self.alpha * (seconds - old)
        self.samples[model] = self.samples.get(model, 0) + 1

    def estimate(self, model: Any, batch: int = 1) -> float:
        per = self._est.get(model)
        if not per:
            return self.default_s
        s = per.get(batch)
        if s is not None:
            return s
        nearest = min(per, key=lambda b: abs(b - batch))
        return per[nearest] * max(1.0, batch / nearest)

    def known(self, model: Any) -> bool:
        """Profiled or measured at least once (else `estimate` is the default guess)."""
        return model in self._est

    def forget(self, model: Any) -> None:
        self._est.pop(model, None)
        self.samples.pop(model, None)

    def as_dict(self, name: Any = str) -> dict[str, dict[str, float]]:
        """Milliseconds per model (named by `name(model)`) and batch size."""
        return {name(m): {str(b): round(s * 1e3, 4) for b, s in per.items()} for m, per in self._est.items()}


class Calibration:
    """Moving mean and spread of measured / predicted, per key (a link path, a model); see the
    module docstring. `alpha`: weight of a new sample; `warmup`: samples before the mean is used
    (a few early copies, often the slowest, must not swing it); `z`: the quantile kept as slack,
    in spreads (1.645: about the 95th percentile of a normal ratio)."""

    def __init__(self, alpha: float = 0.05, warmup: int = 8, z: float = 1.645):
        self.alpha, self.warmup, self.z = alpha, warmup, z
        self._mean: dict[Any, float] = {}
        self._var: dict[Any, float] = {}
        self._n: dict[Any, int] = {}

    def observe(self, key: Any, predicted_s: float, measured_s: float) -> None:
        if not (predicted_s > 0 and measured_s > 0):
            return
        r = measured_s / predicted_s
        n = self._n.get(key, 0) + 1
        self._n[key] = n
        if n == 1:
            self._mean[key], self._var[key] = r, 0.0
            return
        a = max(self.alpha, 1.0 / n)  # a plain average until 1/alpha samples, then moving
        m = self._mean[key]
        d = r - m
        self._mean[key] = m + a * d
        self._var[key] = (1 - a) * (self._var[key] + a * d * d)

    def factor(self, key: Any) -> float:
        """The mean ratio once `warmup` samples were seen, else 1."""
        return self._mean[key] if self._n.get(key, 0) >= self.warmup else 1.0

    def spread(self, key: Any) -> float:
        """The ratio's standard deviation once `warmup` samples were seen, else 0."""
        return math.sqrt(self._var[key]) if self._n.get(key, 0) >= self.warmup else 0.0

    def as_dict(self, name: Any = str) -> dict[str, dict[str, float]]:
        return {name(k): {"samples": self._n[k], "mean": round(self._mean[k], 4),
                          "spread": round(math.sqrt(self._var[k]), 4)} for k in self._n}


class CostModel:
    """Transfer, execution and pipelined-completion estimates over a `LinkMap`."""

    def __init__(self, links: LinkMap, exec_estimator: ExecEstimator | None = None,
                 transfer_latency_s: float = TRANSFER_LATENCY_S):
        self.links = links
        self.exec = exec_estimator or ExecEstimator()
        self.transfer_latency_s = transfer_latency_s
        self.swap_observations: dict[str, tuple[int, float]] = {}  # link path -> (bytes, seconds)
        self.copies = Calibration()  # per link path: measured / predicted copy time
        self.runs = Calibration()  # per model: measured / estimated execution time

    def transfer_seconds(self, nbytes: int, path: Iterable[str], inflight: Mapping[str, int],
                         remaining: Any = None) -> float:
        """Seconds until a copy started now lands (module docstring). `remaining`: link ->
        the bytes each copy in flight on it still has to move, as numbers or as
        (bytes, slack seconds) pairs (anything with `.get(link, ())`); without it, the
        count-based bound from `inflight`."""
        if nbytes <= 0:
            return 0.0
        path = tuple(path)
        k = self.copies.factor(path)  # what copies on this path took against their plan
        if remaining is None:
            return self.transfer_latency_s + k * nbytes / self.links.effective_bandwidth(path, inflight)
        worst = 0.0
        for lk in path:
            ahead = sum(min(x[0] if isinstance(x, tuple) else x, nbytes) for x in remaining.get(lk, ()))
            worst = max(worst, (nbytes + ahead) / self.links.bandwidth(lk))
        return self.transfer_latency_s + k * worst

    def delays(self, nbytes: int, path: Iterable[str], remaining: Any) -> Iterable[tuple[float, float]]:
        """(delay, slack) for each copy in flight that a new copy of `nbytes` over `path` would
        slow down: sharing link l, it lands min(its bytes left, nbytes) / bw[l] later. Copies
        given as bare byte counts have unbounded slack."""
        if remaining is None or nbytes <= 0:
            return
        for lk in path:
            bw = self.links.bandwidth(lk)
            for x in remaining.get(lk, ()):
                rem, slack = x if isinstance(x, tuple) else (x, math.inf)
                yield min(rem, nbytes) / bw, slack

    def own_delay(self, nbytes: int, path: Iterable[str], dev: str, remaining: Any) -> float:
        """How much later the copies landing on `dev` (those on its own links in `path`: its
        PCIe link, an NVLink into it) land if a copy of `nbytes` joins them now: the most that
        work queued on `dev` behind those copies is delayed (processor sharing)."""
        worst = 0.0
        for lk in path:
            if lk == f"pcie:{dev}" or lk.endswith(f">{dev}"):
                bw = self.links.bandwidth(lk)
                for x in remaining.get(lk, ()):
                    rem = x[0] if isinstance(x, tuple) else x
                    worst = max(worst, min(rem, nbytes) / bw)
        return worst

    def copy_plan(self, nbytes: int, first_bytes: int, path: tuple[str, ...], inflight: Mapping[str, int],
                  remaining: Any = None, clear_in: float | None = None) -> tuple[float, float, float]:
        """(start, landed, first): seconds from now until a copy of `nbytes` over `path` starts,
        until it has landed, and until its first group (`first_bytes`) has landed.

        It starts now at the share it gets (`transfer_seconds`), unless `clear_in` (seconds until
        every copy in flight on the path has landed; None: unknown) says that waiting for the
        path to clear and then moving at its full bandwidth lands sooner: a copy that starts
        beside a nearly finished one keeps half the link for its whole life under the
        simulator's fixed-share physics, while waiting a few milliseconds gets all of it (under
        processor sharing, which real links approach, starting at once lands no later than
        that: the estimate stays an upper bound)."""
        landed = self.transfer_seconds(nbytes, path, inflight, remaining)
        first = self.transfer_seconds(first_bytes, path, inflight)
        if clear_in is not None and clear_in > 0:
            waited = clear_in + self.nominal_seconds(nbytes, path)
            if waited < landed:
                return clear_in, waited, clear_in + self.nominal_seconds(first_bytes, path)
        return 0.0, landed, first

    def nominal_seconds(self, nbytes: int, path: Iterable[str]) -> float:
        """Link time with nothing else in flight: the resource a transfer consumes."""
        return self.transfer_seconds(nbytes, path, {})

    def exec_seconds(self, model: Any, batch: int = 1) -> float:
        return self.exec.estimate(model, batch)

    @staticmethod
    def completion(wait_s: float, transfer_s: float, exec_s: float, first_group_s: float,
                   start_s: float = 0.0) -> float:
        """Seconds from now until a request finishes: the copy starts now (or after `start_s`;
        `transfer_s` and `first_group_s` count from now), overlapping the wait; compute starts
        when the device is free and the first group has landed, and cannot end before the last
        group has."""
        if start_s > 0:
            return start_s + CostModel.completion(max(0.0, wait_s - start_s), transfer_s - start_s, exec_s,
                                                  first_group_s - start_s)
        left = transfer_s - wait_s
        if left <= 0:
            return wait_s + exec_s
        return wait_s + max(left, exec_s) + min(first_group_s, left)

    def observe_exec(self, model: Any, seconds: float, batch: int = 1) -> None:
        before = self.exec.estimate(model, batch) if self.exec.known(model) else 0.0
        if before > 0:
            self.runs.observe(model, before, seconds)
        self.exec.observe(model, seconds, batch)

    def observe_copy(self, path: Iterable[str], nbytes: int, seconds: float, predicted_s: float | None = None) -> None:
        """A copy over `path` took `seconds`; `predicted_s`: what this model predicted for it when
        it started, sharing included (None: nothing to learn from)."""
        if predicted_s is not None:
            path = tuple(path)
            # the prediction was scaled by what this path had shown; learn against the unscaled one
            self.copies.observe(path, predicted_s / self.copies.factor(path), seconds)

    def risk_s(self, path: Iterable[str] | None, transfer_s: float, model: Any, exec_s: float) -> float:
        """Seconds of slack for an option's completion: the calibrated upper quantile of its copy
        (`transfer_s` over `path`) and its run (`exec_s` of `model`) beyond their estimates,
        independent errors added in quadrature. 0 while predictions have been exact."""
        sc = self.copies.spread(tuple(path)) * transfer_s if path and transfer_s > 0 else 0.0
        se = self.runs.spread(model) * exec_s
        if sc == 0.0 and se == 0.0:
            return 0.0
        return self.copies.z * math.sqrt(sc * sc + se * se)

    def observe_swap(self, dev: str, nbytes: int, seconds: float, *, source: str = "host",
                     concurrent: int = 0) -> None:
        """A measured swap-in. Host swaps with nothing else in flight refine that GPU's PCIe
        bandwidth (a moving estimate); the rest are only recorded."""
        key = f"{source}:{dev}"
        b, s = self.swap_observations.get(key, (0, 0.0))
        self.swap_observations[key] = (b + nbytes, s + seconds)
        if source == "host" and concurrent == 0 and nbytes >= (64 << 20) and seconds > 0:
            link = f"pcie:{dev}"
            old = self.links.bandwidth(link)
            bw = nbytes / max(seconds - self.transfer_latency_s, 1e-9)
            self.links.set_bandwidth(link, old + 0.2 * (bw - old), measured=True)


def slo_seconds(config_params: Mapping[str, str] | None, default_ms: float | None,
                timeout_s: float | None = None) -> float | None:
    """A request's latency objective: the model's `torpor.slo_ms` parameter, else the server
    default; a request `timeout` (seconds) may only tighten it. None: no objective."""
    slo = None
    raw = (config_params or {}).get("torpor.slo_ms")
    if raw not in (None, ""):
        try:
            v = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"parameter torpor.slo_ms must be a number of milliseconds, got {raw!r}") from None
        if not v > 0:
            raise ValueError(f"parameter torpor.slo_ms must be positive, got {raw!r}")
        slo = v / 1e3
    elif default_ms is not None and default_ms > 0:
        slo = default_ms / 1e3
    if timeout_s is not None and timeout_s > 0:
        slo = timeout_s if slo is None else min(slo, timeout_s)
    return slo
