"""`torpor serve`: HTTP, gRPC and metrics on one uvloop event loop, one Engine behind them.

Flag names follow tritonserver's where they exist, so existing launch scripts work.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from torpor import __version__
from torpor.dataplane.engine import TRITON_VERSION
from torpor.logs import install as install_log
from torpor.logs import model_table, one_line, reason
from torpor.tracing import add_trace_arguments, apply_trace_arguments

log = logging.getLogger("torpor")

DEFAULT_REPOSITORY = str(Path(__file__).resolve().parent.parent / "examples" / "models")


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{value}'")


class _Parser(argparse.ArgumentParser):
    """A mistyped flag is one line, as tritonserver's, not argparse's usage block (which for
    `serve` runs to 30 lines and hides the error under it). Sub-commands inherit the class."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="torpor", description="Triton-compatible inference server for many models on few GPUs")
    p.add_argument("--version", action="version", version=f"torpor {__version__} (Triton protocol {TRITON_VERSION})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository over HTTP, gRPC and metrics",
                       description="Serve Triton-layout model repositories over HTTP, gRPC and Prometheus metrics. "
                                   "Flag names are tritonserver's where it has them.")
    _repository_flags(s)
    _listener_flags(s)
    _log_flags(s)
    _limit_flags(s)
    _device_flags(s)
    add_trace_arguments(s)
    from torpor.api.forward import add_cluster_arguments

    add_cluster_arguments(s)  # --peers: forward once to a node where the model is hot
    sim = sub.add_parser("simulate", help="compare scheduling policies in the discrete-event simulator")
    from torpor.sim.report import add_arguments

    add_arguments(sim)
    from torpor.cluster.launch import add_cluster_parser  # Ray only when `cluster` runs

    add_cluster_parser(sub)
    return p


def _repository_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model-repository", "--model-store", action="append", dest="model_repository", metavar="PATH",
                   help="Triton-layout model repository (repeatable) (default: the bundled examples/models)")
    s.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default="none",
                   help="none: load every model at start; explicit: load the --load-model names and allow the "
                        "load / unload API; poll: rescan every --repository-poll-secs (default: %(default)s)")
    s.add_argument("--load-model", action="append", default=[], metavar="NAME",
                   help="model to load at start in explicit mode, '*' for all (repeatable) (default: none)")
    s.add_argument("--repository-poll-secs", type=float, default=15.0, metavar="SECS",
                   help="poll mode: seconds between rescans (default: %(default)s)")
    _switch(s, "--strict-model-config", "false", "use config.pbtxt as written: no auto-complete, no model without "
            "one, as Triton's --disable-auto-complete-config")
    _switch(s, "--exit-on-error", "true",
            "a model that fails to load at start ends the server with exit status 1; false: serve the others")
    _switch(s, "--strict-readiness", "true",
            "/v2/health/ready only while every model is ready; false: ready once the server is up")
    _switch(s, "--allow-override-code", "false", "accept Python code (.py and other code files, python-backend "
            "models) in the file: contents of a model load request; off: whoever can load can run code")


def _listener_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--http-address", default="0.0.0.0", help="HTTP listen address (default: %(default)s)")
    s.add_argument("--http-port", type=_port, default=8000, help="HTTP port, 0: any free one (default: %(default)s)")
    s.add_argument("--grpc-address", default="0.0.0.0", help="gRPC listen address (default: %(default)s)")
    s.add_argument("--grpc-port", type=_port, default=8001, help="gRPC port (default: %(default)s)")
    s.add_argument("--metrics-address", default=None, help="metrics listen address (default: the HTTP address)")
    s.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus /metrics port (default: %(default)s)")
    _switch(s, "--reuse-grpc-port", "false", "let another process bind the gRPC port too (SO_REUSEPORT), as "
            "Triton's flag; off: a port in use is refused at start")
    for name, shown in (("http", "HTTP"), ("grpc", "gRPC"), ("metrics", "metrics")):
        _switch(s, f"--allow-{name}", "true", f"start the {shown} listener")
    s.add_argument("--id", default="triton",
                   help="server id reported in server metadata; clients check 'triton' (default: %(default)s)")
    s.add_argument("--exit-timeout-secs", type=float, default=30.0, metavar="SECS",
                   help="on SIGTERM / SIGINT: stop accepting, let in-flight requests finish up to this long "
                        "(default: %(default)s)")
    s.add_argument("--grpc-server", choices=("auto", "threads", "aio"), default="auto",
                   help="how gRPC is hosted: grpc's threaded server handing each call to the engine's loop "
                        "(cheaper where the process has one CPU) or grpc.aio on the loop (serves more with "
                        "several); auto: threads with one usable CPU, else aio (default: %(default)s)")
    _switch(s, "--pin-front-end", "false", "with grpc.aio: keep the event loop and gRPC's poller thread on "
            "one CPU (gRPC at one call in flight about 1.7x faster, 10-15%% fewer req/s at 8, measured on 2 cores)")
    s.add_argument("--grpc-threads", type=positive_int, default=128, metavar="N",
                   help="with --grpc-server threads: gRPC calls in flight at once (an open stream takes one); "
                        "more wait in gRPC's queue (default: %(default)s)")
    _switch(s, "--allow-client-shm", "false", "system and CUDA shared-memory registration")


