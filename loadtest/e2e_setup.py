"""loadtest/e2e.py's setup: its flags' parsers (--slo-ms, --load), what the flags settle before anything
expensive runs (Plan: loads, kinds, protocols, workloads, the trace, the deadline), the versions it
records, and phase 1, the model repository and the device memory bounds sized from its bytes
(Repository)."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.e2e_workloads import BLOCK, KINDS, T0, build_repository, find_trace, safetensors_bytes, stamp


def parse_slo(text: str, kinds: list[str]) -> dict[str, float]:
    slo = {k: KINDS[k].slo_ms for k in kinds}
    for part in filter(None, (p.strip() for p in text.split(","))):
        k, _, v = part.partition("=")
        slo[k.strip()] = float(v)
    return slo


def parse_loads(text: str) -> list[float]:
    """--load: one fraction of the single-stream capacity, or a comma list of them."""
    try:
        loads = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or a comma list of numbers: {text!r}") from None
    if not loads or any(not (x > 0 and math.isfinite(x)) for x in loads):
        raise argparse.ArgumentTypeError(f"loads must be positive numbers: {text!r}")
    return list(dict.fromkeys(loads))


def versions() -> dict:
    """Python, torch, CUDA and GPU (asked of a fresh interpreter), tritonclient and the CPU count: the
    JSON's "versions"."""
    code = ("import json, sys, torch; d = {'python': sys.version.split()[0], 'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}; "
            "print(json.dumps(d))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             check=False).stdout
        d = json.loads(out.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001
        d = {}
    try:
        import tritonclient

        d["tritonclient"] = getattr(tritonclient, "__version__", None)
    except ImportError:
        pass
    d["cpus"] = os.cpu_count()
    return d


@dataclass
class Plan:
    """What the flags settle before anything expensive runs."""

    args: argparse.Namespace
    loads: list[float]
    mix: list[str]  # model kinds, round-robin over the models
    max_rps: float  # cap on the auto offered rate
    slo: dict[str, float]  # ms per kind
    protocols: list[str]  # those whose aio client imports
    workloads: list[str]
    trace_path: Path | None
    trace: np.ndarray | None
    deadline: float  # monotonic time by which the whole run (--budget-s) is over

    @property
    def multi(self) -> bool:
        return len(self.loads) > 1

    def run_key(self, wl: str, load: float) -> str:
        """The run's name in the JSON and the tables: the workload, with its load when there are several."""
        return f"{wl}@{load:g}" if self.multi else wl

    def run_keys(self) -> list[str]:
        return [self.run_key(wl, load) for load in self.loads for wl in self.workloads]


def settle(args: argparse.Namespace) -> Plan:
    """Check the flags and fill in what they leave to defaults; exit with a message on a bad one."""
    loads = args.load
    if args.speedup != "auto" and len(loads) > 1:
        raise SystemExit("--speedup N fixes the rate, so --load takes one value (or use --speedup auto)")
    mix = (args.mix or ("mlp_small,mlp_large" if args.tiny else "resnet50,bert")).split(",")
    for k in mix:
        if k not in KINDS:
            raise SystemExit(f"unknown kind {k!r} (known: {', '.join(KINDS)})")
    max_rps = args.max_rps if args.max_rps is not None else (25.0 if args.tiny else 400.0)
    slo = parse_slo(args.slo_ms, mix)
    protocols = ["http", "grpc"] if args.protocol == "both" else [args.protocol]
    workloads = ["trace", "zipf"] if args.workload == "both" else [args.workload]
    for proto in list(protocols):  # before anything expensive: the aio clients need aiohttp / grpcio
        try:
            importlib.import_module(f"tritonclient.{proto}.aio")
        except ImportError as e:
            if len(protocols) == 1:
                raise SystemExit(f"tritonclient.{proto}.aio cannot be imported: {e}") from None
            print(f"WARNING: tritonclient.{proto}.aio cannot be imported ({e}); driving {proto} is skipped", flush=True)
            protocols.remove(proto)
    trace_path = find_trace(args.trace)
    if "trace" in workloads and trace_path is None:
        raise SystemExit("no trace found (--trace PATH, or use --workload zipf)")
    trace = np.load(trace_path) if trace_path else None
    return Plan(args, loads, mix, max_rps, slo, protocols, workloads, trace_path, trace, T0 + args.budget_s)


@dataclass
class Repository:
    """The models one run serves, and the device memory bounds worked out from their bytes."""

    path: Path
    owned: bool  # a temp folder made for this run: removed at the end
    names: list[str]
    kinds_of: list[str]  # each model's kind, by index
    gen: dict  # build_repository's account of the writing
    nbytes: dict[str, int]  # weight bytes per model
    by_kind: dict[str, int]  # weight bytes per kind
    total: int  # all models' footprints, in whole blocks
    bounds: dict[str, int]  # --device-memory-bytes per configuration


def prepare_repository(plan: Plan, phases: dict[str, float]) -> Repository:
    """Phase 1: write the models (or reuse a folder with the same spec) and size both bounds from them."""
    args, mix = plan.args, plan.mix
    owned = args.repo is None
    repo = args.repo or Path(tempfile.mkdtemp(prefix="torpor-e2e-")) / "models"
    models = [(f"{mix[i % len(mix)]}_{i:03d}", KINDS[mix[i % len(mix)]], 1000 + i) for i in range(args.models)]
    names = [m for m, _, _ in models]
    kinds_of = [k.name for _, k, _ in models]
    t = time.monotonic()
    gen = build_repository(repo, models, args.batching, args.gen_workers, None if args.no_server_slo else plan.slo)
    phases["repository"] = time.monotonic() - t
    nbytes = {m: safetensors_bytes(repo / m / "1" / "model.safetensors") for m in names}
    footprint = {m: math.ceil(b / BLOCK) * BLOCK for m, b in nbytes.items()}
    total = sum(footprint.values())
    largest = max(footprint.values())
    torpor_bound = math.ceil(args.fraction * total / BLOCK) * BLOCK
    if torpor_bound < largest + BLOCK:
        stamp(f"WARNING: {args.fraction} of the total ({torpor_bound} B) cannot hold the largest model; using {largest + BLOCK}")
        torpor_bound = largest + BLOCK
    native_bound = math.ceil(args.native_factor * total / BLOCK) * BLOCK
    by_kind = {k: sum(nbytes[m] for m, kk in zip(names, kinds_of, strict=True) if kk == k) for k in mix}
    stamp(f"models: {len(names)} ({', '.join(f'{kinds_of.count(k)} x {k} {by_kind[k] / max(1, kinds_of.count(k)) / 1e6:.0f} MB' for k in mix)}), "
          f"total {total / 2**30:.2f} GiB; torpor bound {torpor_bound / 2**30:.2f} GiB ({torpor_bound / total:.2f} of total, "
          f"native needs {total / torpor_bound:.1f}x), native bound {native_bound / 2**30:.2f} GiB")
    return Repository(repo, owned, names, kinds_of, gen, nbytes, by_kind, total,
                      {"native": native_bound, "torpor": torpor_bound})
