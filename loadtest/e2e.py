"""End to end: many eager models through the real server, Torpor (device memory bounded to a
fraction of the models' bytes) against all-resident ("native", the bound above the total),
same open-loop workload, over HTTP and/or gRPC (issues 10 and 16).

    python loadtest/e2e.py --device cuda --models 40 --fraction 0.25 --duration 100 --json e2e.json
    python loadtest/e2e.py --tiny --models 8 --device cpu --duration 15       # CPU smoke run
    python loadtest/e2e.py --device cuda --load 0.25,0.5 --workload both ...  # several loads, one server each
    python loadtest/e2e.py --table e2e.json   # one row per load x workload from a --json file, nothing run

Phases (each printed with a timestamp, the whole run kept inside --budget-s):

1. repository: N model functions under --repo, round-robin over --mix (resnet50 = the ResNet-50
   shape, bert = BERT-base, seq 128; --tiny: mlp_small / mlp_large, torpor.adapters.networks.WideMLP),
   distinct weights per model (torpor.generate_weights seed = 1000 + index). The weights are
   written here in parallel processes, exactly as the eager adapter would write them at first
   load (same seed, same class, same file), because the server loads models one by one: about
   0.7 s (ResNet-50) and 3.0 s (BERT) per model on one core, so 40 models would take ~75 s
   inside each server start versus ~10-20 s spread over 16 processes. A folder that already
   holds the same spec (e2e_spec.json) is reused. Each model's config carries its class's objective
   (--slo-ms) as the `torpor.slo_ms` parameter, so the server can plan for it and shed what
   it cannot answer in time (--no-server-slo leaves it out); configs are rewritten every run.
2. for each configuration (native first when --speedup auto, since it calibrates the load, then
   torpor): start `python -m torpor.cli serve` on free 127.0.0.1 ports with --devices and
   --device-memory-bytes, wait for ready, warm up (one request per model, in order, then a few
   sequential requests per class: the resident service time), run each load (--load takes a
   comma list) and for each load each workload, stop with SIGTERM and require exit status 0.
3. workloads (open loop, one asyncio client, one task per arrival, at most --max-outstanding in
   flight: arrivals beyond that are dropped and counted; latency runs from the scheduled arrival
   time, so a late client shows up in the latency and as "lag", never hides load):
   - trace: the paper's production trace (README of shared/data): draw N rows (seeded), for each
     minute spread the minute's total count with exponential gaps (mean 60 s / total; rescaled
     into the minute when they overrun it) and give each arrival to a function with probability
     proportional to its count in that minute; minutes wrap after the trace's 31. Time is
     compressed by --speedup (auto: offered rate = load x the single-stream capacity measured
     at warm-up on the first configuration, capped by --max-rps, worked out for each --load).
   - zipf: the same mean rate, Zipf(--zipf-s) popularity over a seeded permutation of the
     models, arrivals from a two-state Markov-modulated Poisson process (bursts of mean 1 s at
     --burst-factor x the base rate, gaps of mean 4 s).
4. report per configuration, load, workload and class: sent, answered, failed (errors printed),
   shed, lost, dropped, p50/p99 latency, SLO attainment (--slo-ms, of all arrivals), goodput
   (answers within SLO per second of the workload's duration), swap-ins, evictions and bytes
   moved (torpor_swap_* on the metrics port, differenced around each workload), the device's
   residency, server-side compute time; one line with how many were shed and how fast (p50/p99
   of the refusal's latency), the server's shed counts by when:why (differenced around the
   workload) and its scheduler's predicted vs measured latency per action (/v2/torpor/topology;
   the JSON also keeps its execution estimates); then Torpor p50/p99/goodput over native's.
   --json writes it all;
   with several loads the runs are keyed "workload@load" (e.g. trace@0.25), else by workload.

Outcomes of an arrival: answered; shed (HTTP 503 / gRPC UNAVAILABLE whose message begins with
"Exceeds maximum queue size" or "Request timeout expired": the server's quick refusal under
overload, allowed); failed (any other error); dropped (the client already had --max-outstanding
in flight); lost (no response by --drain-s after the last arrival: cancelled, must not happen).

Exit status: 0 when every configuration ran, every server exited 0 and no request failed or was
lost (shed requests are allowed).

Code: the flags, Plan and phase 1 (Repository) are in e2e_setup.py, the model kinds and arrival
generators in e2e_workloads.py, the statistics and tables in e2e_report.py; this file holds the
server, the client and Experiment, which runs phases 2-4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest.e2e_report import (
    DROPPED,
    FAILED,
    LOST,
    OK,
    SHED,
    RunLog,
    _residency_summary,
    print_predictions,
    print_ratios,
    print_summary,
    print_table,
    summarize,
    torpor_over_native,
)
from loadtest.e2e_setup import Plan, Repository, parse_loads, prepare_repository, settle, versions
from loadtest.e2e_workloads import (
    KINDS,
    T0,
    Kind,
    base_trace_rate,
    request_arrays,
    stamp,
    trace_arrivals,
    zipf_arrivals,
)

# ------------------------------------------------------------------------------------------------
# server
# ------------------------------------------------------------------------------------------------


def free_ports(k: int) -> list[int]:
    socks, ports = [], []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def since(after: Any, before: Any) -> Any:
    """Counters over a run: `after` less `before`, key by key through nested dicts (a key
    missing before counts from 0)."""
    if isinstance(after, dict):
        before = before if isinstance(before, dict) else {}
        return {k: since(v, before.get(k)) for k, v in after.items()}
    return round(after - (before or 0), 6)


def since_by_model(names: list[str], after: dict, before: dict, empty: Any = 0) -> dict:
    """`since` for each of `names` (`empty` where the server had nothing for a model)."""
    return {n: since(after.get(n, empty), before.get(n)) for n in names}


class Server:
    def __init__(self, repo: Path, device: str, bound: int, log_path: Path, extra: list[str]):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        self.cmd = [sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(repo),
                    "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
                    "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
                    "--devices", device, "--device-memory-bytes", str(bound), *extra]
        self.log = open(log_path, "wb")  # noqa: SIM115 - the server writes it until stop() closes it
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=str(ROOT), env=env)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready:\n{self.tail()}")
            try:
                http_get(self.base + "/v2/health/ready", 2.0)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, n: int = 30) -> str:
        if not self.log.closed:  # a server stopped already has closed its log
            self.log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    # server-side numbers ------------------------------------------------------------------------
    def swap_metrics(self) -> dict[str, dict[str, float]]:
        """torpor_swap_* per model from the metrics port: {model: {metric: value}}."""
        text = http_get(f"http://127.0.0.1:{self.metrics}/metrics").decode()
        out: dict[str, dict[str, float]] = {}
        for m in re.finditer(r'^(torpor_swap_\w+)\{model="([^"]*)",version="[^"]*"\} (\S+)$', text, re.MULTILINE):
            out.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
        return out

    def residency(self) -> dict:
        return json.loads(http_get(self.base + "/v2/torpor/residency"))

    def scheduler(self) -> dict:
        """From /v2/torpor/topology: the scheduler's predicted vs measured latency per action (its
        last 4096 requests each), its execution estimates and calibrations, its lags, each
        device's busy seconds, and shed counts by when:why per model (counters since start:
        difference two of these around a run)."""
        topo = json.loads(http_get(self.base + "/v2/torpor/topology"))
        models = {name.split(":")[0]: m for name, m in (topo.get("models") or {}).items()}
        return {"predictions": topo.get("predictions", {}), "exec_estimates_ms": topo.get("exec_estimates_ms", {}),
                "shed_reasons_by_model": {n: dict(m.get("shed_reasons") or {}) for n, m in models.items()},
                "probes_by_model": {n: m.get("probes", 0) for n, m in models.items()},
                "run_account_by_model": {n: m.get("run_account") or {} for n, m in models.items()},
                # answered within / past the objective as the server measures (arrival to done, no HTTP)
                "slo_by_model": {n: {"met": m.get("slo_met", 0), "missed": m.get("slo_missed", 0)}
                                 for n, m in models.items()},
                "lags_ms": topo.get("lags_ms", {}), "busy_s": topo.get("busy_s", {}),
                "run_account": topo.get("run_account", {}), "calibration": topo.get("calibration", {})}

    def model_stats(self) -> dict[str, dict]:
        data = json.loads(http_get(self.base + "/v2/models/stats"))
        return {s["name"]: s.get("inference_stats", {}) for s in data.get("model_stats", [])}


# ------------------------------------------------------------------------------------------------
# client
# ------------------------------------------------------------------------------------------------


class Client:
    """One aio client per protocol, inputs built once per (kind, protocol) and reused."""

    def __init__(self, server: Server, protocols: list[str], kinds: dict[str, Kind], outstanding: int, seed: int):
        self.protocols = protocols
        self.kinds = kinds
        self.clients = {}
        self.inputs: dict[tuple[str, str], tuple[list, list]] = {}
        rng = np.random.default_rng(seed)
        arrays = {k: request_arrays(kind, rng) for k, kind in kinds.items()}
        for proto in protocols:
            if proto == "http":
                import tritonclient.http as mod
                from tritonclient.http import aio

                self.clients[proto] = aio.InferenceServerClient(f"127.0.0.1:{server.http}", conn_limit=outstanding,
                                                                conn_timeout=120.0)
            else:
                import tritonclient.grpc as mod
                from tritonclient.grpc import aio

                self.clients[proto] = aio.InferenceServerClient(f"127.0.0.1:{server.grpc}")
            for k, kind in kinds.items():
                ins = []
                for name, x in arrays[k].items():
                    dt = "FP32" if x.dtype == np.float32 else "INT64"
                    i = mod.InferInput(name, list(x.shape), dt)
                    if proto == "http":
                        i.set_data_from_numpy(x, binary_data=True)
                    else:
                        i.set_data_from_numpy(x)
                    ins.append(i)
                outs = [mod.InferRequestedOutput(o, binary_data=True) if proto == "http" else mod.InferRequestedOutput(o)
                        for o in kind.request_outputs]
                self.inputs[(k, proto)] = (ins, outs)

    async def infer(self, proto: str, model: str, kind: str):
        ins, outs = self.inputs[(kind, proto)]
        if proto == "grpc":
            return await self.clients[proto].infer(model, ins, outputs=outs, client_timeout=120.0)
        return await self.clients[proto].infer(model, ins, outputs=outs)

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()


# A quick refusal under overload, in Triton's words: the server's queue is full, or the request's
# own `timeout` ran out while it waited. Anything else that is not an answer is a failure.
SHED_STATUSES = ("503", "StatusCode.UNAVAILABLE")  # HTTP; gRPC as tritonclient spells it
SHED_PREFIXES = ("Exceeds maximum queue size", "Request timeout expired")


def is_shed(exc: BaseException) -> bool:
    """HTTP 503 / gRPC UNAVAILABLE with one of Triton's shedding messages (tritonclient's
    InferenceServerException carries both, the HTTP status as "503", gRPC's as "StatusCode.UNAVAILABLE")."""
    status, message = getattr(exc, "status", None), getattr(exc, "message", None)
    if not callable(status) or not callable(message):
        return False
    return str(status()) in SHED_STATUSES and str(message() or "").lstrip().startswith(SHED_PREFIXES)



