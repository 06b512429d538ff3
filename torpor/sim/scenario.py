"""Simulator scenarios: the JSON a run is described by (`load_scenario`, `parse_scenario`),
its models (`ModelSpec`), the server's admission settings (`Staging`), sweeps, and the node
template's links (`build_links`). See `torpor.sim.simulation`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torpor.scheduling.costmodel import GB, TRANSFER_LATENCY_S, LinkMap, TopologyError
from torpor.scheduling.scheduler import POLICIES
from torpor.sim.errors import Errors, ErrorsError, parse_errors

MB = 1e6


class ScenarioError(ValueError):
    """A scenario file with a bad value; the message names the field."""


# ------------------------------------------------------------------------------------------------
# Scenario
# ------------------------------------------------------------------------------------------------


DEFAULT_BATCH_SCALE = 0.25  # assumed: each extra request in a batch adds a quarter of a batch-1 run


@dataclass
class ModelSpec:
    name: str
    nbytes: int
    exec_s: float
    slo_s: float
    first_group_bytes: int
    max_batch: int = 1  # 1: no batching
    max_queue_delay_s: float = 0.0  # dynamic batching: how long a short batch may wait for more
    batch_scale: float = DEFAULT_BATCH_SCALE  # exec(b) = exec(1) * (1 + batch_scale * (b - 1))

    def exec_seconds(self, batch: int = 1) -> float:
        return self.exec_s * (1.0 + self.batch_scale * (batch - 1))


@dataclass(frozen=True)
class Staging:
    """The server's admission on the simulator's devices (`torpor.runtime.staging`, `torpor.runtime.placer`):
    a device hands out `slots + lookahead` stages in queue order, and only a staged request
    takes memory, evicts and starts its copy; copies to one device go one at a time, at the
    path's full rate (the CPU device's copy thread, a CUDA device's copy stream). With `shed`,
    a request predicted past its whole SLO is answered at arrival, one that can no longer be on
    time when its turn comes is answered then, and one whose copy would evict a model other
    requests wait for is deferred (`torpor.scheduling.admission`). None on a scenario: copies start when
    the request is placed and nothing is shed (the simulator's original model)."""

    lookahead: int = 1
    shed: bool = True
    # seconds between a run's end on the device and the server's event loop acting on it
    # (answering, unpinning, giving the stage back, staging the next); the device's worker
    # goes on with the next staged request meanwhile. 0: at once
    release_s: float = 0.0
    # seconds from a staged request taking memory to its copy's first byte moving (the server's
    # swap-in on its event loop, the copy thread waking); 0: at once
    copy_delay_s: float = 0.0


@dataclass
class Scenario:
    name: str
    gpus: int
    gpu_memory: int
    gpus_per_node: int
    node: dict[str, Any]
    models: list[ModelSpec]
    functions: int
    workload: dict[str, Any]
    policies: list[str]
    exec_noise: float = 0.05
    seed: int = 0
    search_gpus: int = 0  # >0: find the fewest GPUs (up to this many) reaching `target_attainment`
    target_attainment: float = 0.99
    notes: str = ""
    source: str = ""
    sweep: tuple[str, list[float]] | None = None  # (parameter, values): run every policy at each
    weight_fraction: float = 1.0  # of each GPU's memory, what model weights may use
    staging: Staging | None = None  # the server's staging and shedding (None: copies start at placement)
    errors: Errors = field(default_factory=Errors)  # true times vs the scheduler's (`torpor.sim.errors`)
    # The platform beyond links and kernels (docs/paper-evaluation.md, "Platform"): a fixed
    # latency per copy, before its first group and after its last byte (both simulators' cost
    # models and links), and the server's own time per request beside the GPU's (front end,
    # queue, answer). The overhead is already taken off every model's `slo_s` (the objective the
    # device has), so planning and judging both count it; reported latencies exclude it.
    copy_latency_s: float = TRANSFER_LATENCY_S
    request_overhead_s: float = 0.0

    @property
    def weight_budget(self) -> int:
        return int(self.gpu_memory * self.weight_fraction)

    def links(self, n_gpus: int) -> LinkMap:
        return build_links(self.node, self.gpus_per_node, n_gpus)


def _num(spec: dict, key: str, where: str, *, positive: bool = True, default: Any = None, integer: bool = False):
    v = spec.get(key, default)
    if v is None:
        raise ScenarioError(f"{where}.{key}: required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ScenarioError(f"{where}.{key}: expected a number, got {v!r}")
    if integer and int(v) != v:
        raise ScenarioError(f"{where}.{key}: expected an integer, got {v!r}")
    if positive and v <= 0:
        raise ScenarioError(f"{where}.{key}: must be positive, got {v!r}")
    if not positive and v < 0:
        raise ScenarioError(f"{where}.{key}: must not be negative, got {v!r}")
    return int(v) if integer else float(v)


def load_profiles(path: str | Path) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _parse_models(spec: dict[str, Any], where: str, base: Path | None, budget: int) -> list[ModelSpec]:
    """The model mix: inline (`models`), or a key into a profile file (`profile`: 'FILE#KEY');
    each model no larger than a GPU's weight budget."""
    models_spec = spec.get("models")
    if models_spec is None:
        prof = spec.get("profile")
        if not isinstance(prof, str) or "#" not in prof:
            raise ScenarioError(f"{where}.profile: expected 'FILE#KEY' (or give 'models' inline), got {prof!r}")
        file, _, key = prof.partition("#")
        p = Path(file)
        if not p.is_absolute() and base is not None:
            p = base / p
        try:
            profiles = load_profiles(p)
        except OSError as e:
            raise ScenarioError(f"{where}.profile: cannot read {p}: {e}") from None
        if key not in profiles:
            raise ScenarioError(f"{where}.profile: no profile {key!r} in {p} (has {sorted(profiles)})")
        models_spec = profiles[key].get("models")
        models_where = f"{where}.profile {prof!r}: models"
    else:
        models_where = f"{where}.models"
    if not isinstance(models_spec, list) or not models_spec:
        raise ScenarioError(f"{models_where}: expected a non-empty list")
    models = []
    for i, m in enumerate(models_spec):
        w = f"{models_where}[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            raise ScenarioError(f"{w}.name: required (a string)")
        nbytes = int(_num(m, "size_MB", w) * MB)
        if nbytes > budget:
            raise ScenarioError(f"{w}.size_MB: model {m['name']!r} ({m['size_MB']} MB) is larger than every GPU "
                                f"(weight budget {budget / GB:g} GB: gpu_memory_GB x weight_fraction)")
        unknown_m = set(m) - {"name", "size_MB", "exec_ms", "slo_ms", "first_group_MB", "max_batch",
                              "max_queue_delay_ms", "batch_scale"}
        if unknown_m:
            raise ScenarioError(f"{w}: unknown field(s) {sorted(unknown_m)}")
        models.append(ModelSpec(
            m["name"], nbytes, _num(m, "exec_ms", w) / 1e3, _num(m, "slo_ms", w) / 1e3,
            int(_num(m, "first_group_MB", w, default=2.0) * MB),
            max_batch=_num(m, "max_batch", w, integer=True, default=1),
            max_queue_delay_s=_num(m, "max_queue_delay_ms", w, positive=False, default=0.0) / 1e3,
            batch_scale=_num(m, "batch_scale", w, positive=False, default=DEFAULT_BATCH_SCALE),
        ))
    return models


def parse_scenario(spec: dict[str, Any], *, base: Path | None = None, source: str = "scenario") -> Scenario:
    """Validate a scenario dict (see loadtest/scenarios/README.md); errors name the field."""
    where = "scenario"
    known = {"name", "gpus", "gpu_memory_GB", "gpus_per_node", "node", "models", "profile", "functions",
             "workload", "policies", "exec_noise", "seed", "search_gpus", "target_attainment", "notes", "sweep",
             "weight_fraction", "staging", "errors", "copy_latency_ms", "request_overhead_ms"}
    unknown = set(spec) - known
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}")
    gpus = _num(spec, "gpus", where, integer=True)
    mem = int(_num(spec, "gpu_memory_GB", where) * GB)
    frac = _num(spec, "weight_fraction", where, default=1.0)
    if frac > 1:
        raise ScenarioError(f"{where}.weight_fraction: must be at most 1, got {frac}")
    budget = int(mem * frac)
    per_node = _num(spec, "gpus_per_node", where, integer=True, default=gpus)
    node = spec.get("node", {}) or {}
    if not isinstance(node, dict):
        raise ScenarioError(f"{where}.node: expected an object")
    try:
        build_links(node, per_node, gpus)
    except TopologyError as e:
        raise ScenarioError(f"{where}.{e}") from None
    models = _parse_models(spec, where, base, budget)
    policies = spec.get("policies", list(POLICIES))
    if not isinstance(policies, list) or not policies:
        raise ScenarioError(f"{where}.policies: expected a non-empty list")
    for i, p in enumerate(policies):
        if p not in POLICIES:
            raise ScenarioError(f"{where}.policies[{i}]: unknown policy {p!r}; expected one of {list(POLICIES)}")
    workload = spec.get("workload", {}) or {}
    if not isinstance(workload, dict):
        raise ScenarioError(f"{where}.workload: expected an object")
    target = _num(spec, "target_attainment", where, default=0.99)
    if target > 1:
        raise ScenarioError(f"{where}.target_attainment: must be at most 1, got {target}")
    staging = parse_staging(spec.get("staging"), f"{where}.staging")
    copy_latency = _num(spec, "copy_latency_ms", where, positive=False, default=TRANSFER_LATENCY_S * 1e3) / 1e3
    overhead = _num(spec, "request_overhead_ms", where, positive=False, default=0.0) / 1e3
    for i, m in enumerate(models):
        if m.slo_s <= overhead:
            raise ScenarioError(f"{where}.request_overhead_ms: {overhead * 1e3:g} ms leaves model {m.name!r} "
                                f"(models[{i}].slo_ms {m.slo_s * 1e3:g}) no time on the device")
        m.slo_s -= overhead  # the front end's share of every objective
    try:
        errors = parse_errors(spec.get("errors"), f"{where}.errors")
    except ErrorsError as e:
        raise ScenarioError(str(e)) from None
    return Scenario(
        name=str(spec.get("name", source)),
        gpus=gpus,
        gpu_memory=mem,
        gpus_per_node=per_node,
        node=node,
        models=models,
        functions=_num(spec, "functions", where, integer=True),
        workload=workload,
        policies=list(policies),
        exec_noise=_num(spec, "exec_noise", where, positive=False, default=0.05),
        seed=_num(spec, "seed", where, positive=False, integer=True, default=0),
        search_gpus=_num(spec, "search_gpus", where, positive=False, integer=True, default=0),
        target_attainment=target,
        notes=str(spec.get("notes", "")),
        source=source,
        sweep=None if spec.get("sweep") is None else parse_sweep(spec["sweep"], f"{where}.sweep"),
        weight_fraction=frac,
        staging=staging,
        errors=errors,
        copy_latency_s=copy_latency,
        request_overhead_s=overhead,
    )


def parse_staging(value: Any, where: str = "staging") -> Staging | None:
    """`{"lookahead": 1, "shed": true, "release_ms": 0, "copy_delay_ms": 0}` (all optional), or
    null/absent for none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected an object, got {value!r}")
    unknown = set(value) - {"lookahead", "shed", "release_ms", "copy_delay_ms"}
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}")
    lookahead = _num(value, "lookahead", where, positive=False, integer=True, default=1)
    shed = value.get("shed", True)
    if not isinstance(shed, bool):
        raise ScenarioError(f"{where}.shed: expected true or false, got {shed!r}")
    release_ms = _num(value, "release_ms", where, positive=False, default=0.0)
    copy_delay_ms = _num(value, "copy_delay_ms", where, positive=False, default=0.0)
    return Staging(lookahead, shed, release_ms / 1e3, copy_delay_ms / 1e3)


SWEEP_PARAMS = ("functions", "rate_scale", "gpus")


def parse_sweep(value: Any, where: str = "sweep") -> tuple[str, list[float]]:
    """`"functions=300:600:50"` (start:stop:step, stop included), `"rate_scale=1,1.5,2"`, or
    `{"param": "functions", "values": [300, 400]}`; the parameter is one of SWEEP_PARAMS."""
    if isinstance(value, str):
        param, eq, rng = value.partition("=")
        if not eq:
            raise ScenarioError(f"{where}: expected PARAM=START:STOP:STEP or PARAM=V1,V2,..., got {value!r}")
        try:
            if ":" in rng:
                parts = [float(x) for x in rng.split(":")]
                if len(parts) != 3:
                    raise ValueError
            else:
                values = [float(x) for x in rng.split(",")]
        except ValueError:
            raise ScenarioError(f"{where}: bad values {rng!r} (START:STOP:STEP or V1,V2,...)") from None
        if ":" in rng:
            start, stop, step = parts
            if step <= 0 or stop < start:
                raise ScenarioError(f"{where}: need START <= STOP and STEP > 0, got {rng!r}")
            n = math.floor((stop - start) / step + 1e-9) + 1
            values = [start + i * step for i in range(n)]
    elif isinstance(value, dict):
        unknown = set(value) - {"param", "values"}
        if unknown:
            raise ScenarioError(f"{where}: unknown field(s) {sorted(unknown)}")
        param, values = value.get("param"), value.get("values")
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ScenarioError(f"{where}.values: expected a non-empty list of numbers, got {values!r}")
    else:
        raise ScenarioError(f"{where}: expected a string or an object, got {value!r}")
    param = str(param).strip()
    if param not in SWEEP_PARAMS:
        raise ScenarioError(f"{where}: unknown parameter {param!r}; expected one of {list(SWEEP_PARAMS)}")
    if param != "rate_scale":
        if any(v != int(v) for v in values):
            raise ScenarioError(f"{where}: {param} takes whole numbers, got {values}")
        values = [int(v) for v in values]
    if any(v <= 0 for v in values):
        raise ScenarioError(f"{where}: values must be positive, got {values}")
    return param, list(values)


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        spec = json.loads(p.read_text())
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {p}: {e}") from None
    except json.JSONDecodeError as e:
        raise ScenarioError(f"scenario {p}: not valid JSON: {e}") from None
    return parse_scenario(spec, base=p.parent, source=str(p))


def build_links(node: dict[str, Any], per_node: int, n_gpus: int) -> LinkMap:
    """The node template repeated over `n_gpus` GPUs (the last node may be partial)."""
    names = [f"gpu{i}" for i in range(n_gpus)]
    nodes = -(-n_gpus // per_node)
    pcie_t = node.get("pcie_GBps", 25.0)
    if not isinstance(pcie_t, list):  # one value for every GPU: name the field, not an expanded index
        LinkMap.from_dict(["gpu0"], {"pcie_GBps": pcie_t}, where="node")
    spec: dict[str, Any] = {k: v for k, v in node.items() if k in ("switch_GBps", "nvlink_GBps")}
    pcie = []
    for i in range(n_gpus):
        pcie.append(pcie_t[i % per_node] if isinstance(pcie_t, list) and len(pcie_t) == per_node else pcie_t)
    if isinstance(pcie_t, list) and len(pcie_t) != per_node:
        raise TopologyError(f"node.pcie_GBps: {len(pcie_t)} values for {per_node} GPUs per node")
    spec["pcie_GBps"] = pcie if all(isinstance(x, (int, float)) for x in pcie) else pcie_t

    def shift(items: list, n: int, key: str) -> list:
        out = []
        for i, it in enumerate(items or []):
            if not isinstance(it, list):
                raise TopologyError(f"node.{key}[{i}]: expected a list")
            idx = [x for x in it if isinstance(x, int) and not isinstance(x, bool)]
            bad = [x for x in it[:2 if key != "switches" else None] if not isinstance(x, int) or isinstance(x, bool)
                   or not 0 <= x < per_node]
            if bad:
                raise TopologyError(f"node.{key}[{i}]: GPU indices must be 0..{per_node - 1}, got {bad}")
            del idx
            if key == "switches":
                g = [n * per_node + x for x in it if n * per_node + x < n_gpus]
                if g:
                    out.append(g)
            else:
                a, b = n * per_node + it[0], n * per_node + it[1]
                if a < n_gpus and b < n_gpus:
                    out.append([a, b, *it[2:]])
        return out

    for key in ("switches", "nvlink", "p2p"):
        if key in node:
            spec[key] = [x for n in range(nodes) for x in shift(node[key], n, key)]
    unknown = set(node) - {"pcie_GBps", "switches", "switch_GBps", "nvlink", "nvlink_GBps", "p2p"}
    if unknown:
        raise TopologyError(f"node: unknown field(s) {sorted(unknown)}")
    return LinkMap.from_dict(names, spec, where="node")