def _log_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--log-verbose", type=_count, default=0, metavar="N",
                   help="verbose logging from level 1 (default: %(default)s)")
    _switch(s, "--log-info", "true", "log at info level: each model's load and unload, the model table")
    _switch(s, "--log-warning", "true", "log warnings")
    _switch(s, "--log-error", "true", "log errors")
    s.add_argument("--log-format", choices=("default", "ISO8601"), default="default",
                   help="tritonserver's line shapes: 'I1205 01:55:48.606695 PID file:line] \"msg\"' or "
                        "'2026-12-05T01:55:48Z I PID file:line] \"msg\"' (default: %(default)s)")
    s.add_argument("--log-file", default="", metavar="PATH",
                   help="write the log to this file instead of stderr (default: stderr)")


def _limit_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--http-max-input-size", type=_max_input_size, default=64 * 1024 * 1024, metavar="BYTES",
                   help="largest HTTP request body accepted (default: %(default)s)")
    s.add_argument("--http-restricted-api", action="append", default=[], metavar="GROUPS:KEY=VALUE",
                   help="restrict API groups (health, metadata, inference, shared-memory, model-config, "
                        "model-repository, statistics, trace, logging) to HTTP callers sending header KEY: VALUE "
                        "(repeatable; a group in one spec only) (default: none)")
    s.add_argument("--grpc-restricted-protocol", action="append", default=[], metavar="GROUPS:KEY=VALUE",
                   help="as --http-restricted-api for gRPC; the metadata key is triton-grpc-protocol-KEY "
                        "(default: none)")
    s.add_argument("--grpc-max-message-size", type=int, default=-1, metavar="BYTES",
                   help="largest gRPC message received or sent, -1: gRPC's ceiling, 2 GiB; larger ones get "
                        "RESOURCE_EXHAUSTED (default: %(default)s)")
    s.add_argument("--max-tensor-elements", type=int, default=1 << 28, metavar="N",
                   help="most elements in one input or output tensor, 0: no limit (default: %(default)s)")
    s.add_argument("--max-queue-size", type=int, default=1024, metavar="N",
                   help="requests per model version that may wait for an instance beyond those executing; more "
                        "get UNAVAILABLE 'Exceeds maximum queue size' (a config's dynamic_batching "
                        "default_queue_policy.max_queue_size wins; 0: no limit) (default: %(default)s)")