async def drive(client: Client, names: list[str], kinds_of: list[str], times: np.ndarray, funcs: np.ndarray,
                max_outstanding: int, drain_s: float) -> RunLog:
    n = times.size
    protos = client.protocols
    log = RunLog(times, funcs, np.arange(n) % len(protos), np.full(n, np.nan), np.full(n, np.nan),
                 np.full(n, LOST, dtype=np.int8))
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()
    outstanding = 0

    async def one(i: int, t_sched: float) -> None:
        nonlocal outstanding
        try:
            await client.infer(protos[log.proto[i]], names[funcs[i]], kinds_of[funcs[i]])
            log.latency[i] = (loop.time() - t_sched) * 1e3
            log.status[i] = OK
        except Exception as e:  # noqa: BLE001 - every refusal and failure is counted, failures shown
            log.latency[i] = (loop.time() - t_sched) * 1e3
            what = f"{names[funcs[i]]} via {protos[log.proto[i]]}: {type(e).__name__}: {e}"[:400]
            if is_shed(e):
                log.status[i] = SHED
                if len(log.shed_examples) < 3:
                    log.shed_examples.append(what)
            else:
                log.status[i] = FAILED
                if len(log.errors) < 20:
                    log.errors.append(what)
        finally:
            outstanding -= 1  # a cancelled request (CancelledError) keeps its status LOST

    start = loop.time() + 0.05
    for i in range(n):
        t_sched = start + float(times[i])
        delay = t_sched - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        log.lag[i] = max(0.0, (loop.time() - t_sched) * 1e3)
        if outstanding >= max_outstanding:
            log.status[i] = DROPPED
            continue
        outstanding += 1
        task = asyncio.create_task(one(i, t_sched))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(list(tasks), timeout=drain_s)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            log.errors.append(f"{len(pending)} requests still outstanding {drain_s:.0f}s after the last arrival: "
                              "cancelled, counted as lost")
    return log


