"""`torpor serve`: HTTP, gRPC and metrics on one uvloop event loop, one Engine behind them.

Flag names follow tritonserver's where they exist, so existing launch scripts work.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from torpor import __version__
from torpor.dataplane.engine import TRITON_VERSION

log = logging.getLogger("torpor")

DEFAULT_REPOSITORY = str(Path(__file__).resolve().parent.parent / "examples" / "models")


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got '{value}'")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torpor", description="Triton-compatible inference server for many models on few GPUs")
    p.add_argument("--version", action="version", version=f"torpor {__version__} (Triton protocol {TRITON_VERSION})")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve a model repository over HTTP, gRPC and metrics")
    s.add_argument("--model-repository", "--model-store", action="append", dest="model_repository",
                   help="model repository path (repeatable); default: the bundled examples/models")
    s.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default="none")
    s.add_argument("--load-model", action="append", default=[], help="model to load at start in explicit mode ('*' for all)")
    s.add_argument("--repository-poll-secs", type=float, default=15.0)
    s.add_argument("--strict-model-config", type=_bool, default=False)
    s.add_argument("--strict-readiness", type=_bool, default=True)
    s.add_argument("--http-address", default="0.0.0.0")
    s.add_argument("--http-port", type=_port, default=8000)
    s.add_argument("--grpc-address", default="0.0.0.0")
    s.add_argument("--grpc-port", type=_port, default=8001)
    s.add_argument("--metrics-address", default=None, help="default: the HTTP address")
    s.add_argument("--metrics-port", type=_port, default=8002)
    s.add_argument("--reuse-grpc-port", type=_bool, default=False,
                   help="let another process bind the gRPC port too (SO_REUSEPORT), as Triton's flag; "
                        "off: a port in use is refused at start")
    s.add_argument("--allow-http", type=_bool, default=True)
    s.add_argument("--allow-grpc", type=_bool, default=True)
    s.add_argument("--allow-metrics", type=_bool, default=True)
    s.add_argument("--id", default="triton", help="server id reported in server metadata (clients check 'triton')")
    s.add_argument("--log-verbose", type=int, default=0)
    s.add_argument("--exit-timeout-secs", type=float, default=30.0)
    s.add_argument("--http-max-input-size", type=_max_input_size, default=64 * 1024 * 1024,
                   help="largest HTTP request body accepted, bytes (default %(default)s)")
    s.add_argument("--allow-client-shm", type=_bool, default=False)
    s.add_argument("--http-restricted-api", action="append", default=[], metavar="GROUPS:KEY=VALUE",
                   help="restrict API groups (health, metadata, inference, shared-memory, model-config, "
                        "model-repository, statistics, trace, logging) to HTTP callers sending header KEY: VALUE "
                        "(repeatable; a group in one spec only)")
    s.add_argument("--grpc-restricted-protocol", action="append", default=[], metavar="GROUPS:KEY=VALUE",
                   help="as --http-restricted-api for gRPC; the metadata key is triton-grpc-protocol-KEY")
    s.add_argument("--grpc-max-message-size", type=int, default=-1, metavar="BYTES",
                   help="largest gRPC message received or sent (-1: gRPC's ceiling, 2 GiB); larger ones get "
                        "RESOURCE_EXHAUSTED")
    s.add_argument("--grpc-server", choices=("threads", "aio"), default="threads",
                   help="how gRPC is hosted: grpc's threaded server handing each call to the engine's loop "
                        "(cheaper per call, measured) or grpc.aio on the loop; the same service either way")
    s.add_argument("--grpc-threads", type=_positive_int, default=128, metavar="N",
                   help="with --grpc-server threads: gRPC calls in flight at once (an open stream takes one); "
                        "more wait in gRPC's queue")
    s.add_argument("--max-tensor-elements", type=int, default=1 << 28,
                   help="most elements in one input or output tensor (0: no limit)")
    s.add_argument("--max-queue-size", type=int, default=1024,
                   help="requests per model version that may wait for an instance beyond those executing; more "
                        "get UNAVAILABLE 'Exceeds maximum queue size' (a config's dynamic_batching "
                        "default_queue_policy.max_queue_size wins; 0: no limit)")
    s.add_argument("--allow-override-code", type=_bool, default=False,
                   help="accept Python code (.py and other code files, python-backend models) in the file: "
                        "contents of a model load request; off by default: whoever can load can run code")
    s.add_argument("--devices", default="auto",
                   help="devices models are late-bound to: 'cuda' (every GPU), 'cuda:0,1', 'cpu' or 'cpu:N' "
                        "(virtual devices with their own memory, for machines without a GPU), 'none' "
                        "(run models where they are loaded); 'auto' (default): cuda when CUDA works, else none")
    s.add_argument("--device-memory-fraction", type=float, default=None,
                   help="share of each GPU's free memory Torpor reserves for model weights (default 0.8)")
    s.add_argument("--device-memory-bytes", default=None,
                   help="arena size per device, e.g. 40GiB (CPU virtual devices default to 2GiB)")
    s.add_argument("--scheduler", choices=["torpor", "lru-swap"], default="torpor",
                   help="placement policy: 'torpor' (cost model: run, queue, host swap or peer copy, whichever "
                        "meets the SLO cheapest) or 'lru-swap' (least-loaded holder, else host swap, LRU eviction)")
    s.add_argument("--device-bandwidths", "--topology", dest="device_bandwidths", default=None,
                   help="links the scheduler plans with instead of measuring them: a topology JSON file, inline "
                        "JSON, or 'pcie=GBps[,nvlink=GBps]'; on CPU virtual devices copies are paced to these rates")
    s.add_argument("--profile-runs", type=int, default=2,
                   help="timed runs of each device-bound model at load, after one warm-up run, on zero inputs: "
                        "the scheduler's first execution estimate (0: measure on real requests only)")
    s.add_argument("--default-slo-ms", type=_positive, default=None,
                   help="latency objective (ms) of models whose config has no torpor.slo_ms parameter")
    s.add_argument("--shed-late", type=_bool, default=True,
                   help="under overload, answer UNAVAILABLE ('Exceeds maximum queue size') at once to a request the "
                        "scheduler predicts will finish past its latency objective, and to one already past it "
                        "when its turn on the device comes (default true); false: serve them late. Only requests "
                        "with an objective (torpor.slo_ms, --default-slo-ms or a timeout) are ever shed")
    s.add_argument("--stage-lookahead", type=int, default=1, metavar="N",
                   help="requests per device that may hold device memory (and start their copy) while the ones "
                        "ahead of them run, beyond one per execution slot; the rest wait holding nothing")
    sim = sub.add_parser("simulate", help="compare scheduling policies in the discrete-event simulator")
    from torpor.sim.report import add_arguments

    add_arguments(sim)
    return p


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


def _positive_int(text: str) -> int:
    return _positive(text, int)


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= v <= 65535:  # 0: any free port
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {v}")
    return v


def _max_input_size(text: str) -> int:
    """Refused at parse time, before any model loads, in tritonserver's words."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
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