def _device_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--devices", default="auto",
                   help="devices models are late-bound to: 'cuda' (every GPU), 'cuda:0,1', 'cpu' or 'cpu:N' "
                        "(virtual devices with their own memory, for machines without a GPU), 'none' "
                        "(run models where they are loaded); 'auto': cuda when CUDA works, else none "
                        "(default: %(default)s)")
    s.add_argument("--device-memory-fraction", type=float, default=None, metavar="FRACTION",
                   help="share of each GPU's free memory Torpor reserves for model weights (default: 0.8)")
    s.add_argument("--device-memory-bytes", default=None, metavar="SIZE",
                   help="arena size per device instead, e.g. 40GiB (default: 2GiB per CPU virtual device, "
                        "GPUs by --device-memory-fraction)")
    s.add_argument("--scheduler", choices=["torpor", "lru-swap"], default="torpor",
                   help="placement policy: 'torpor' (cost model: run, queue, host swap or peer copy, whichever "
                        "meets the SLO cheapest) or 'lru-swap' (least-loaded holder, else host swap, LRU eviction) "
                        "(default: %(default)s)")
    s.add_argument("--device-bandwidths", "--topology", dest="device_bandwidths", default=None, metavar="SPEC",
                   help="links the scheduler plans with instead of measuring them: a topology JSON file, inline "
                        "JSON, or 'pcie=GBps[,nvlink=GBps]'; on CPU virtual devices copies are paced to these rates "
                        "(default: measured)")
    s.add_argument("--profile-runs", type=int, default=2, metavar="N",
                   help="timed runs of each device-bound model at load, after one warm-up run, on zero inputs: "
                        "the scheduler's first execution estimate, 0: measure on real requests only "
                        "(default: %(default)s)")
    s.add_argument("--default-slo-ms", type=_positive, default=None, metavar="MS",
                   help="latency objective of models whose config has no torpor.slo_ms parameter (default: none)")
    _switch(s, "--shed-late", "true",
            "under overload, answer UNAVAILABLE ('Exceeds maximum queue size') at once to a request the scheduler "
            "predicts will finish past its latency objective, and to one already past it when its turn on the "
            "device comes; false: serve them late. Only requests with an objective (torpor.slo_ms, "
            "--default-slo-ms or a timeout) are ever shed")
    s.add_argument("--stage-lookahead", type=int, default=1, metavar="N",
                   help="requests per device that may hold device memory (and start their copy) while the ones "
                        "ahead of them run, beyond one per execution slot; the rest wait holding nothing "
                        "(default: %(default)s)")


def _switch(s: argparse.ArgumentParser, flag: str, default: str, text: str) -> None:
    """A tritonserver-style boolean flag (`--flag true|false`). The default is given as text so
    that argparse converts it like a command-line value and help shows 'true', not 'True'."""
    s.add_argument(flag, type=_bool, default=default, metavar="BOOL", help=f"{text} (default: %(default)s)")


def _positive(text: str, cast: type = float):
    """argparse type: a number above zero (`cast`: float, or int for counts)."""
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'an integer' if cast is int else 'a number'}, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def positive_int(text: str) -> int:
    return _positive(text, int)