async def warmup(client: Client, names: list[str], kinds_of: list[str], reps: int) -> dict[str, float]:
    """One request per model in order (native: everything resident afterwards), then `reps`
    sequential requests to one model per class: its resident, single-stream latency (ms)."""
    proto = client.protocols[0]
    for name, kind in zip(names, kinds_of, strict=True):
        await client.infer(proto, name, kind)
    for p in client.protocols[1:]:
        await client.infer(p, names[-1], kinds_of[-1])
    single = {}
    for kind in dict.fromkeys(kinds_of):
        name = names[len(kinds_of) - 1 - kinds_of[::-1].index(kind)]  # the last one, resident in both configs
        for _ in range(3):
            await client.infer(proto, name, kind)
        xs = []
        for _ in range(reps):
            t = time.perf_counter()
            await client.infer(proto, name, kind)
            xs.append((time.perf_counter() - t) * 1e3)
        single[kind] = float(np.median(xs))
    return single


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line; its description is the module docstring's first paragraph."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=None, help="model repository folder (default: a fresh temp dir)")
    ap.add_argument("--models", type=int, default=40)
    ap.add_argument("--mix", default=None, help="model kinds, round-robin (default resnet50,bert; --tiny: mlp_small,mlp_large)")
    ap.add_argument("--tiny", action="store_true", help="small WideMLP models and CPU-friendly defaults (smoke runs)")
    ap.add_argument("--batching", action="store_true", help="dynamic_batching in every model config")
    ap.add_argument("--device", default="cuda", help="--devices for the server: cuda, cuda:0, cpu, cpu:N")
    ap.add_argument("--fraction", type=float, default=0.25, help="Torpor's device memory bound / total model bytes")
    ap.add_argument("--native-factor", type=float, default=1.25, help="the all-resident bound / total model bytes")
    ap.add_argument("--configs", default="auto", help="'native,torpor' order (auto: native first, it calibrates)")
    ap.add_argument("--workload", default="trace", choices=["trace", "zipf", "both"])
    ap.add_argument("--protocol", default="http", choices=["http", "grpc", "both"],
                    help="both: arrivals alternate between HTTP and gRPC")
    ap.add_argument("--duration", type=float, default=100.0, help="seconds of load per configuration and workload")
    ap.add_argument("--trace", default=None, help="trace .npy (default ../shared/data/ or .gpu/data/ beside the repo)")
    ap.add_argument("--speedup", default="auto", help="trace seconds per wall second, or auto (see --load)")
    ap.add_argument("--load", type=parse_loads, default=[0.5],
                    help="auto speedup: offered req/s = LOAD / mean single-stream service time (resident, measured); "
                         "a comma list (0.25,0.5) runs every workload at each load on one server start per config")
    ap.add_argument("--max-rps", type=float, default=None, help="cap on the auto rate (default 400; --tiny 25)")
    ap.add_argument("--zipf-s", type=float, default=1.0)
    ap.add_argument("--burst-factor", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ms", default="", help="per class, e.g. resnet50=80,bert=200 (those are the defaults)")
    ap.add_argument("--no-server-slo", action="store_true",
                    help="leave torpor.slo_ms out of the model configs: the server then has no objective to plan "
                         "or shed by (as in the runs before issue 16); the report still counts --slo-ms")
    ap.add_argument("--max-outstanding", type=int, default=256)
    ap.add_argument("--drain-s", type=float, default=30.0)
    ap.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run, all phases; durations shrink to fit")
    ap.add_argument("--server-arg", action="append", default=[], help="extra argument for torpor serve (repeatable)")
    ap.add_argument("--logs", type=Path, default=None, help="folder for server logs (default: beside --json, else temp)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, metavar="FILE.json",
                    help="print one row per load x workload, native beside Torpor, from a --json file; run nothing")
    return ap


class Calibration:
    """The offered rate of each load, worked out once and then the same for every configuration:
    --speedup auto offers LOAD x the single-stream capacity measured at the first configuration's
    warm-up (capped by --max-rps); --speedup N fixes the trace's compression instead."""

    def __init__(self, plan: Plan, n_functions: int):
        self.plan = plan
        self.n_functions = n_functions
        self.fixed_speedup = None if plan.args.speedup == "auto" else float(plan.args.speedup)
        self.base_rate = (base_trace_rate(plan.trace, n_functions, plan.args.seed) if plan.trace is not None
                          else 9.8 * n_functions / 60.0)
        self.mean_s: float | None = None  # mean resident single-stream service time, measured on the first config
        self.by_load: dict[float, dict] = {}  # per load: speedup and offered rate

    def measured(self, single: dict[str, float], kinds_of: list[str]) -> None:
        """Take the mean service time from the first configuration's warm-up (ms per kind), weighted by
        how many models each kind has; later configurations keep it."""
        if self.mean_s is None:
            share = {k: kinds_of.count(k) / len(kinds_of) for k in self.plan.mix}
            self.mean_s = sum(share[k] * single[k] for k in self.plan.mix) / 1e3

    def __call__(self, load: float) -> dict:
        """Speedup and offered rate of one load, from the first configuration's single-stream capacity."""
        if load not in self.by_load:
            mean_s, base_rate = self.mean_s, self.base_rate
            if self.fixed_speedup is None:
                rate = min(self.plan.max_rps, load / mean_s)
                speedup = rate / base_rate
            else:
                speedup = self.fixed_speedup
                rate = base_rate * speedup
            capped = self.fixed_speedup is None and rate < load / mean_s
            stamp(f"load{f' {load:g}' if self.plan.multi else ''}: trace base rate {base_rate:.2f} req/s for {self.n_functions} "
                  f"functions; speedup {speedup:.2f} ({60 / speedup:.1f}s of wall per trace minute) -> offered "
                  f"{rate:.1f} req/s (single-stream capacity {1 / mean_s:.0f} req/s, {rate * mean_s:.2f} of it"
                  + (f"; capped by --max-rps {self.plan.max_rps:g})" if capped else ")"))
            self.by_load[load] = {"speedup": speedup, "offered_rps": rate, "base_rps": base_rate,
                                  "single_stream_capacity_rps": 1 / mean_s, "load": rate * mean_s}
        return self.by_load[load]


class Experiment:
    """Phases 2-4 over one repository: each configuration's server in turn, its loads and workloads
    fitted into what is left of the budget, and the results they add up to (the --json document)."""

    def __init__(self, plan: Plan, repo: Repository, phases: dict[str, float]):
        args = plan.args
        self.plan, self.repo, self.phases = plan, repo, phases
        self.configs = ["native", "torpor"] if args.configs == "auto" else args.configs.split(",")
        self.runs_per_cfg = len(plan.loads) * len(plan.workloads)
        self.n_runs_total = len(self.configs) * self.runs_per_cfg
        self.runs_done = 0
        self.server_start_s = self.estimate()  # a first guess, replaced by the measured start
        self.logs_dir = args.logs or (args.json.parent if args.json else Path(tempfile.mkdtemp(prefix="torpor-e2e-logs-")))
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.calibrate = Calibration(plan, len(repo.names))
        self.results: dict = {"runs": {}, "phases": phases}
        self.ok = True
        self.skipped: list[str] = []

    def estimate(self) -> float:
        """Print how long the whole run should take; return the guess for one server start."""
        plan, args, configs = self.plan, self.plan.args, self.configs
        # Up-front estimate (measured on CPU: server start ~3 s + ~2.5 s per GiB of weights loaded and
        # copied into the host store; warm-up one request per model; ~3 s per run to set up and drain)
        est_start = 3.0 + 2.5 * sum(self.repo.nbytes.values()) / 2**30 + (5.0 if args.device.startswith("cuda") else 0.0)
        est_runs = len(configs) * self.runs_per_cfg * (args.duration + 3)
        est = (time.monotonic() - T0) + len(configs) * (est_start + 5 + 2) + est_runs
        stamp(f"estimate: server start ~{est_start:.0f}s each, {len(configs)} x "
              + (f"{len(plan.loads)} loads x " if plan.multi else "") + f"{len(plan.workloads)} runs of "
              f"{args.duration:.0f}s (+~3s each) -> ~{est:.0f}s in all (budget {args.budget_s:.0f}s"
              + ("; durations will be shortened to fit)" if est > args.budget_s else ")"))
        return est_start

    def run(self) -> None:
        """Every configuration in order, skipping those the budget no longer has room for."""
        for ci, cfg in enumerate(self.configs):
            remaining_cfgs = len(self.configs) - ci
            # budget: this and later servers' start/stop, then the load runs share what is left
            left = self.plan.deadline - time.monotonic()
            if left < remaining_cfgs * (self.server_start_s + 5 + 8 * self.runs_per_cfg):
                stamp(f"{cfg}: SKIPPED, {left:.0f}s left of the budget is not enough for a server start and a run")
                self.results["runs"][cfg] = {"skipped": "budget"}
                self.skipped.append(cfg)
                continue
            self.serve(ci, cfg)

    def serve(self, ci: int, cfg: str) -> None:
        """One configuration: start its server, run its loads and workloads, stop it and require exit
        status 0. A failure is recorded and the next configuration still runs."""
        args, bound = self.plan.args, self.repo.bounds[cfg]
        t = time.monotonic()
        stamp(f"{cfg}: starting server (--devices {args.device} --device-memory-bytes {bound})")
        server = Server(self.repo.path, args.device, bound, self.logs_dir / f"server-{cfg}.log", args.server_arg)
        cfg_result: dict = {"bound_bytes": bound, "workloads": {}}
        self.results["runs"][cfg] = cfg_result
        try:
            server.wait_ready(min(args.ready_timeout, max(10.0, self.plan.deadline - time.monotonic() - 30)))
            self.server_start_s = time.monotonic() - t
            self.phases[f"{cfg}/server_start"] = self.server_start_s
            stamp(f"{cfg}: ready in {self.server_start_s:.1f}s (http {server.http}, grpc {server.grpc}, metrics {server.metrics})")
            asyncio.run(self.run_config(server, cfg, ci, cfg_result))
        except Exception as e:  # noqa: BLE001 - report, stop the server, go on with the next config
            self.ok = False
            cfg_result["error"] = f"{type(e).__name__}: {e}"
            stamp(f"{cfg}: FAILED: {type(e).__name__}: {e}")
        finally:
            ts = time.monotonic()
            rc = server.stop()
            self.phases[f"{cfg}/server_stop"] = time.monotonic() - ts
            cfg_result["server_exit"] = rc
            stamp(f"{cfg}: server stopped, exit {rc} ({self.phases[f'{cfg}/server_stop']:.1f}s); log {server.log_path}")
            if rc != 0:
                self.ok = False
                print(server.tail())

    async def run_config(self, server: Server, cfg: str, ci: int, cfg_result: dict) -> None:
        """Warm up one started server, then run every load and workload against it."""
        plan, args, names, kinds_of = self.plan, self.plan.args, self.repo.names, self.repo.kinds_of
        client = Client(server, plan.protocols, {k: KINDS[k] for k in plan.mix}, args.max_outstanding, args.seed)
        try:
            tw = time.monotonic()
            single = await warmup(client, names, kinds_of, 10 if args.tiny else 20)
            self.phases[f"{cfg}/warmup"] = time.monotonic() - tw
            cfg_result["single_stream_ms"] = single
            cfg_result["residency_after_warmup"] = _residency_summary(server.residency())
            stamp(f"{cfg}: warm-up {self.phases[f'{cfg}/warmup']:.1f}s; single-stream resident latency "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in single.items())
                  + f"; resident {cfg_result['residency_after_warmup']['resident_models']} models")
            self.calibrate.measured(single, kinds_of)
            for load in plan.loads:
                cal = self.calibrate(load)
                for wl in plan.workloads:
                    dur = self.fit_duration(cfg, ci, cfg_result, wl, load)
                    if dur is not None:
                        await self.run_workload(client, server, cfg, cfg_result, wl, load, cal, dur)
                    self.runs_done += 1
        finally:
            await client.close()

    def fit_duration(self, cfg: str, ci: int, cfg_result: dict, wl: str, load: float) -> float | None:
        """--duration, or less to fit what is left of the budget; None, with the run recorded as
        skipped, when too little is left for it."""
        args, key = self.plan.args, self.plan.run_key(wl, load)
        left = self.plan.deadline - time.monotonic()
        runs_left = self.n_runs_total - self.runs_done
        later_cfgs = len(self.configs) - ci - 1
        # later servers' start, warm-up and stop; this one's stop; ~3 s per run to set up and drain
        avail = left - later_cfgs * (self.server_start_s + 5) - 5 - runs_left * 3
        dur = min(args.duration, avail / runs_left)
        if dur < min(5.0, args.duration):
            stamp(f"{cfg}/{key}: SKIPPED, budget left {left:.0f}s")
            cfg_result["workloads"][key] = {"skipped": "budget", "workload": wl, "load": load}
            self.skipped.append(f"{cfg}/{key}")
            return None
        if dur < args.duration:
            stamp(f"{cfg}/{key}: duration shortened to {dur:.0f}s to fit the budget")
        return dur

    async def run_workload(self, client: Client, server: Server, cfg: str, cfg_result: dict, wl: str, load: float,
                           cal: dict, dur: float) -> None:
        """One workload at one load for `dur` seconds: its arrivals driven, the server's counters
        differenced around them, its table printed and its record kept under the run key."""
        plan, args, names, kinds_of = self.plan, self.plan.args, self.repo.names, self.repo.kinds_of
        key = plan.run_key(wl, load)
        if wl == "trace":
            times, funcs, _ = trace_arrivals(plan.trace, len(names), cal["speedup"], dur, args.seed)
        else:
            times, funcs = zipf_arrivals(len(names), cal["offered_rps"], dur, args.seed, args.zipf_s, args.burst_factor)
        sb, stb, schb = server.swap_metrics(), server.model_stats(), server.scheduler()
        stamp(f"{cfg}/{key}: {times.size} arrivals over {dur:.0f}s ({times.size / dur:.1f} req/s offered)")
        tl = time.monotonic()
        log = await drive(client, names, kinds_of, times, funcs, args.max_outstanding,
                          min(args.drain_s, max(5.0, plan.deadline - time.monotonic() - 20)))
        self.phases[f"{cfg}/{key}"] = time.monotonic() - tl
        sa, sta = server.swap_metrics(), server.model_stats()
        rows = summarize(log, kinds_of, names, plan.slo, plan.protocols, sb, sa, stb, sta, dur)
        res = server.residency()
        scha = server.scheduler()
        predictions = scha["predictions"]
        # sheds during this run by when:why, per model class (for sim_vs_server.py) and in all
        by_class: dict[str, dict[str, int]] = {}
        reasons: dict[str, int] = {}
        kind = dict(zip(names, kinds_of, strict=True))
        for name, after in scha["shed_reasons_by_model"].items():
            before = schb["shed_reasons_by_model"].get(name, {})
            cls = by_class.setdefault(kind.get(name, name), {})
            for k, n in after.items():
                if n - before.get(k, 0):
                    cls[k] = cls.get(k, 0) + n - before.get(k, 0)
                    reasons[k] = reasons.get(k, 0) + n - before.get(k, 0)
        cfg_result["workloads"][key] = {
            "workload": wl, "load": load, "duration_s": dur, "arrivals": int(times.size),
            "classes": rows, "errors": log.errors, "shed_examples": log.shed_examples,
            "residency_after": _residency_summary(res), "predictions": predictions,
            # during this run, for sim_vs_server.py: per device, where its worker's time in runs went
            # (the placer's account); per model, the same, its answers within / past the objective as
            # the server measured them, its probes and how often the server copied it in
            "run_account": {d: {**acc, "busy_s": since(scha["busy_s"].get(d, 0.0), schb["busy_s"].get(d))}
                            for d, acc in since(scha["run_account"], schb["run_account"]).items()},
            "run_account_by_model": since_by_model(names, scha["run_account_by_model"], schb["run_account_by_model"], {}),
            "server_slo_by_model": since_by_model(names, scha["slo_by_model"], schb["slo_by_model"], {}),
            "probes_by_model": since_by_model(names, scha["probes_by_model"], schb["probes_by_model"]),
            "swap_ins_by_model": since_by_model(names, {n: m.get("torpor_swap_ins", 0.0) for n, m in sa.items()},
                                                {n: m.get("torpor_swap_ins", 0.0) for n, m in sb.items()}),
            "shed_reasons": reasons, "shed_reasons_by_class": by_class, "lags_ms": scha["lags_ms"],
            # the share of the run each device's worker spent running work (copy waits inside runs included)
            "device_busy": {d: round((s - schb["busy_s"].get(d, 0.0)) / max(self.phases[f"{cfg}/{key}"], 1e-9), 4)
                            for d, s in scha["busy_s"].items()},
            "exec_estimates_ms": scha["exec_estimates_ms"], "calibration": scha["calibration"]}
        print_table(f"{cfg} / {wl}" + (f" @ load {load:g}" if plan.multi else "")
                    + f" ({args.device}, bound {self.repo.bounds[cfg] / 2**30:.2f} GiB, "
                    f"{'+'.join(plan.protocols)}, {dur:.0f}s)", rows)
        if reasons:
            print("shed by when:why (server side): " + ", ".join(f"{k} {n}" for k, n in sorted(reasons.items())))
        if scha["lags_ms"]:
            print("server lags (ms, p50 / p99 of the last 4096): " + ", ".join(
                f"{k} {v['p50_ms']:.2f} / {v['p99_ms']:.2f}" for k, v in scha["lags_ms"].items())
                + "; device busy " + ", ".join(f"{d} {b:.1%}" for d, b in cfg_result["workloads"][key]["device_busy"].items()))
        print_predictions(predictions)
        for e in log.errors:
            print(f"  error: {e}")

    def report(self, info: dict, argv: list[str] | None) -> int:
        """Phase 4's end: Torpor over native, the totals, the --json document, the temp repository
        removed; returns the exit status."""
        plan, repo, args, results = self.plan, self.repo, self.plan.args, self.results
        ratios = torpor_over_native(results["runs"], plan.run_keys())
        results["ratios"] = ratios
        if ratios:
            print_ratios(ratios, repo.bounds["torpor"], repo.total)

        def total_of(what: str) -> int:
            return sum(r.get("classes", {}).get("all", {}).get(what, 0)
                       for c in results["runs"].values() for r in c.get("workloads", {}).values())

        failed, lost, shed = total_of("failed"), total_of("lost"), total_of("shed")
        if failed or lost or self.skipped:
            self.ok = False
        self.phases["total"] = time.monotonic() - T0
        print("\nphases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in self.phases.items()))
        calib = self.calibrate.by_load
        if not plan.multi and plan.loads[0] in calib:
            results["load"] = calib[plan.loads[0]]
        results.update({
            "ok": self.ok, "failed_requests": failed, "lost_requests": lost, "shed_requests": shed,
            "dropped_requests": total_of("dropped"), "skipped": self.skipped, "versions": info, "device": args.device,
            "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else "e2e.main(" + " ".join(argv) + ")",
            "models": {"count": len(repo.names), "mix": plan.mix, "bytes_by_kind": repo.by_kind,
                       "total_block_bytes": repo.total, "tiny": args.tiny, "batching": args.batching},
            "repository": {"path": str(repo.path), **repo.gen}, "bounds": repo.bounds, "fraction": args.fraction,
            "workloads": plan.workloads, "protocols": plan.protocols, "slo_ms": plan.slo,
            "slo_in_config": not args.no_server_slo, "seed": args.seed,
            "trace": str(plan.trace_path) if plan.trace_path else None,
            "loads": [{"requested": x, **calib[x]} for x in plan.loads if x in calib],
        })
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
            stamp(f"wrote {args.json}")
        if repo.owned:
            shutil.rmtree(repo.path.parent, ignore_errors=True)
        stamp(f"done: {'OK' if self.ok else 'FAILED'}, {failed} failed, {lost} lost, {shed} shed requests")
        return 0 if self.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print_summary(json.loads(args.table.read_text()))
        return 0
    plan = settle(args)
    info = versions()
    stamp(f"start: python {info.get('python')}, torch {info.get('torch')}, gpu {info.get('gpu')}, "
          f"{info.get('cpus')} CPUs; budget {args.budget_s:.0f}s")
    phases: dict[str, float] = {}  # seconds each phase took, in the order they ran (the JSON's "phases")
    repo = prepare_repository(plan, phases)
    experiment = Experiment(plan, repo, phases)
    experiment.run()
    return experiment.report(info, argv)


if __name__ == "__main__":
    sys.exit(main())