async def start_front_ends(engine, args: argparse.Namespace) -> tuple[list, list]:
    """The listeners the flags ask for: ([(name, async stop(grace))], [tasks that end if a listener fails])."""
    servers, tasks = [], []
    if args.allow_http:
        from torpor.api.http import start_http_server

        task, stop_http = await start_http_server(engine, args.http_address, args.http_port, args.http_max_input_size,
                                                  args.http_restricted, args.exit_timeout_secs)
        tasks.append(task)
        servers.append(("http", stop_http))
    if args.allow_grpc:
        from torpor.api.grpc import start_grpc_server

        grpc_server = await start_grpc_server(engine, args.grpc_address, args.grpc_port, args.grpc_restricted,
                                              args.grpc_max_message_size, args.grpc_server, args.grpc_threads,
                                              args.reuse_grpc_port)

        async def stop_grpc(grace: float) -> None:
            await grpc_server.stop(grace)

        servers.append(("grpc", stop_grpc))
    if args.allow_metrics:
        from torpor.adapters.python_backend import custom_metric_families
        from torpor.api.metrics import MetricsServer

        metrics = MetricsServer(engine)
        metrics.collector.add_source(custom_metric_families)  # python models' pb_utils.MetricFamily
        await metrics.start(args.metrics_address or args.http_address, args.metrics_port)
        servers.append(("metrics", metrics.stop))
    return servers, tasks


async def serve(args: argparse.Namespace) -> int:
    from torpor.adapters import create_model_function, python_backend
    from torpor.adapters.bls import install_bls
    from torpor.dataplane.engine import Engine

    options = engine_options(args)
    python_backend.auto_complete_enabled = not args.strict_model_config  # Triton: --disable-auto-complete-config
    for repo in options.model_repositories:
        if not Path(repo).is_dir():
            # Triton refuses to start on a repository it cannot stat; serving zero models instead
            # would look healthy and answer every request "unknown model"
            why = ("the bundled examples are only in a source checkout: pass --model-repository DIR"
                   if not args.model_repository else "no such directory")
            print(f"torpor: could not start: --model-repository {repo}: {why}", file=sys.stderr, flush=True)
            return 1
    engine = Engine(options, create_model_function)
    install_bls(engine, asyncio.get_running_loop())  # pb_utils.InferenceRequest.exec() in python models
    engine.log_settings({"log_verbose_level": args.log_verbose})
    try:
        await engine.start()
    except Exception as e:  # noqa: BLE001 - a start-up failure is reported in one line, not a traceback
        print(f"torpor: could not start: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        await engine.stop()
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        servers, tasks = await start_front_ends(engine, args)
    except Exception as e:  # noqa: BLE001 - a listener that cannot start: one line, exit 1
        msg = getattr(e, "message", None) or f"{type(e).__name__}: {e}"
        print(f"torpor: could not start: {msg}", file=sys.stderr, flush=True)
        await engine.stop()
        return 1
    log.info("torpor serving: http %s, grpc %s, metrics %s", args.http_port, args.grpc_port, args.metrics_port)
    print(f"torpor: serving HTTP on {args.http_address}:{args.http_port}, gRPC on {args.grpc_address}:{args.grpc_port}, "
          f"metrics on {args.metrics_address or args.http_address}:{args.metrics_port}", flush=True)

    stop_wait = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
    failed = False
    for t in tasks:
        if t in done and t.exception() is not None:
            log.error("server task failed: %s", t.exception())
            print(f"torpor: {t.exception()}", file=sys.stderr, flush=True)
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
    logging.basicConfig(level=logging.INFO if args.log_verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        rc = uvloop.run(serve(args))
    except ImportError:
        rc = asyncio.run(serve(args))
    sys.exit(rc)


if __name__ == "__main__":
    main()