def _integer(text: str, what: str = "an integer") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _count(text: str) -> int:
    """argparse type: an integer of zero or more (Triton's unsigned flags)."""
    v = _integer(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def _port(text: str) -> int:
    v = _integer(text, "a port number")
    if not 0 <= v <= 65535:  # 0: any free port
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {v}")
    return v


def _max_input_size(text: str) -> int:
    """Refused at parse time, before any model loads, in tritonserver's words."""
    v = _integer(text)
    if v <= 0:
        raise argparse.ArgumentTypeError("--http-max-input-size must be greater than 0.")
    return v


def _resolve_devices(text: str) -> str:
    if text.strip().lower() != "auto":
        return text
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else ""
    except ImportError:
        return ""


def engine_options(args: argparse.Namespace):
    from torpor.dataplane.engine import EngineOptions

    return EngineOptions(
        model_repositories=args.model_repository or [DEFAULT_REPOSITORY],
        model_control_mode=args.model_control_mode,
        load_models=args.load_model,
        repository_poll_secs=args.repository_poll_secs,
        strict_readiness=args.strict_readiness,
        strict_model_config=args.strict_model_config,
        server_id=args.id,
        allow_client_shm=args.allow_client_shm,
        allow_override_code=args.allow_override_code,
        max_queue_size=args.max_queue_size,
        max_tensor_elements=args.max_tensor_elements,
        devices=_resolve_devices(args.devices),
        device_memory_fraction=args.device_memory_fraction,
        device_memory_bytes=args.device_memory_bytes,
        scheduler=args.scheduler,
        device_bandwidths=args.device_bandwidths,
        default_slo_ms=args.default_slo_ms,
        profile_runs=args.profile_runs,
        shed_late=args.shed_late,
        stage_lookahead=args.stage_lookahead,
    )


async def start_front_ends(engine, args: argparse.Namespace, servers: list, tasks: list) -> None:
    """Start the listeners the flags ask for, appending each to `servers` ((name, async stop(grace)))
    as it starts and its task, if any, to `tasks` (they end if the listener fails), so that the
    caller can stop the ones already started when a later one cannot start."""
    if args.allow_http:
        from torpor.api.http import start_http_server

        task, stop_http = await start_http_server(engine, args.http_address, args.http_port, args.http_max_input_size,
                                                  args.http_restricted, args.exit_timeout_secs)
        tasks.append(task)
        servers.append(("HTTP", stop_http))
    if args.allow_grpc:
        from torpor.api.grpc import pick_host, pin_front_end, start_grpc_server

        grpc_server = await start_grpc_server(engine, args.grpc_address, args.grpc_port, args.grpc_restricted,
                                              args.grpc_max_message_size, args.grpc_server, args.grpc_threads,
                                              args.reuse_grpc_port)

        if args.pin_front_end:
            log.info("--pin-front-end: %s", pin_front_end() if pick_host(args.grpc_server) == "aio"
                     else "the threaded gRPC host: nothing pinned")

        async def stop_grpc(grace: float) -> None:
            await grpc_server.stop(grace)

        servers.append(("gRPC", stop_grpc))
    if args.allow_metrics:
        from torpor.adapters.python_backend import custom_metric_families
        from torpor.api.metrics import MetricsServer

        metrics = MetricsServer(engine)
        metrics.collector.add_source(custom_metric_families)  # python models' pb_utils.MetricFamily
        address = args.metrics_address or args.http_address
        try:
            await metrics.start(address, args.metrics_port)
        except OSError as e:  # asyncio's text repeats the address and the errno's text twice
            why = os.strerror(e.errno) if e.errno else reason(e)
            raise RuntimeError(f"failed to bind the metrics listener to {address}:{args.metrics_port}: {why}") from None
        servers.append(("metrics", metrics.stop))


def port_in_use(args: argparse.Namespace) -> str | None:
    """Refuse a HTTP or metrics port another process holds before any model loads, so that the
    mistake costs nothing and reads as one line. A port taken between this check and the bind is
    still reported by the listener itself. (gRPC binds with or without port sharing, as
    --reuse-grpc-port says; its own bind reports it.)"""
    wanted = []
    if args.allow_http:
        wanted.append(("HTTP", args.http_address, args.http_port))
    if args.allow_metrics:
        wanted.append(("metrics", args.metrics_address or args.http_address, args.metrics_port))
    for name, address, port in wanted:
        if port == 0:
            continue
        try:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
            socket.create_server((address, port), family=family).close()  # SO_REUSEADDR, as the listeners
        except OSError as e:
            why = os.strerror(e.errno) if e.errno else reason(e)
            return f"failed to bind the {name} listener to {address}:{port}: {why}"
    return None


def _refuse(text: str) -> int:
    """The one line an operator mistake gets, on stderr whatever the log's destination; exit status 1."""
    print(f"torpor: could not start: {one_line(text)}", file=sys.stderr, flush=True)
    return 1


def open_log(engine, args: argparse.Namespace) -> str | None:
    """Route the log as the --log-* flags say; the reason when the log file cannot be opened."""
    engine.log_settings({"log_verbose_level": args.log_verbose, "log_info": args.log_info,
                         "log_warning": args.log_warning, "log_error": args.log_error, "log_format": args.log_format})
    try:
        install_log(engine.log_settings, args.log_file)
    except OSError as e:
        return f"--log-file {args.log_file}: {e.strerror or reason(e)}"
    # The logging extension may not move the file (Triton's rule), but must report where it is.
    engine.logging.values["log_file"] = args.log_file
    return None


def log_model_table(engine) -> None:
    """Triton's table of the models start-up tried to load and how each ended."""
    rows = []
    for item in engine.repository_index():
        if "state" not in item:  # explicit mode: a model nobody asked for is not in Triton's table either
            continue
        status = item["state"] + (f": {item['reason']}" if item.get("reason") else "")
        rows.append((item["name"], item.get("version", ""), status))
    log.info("%s", model_table(rows), extra={"table": True})


def start_failure(failures: dict[str, str]) -> str:
    if len(failures) == 1:
        (text,) = failures.values()
        return f"{text} (--exit-on-error false serves the other models)"
    names = ", ".join(f"'{n}'" for n in sorted(failures))
    return f"{len(failures)} models failed to load: {names}; the log says why (--exit-on-error false serves the rest)"


def freeze_start_up_heap() -> None:
    """Once the models are loaded, before serving (`torpor serve`, a cluster node): everything
    alive then (torch, the models, the apps) stays for good; frozen, the collector's full passes
    skip it. Unfrozen, a full pass walked it all on the event loop, 150-190 ms every 20 s or so
    under load on the CPU overload runs: every request in that window waited, and the staging
    queues' timers (deferral, expiry) fired that late."""
    gc.collect()
    gc.freeze()


async def serve(args: argparse.Namespace) -> int:
    from torpor.adapters import create_model_function, python_backend
    from torpor.adapters.bls import install_bls, uninstall_bls
    from torpor.dataplane.engine import Engine

    options = engine_options(args)
    python_backend.auto_complete_enabled = not args.strict_model_config  # Triton: --disable-auto-complete-config
    for repo in options.model_repositories:
        if not Path(repo).is_dir():
            # Triton refuses to start on a repository it cannot stat; serving zero models instead
            # would look healthy and answer every request "unknown model"
            why = ("the bundled examples are only in a source checkout: pass --model-repository DIR"
                   if not args.model_repository else "no such directory")
            return _refuse(f"--model-repository {repo}: {why}")
    in_use = port_in_use(args)
    if in_use:
        return _refuse(in_use)
    engine = Engine(options, create_model_function)
    apply_trace_arguments(engine, args)
    failed_log = open_log(engine, args)
    if failed_log:
        return _refuse(failed_log)
    bridge = install_bls(engine, asyncio.get_running_loop())  # pb_utils.InferenceRequest.exec() in python models
    try:
        try:
            await engine.start()
        except Exception as e:  # a start-up failure is reported in one line, not a traceback
            log.debug("start-up failed", exc_info=True)  # where it came from, for --log-verbose 1
            await engine.stop()
            return _refuse(reason(e))
        log_model_table(engine)
        if engine.registry.start_failures and args.exit_on_error:
            await engine.stop()
            return _refuse(start_failure(engine.registry.start_failures))
        freeze_start_up_heap()
        return await _serve_until_stopped(engine, args)
    finally:
        uninstall_bls(bridge)


async def _serve_until_stopped(engine, args: argparse.Namespace) -> int:
    """Start the listeners, serve until SIGTERM / SIGINT or a listener fails, then drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers: list = []
    tasks: list = []
    try:
        await start_front_ends(engine, args, servers, tasks)
    except Exception as e:  # noqa: BLE001 - a listener that cannot start: one line, exit 1
        await asyncio.gather(*(fn(0.0) for _, fn in servers), return_exceptions=True)
        await engine.stop()
        return _refuse(reason(e))
    from torpor.api.forward import start_forwarder

    forwarder = await start_forwarder(engine, args)  # None without --peers
    if not any(t.done() for t in tasks):  # a listener that already failed is reported below instead
        where = {"HTTP": f"{args.http_address}:{args.http_port}", "gRPC": f"{args.grpc_address}:{args.grpc_port}",
                 "metrics": f"{args.metrics_address or args.http_address}:{args.metrics_port}"}
        log.info("serving %s", ", ".join(f"{name} on {where[name]}" for name, _ in servers))

    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = False
    for t in tasks:
        if t in done and t.exception() is not None:
            print(f"torpor: {one_line(reason(t.exception()))}", file=sys.stderr, flush=True)
            failed = True
    # Graceful exit: refuse new work, let listeners finish in-flight requests, drain the engine.
    engine.begin_exit()
    grace = args.exit_timeout_secs
    await asyncio.gather(*(fn(grace) for _, fn in servers), return_exceptions=True)
    if tasks:
        await asyncio.wait(tasks, timeout=grace + 1)
    drained = await engine.drain(grace)
    if not drained:
        log.warning("exit timeout: %d requests still in flight", engine.in_flight())
    if forwarder is not None:
        await forwarder.stop()
    await engine.stop()
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        from torpor.api.access import GRPC_HEADER_PREFIX, parse_restrictions

        try:
            args.http_restricted = parse_restrictions(args.http_restricted_api, "--http-restricted-api")
            args.grpc_restricted = parse_restrictions(args.grpc_restricted_protocol, "--grpc-restricted-protocol",
                                                      GRPC_HEADER_PREFIX)
        except ValueError as e:
            parser.error(str(e))
    if args.command == "simulate":
        from torpor.sim.report import run_cli

        sys.exit(run_cli(args))
    if args.command == "cluster":
        from torpor.cluster.launch import run_cluster

        sys.exit(run_cluster(args))
    try:
        import uvloop

        rc = uvloop.run(serve(args))
    except ImportError:
        rc = asyncio.run(serve(args))
    sys.exit(rc)


if __name__ == "__main__":
    main()
