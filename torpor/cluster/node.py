"""One Torpor node hosted in a process that is not its own (a Ray Serve replica).

`torpor serve` owns its process: its main thread, its signals, its event loop. A replica's
process is Ray's, so the node gets an event loop of its own, on a thread, and runs there exactly
what `torpor serve` runs (the same flags, the same Engine, the same HTTP, gRPC and metrics
listeners on the host's ports): requests that reach those listeners never touch Ray, and the
loop is not shared with the replica's, where Ray's health checks and stats calls land. The
host's other side (Ray) talks to the node through the few methods here, each hopping onto the
node's loop: readiness, the residency report, inference."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import io
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from torpor.datatypes import triton_datatype
from torpor.logs import one_line, reason
from torpor.tensors import InferRequest, InferResponse, Tensor

log = logging.getLogger("torpor")

_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def parse_node_args(argv: Sequence[str]) -> argparse.Namespace:
    """`torpor serve`'s flags, parsed as `torpor serve` parses them; ValueError with argparse's
    own text instead of its exit (a replica must fail its start, not end its process)."""
    from torpor.api.access import GRPC_HEADER_PREFIX, parse_restrictions
    from torpor.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(["serve", *argv])
    except SystemExit:
        raise ValueError(one_line(err.getvalue().strip().splitlines()[-1] if err.getvalue() else "bad flags")) from None
    args.http_restricted = parse_restrictions(args.http_restricted_api, "--http-restricted-api")
    args.grpc_restricted = parse_restrictions(args.grpc_restricted_protocol, "--grpc-restricted-protocol",
                                              GRPC_HEADER_PREFIX)
    return args


def _free_port(address: str) -> int:
    family = socket.getaddrinfo(address or "0.0.0.0", 0, type=socket.SOCK_STREAM)[0][0]
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.bind((address or "0.0.0.0", 0))
        return s.getsockname()[1]


def _reachable(address: str, fallback: str) -> str:
    """The host part other nodes dial: the listen address unless it is a wildcard."""
    return fallback if address in _WILDCARDS else address


def as_request(model: str, request: InferRequest | Mapping[str, np.ndarray]) -> InferRequest:
    """The engine's request for `model`: an InferRequest as given (its arrival restamped on this
    host's clock: the client's monotonic clock means nothing here), or {input name: array}."""
    if isinstance(request, InferRequest):
        return replace(request, model_name=model, arrival_ns=time.monotonic_ns())
    if isinstance(request, Mapping):
        inputs = [Tensor(str(k), triton_datatype(np.asarray(v).dtype), tuple(np.shape(v)), np.asarray(v))
                  for k, v in request.items()]
        return InferRequest(model_name=model, inputs=inputs)
    raise TypeError(f"a request is an InferRequest or a mapping of input name to array, not {type(request).__name__}")


class NodeHost:
    """A Torpor node (`torpor serve ARGV`) on its own event loop, in a daemon thread.

    Ports given as 0 are chosen here before the listeners bind, so the node can say where it
    listens. `advertise`: the host name or address other hosts reach it at (used where a
    listener binds a wildcard address)."""

    def __init__(self, argv: Sequence[str], advertise: str = ""):
        self.args = parse_node_args(argv)
        for which in ("http", "grpc", "metrics"):
            if getattr(self.args, f"{which}_port") == 0:
                setattr(self.args, f"{which}_port", _free_port(self._bind_address(which)))
        self.advertise = advertise or socket.gethostbyname(socket.gethostname())
        self.engine: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: str | None = None
        self._stop: asyncio.Event | None = None
        self._servers: list = []
        self._tasks: list = []
        self._forwarder: Any = None  # torpor.api.forward.Forwarder while the node has peers
        self._peer_specs: list = []
        self._bls: Any = None  # the BLS bridge this node installed

    def _bind_address(self, which: str) -> str:
        if which == "metrics":
            return self.args.metrics_address or self.args.http_address
        return getattr(self.args, f"{which}_address")

    def address(self, which: str) -> str:
        """host:port where another host reaches this node's `which` listener (http, grpc, metrics)."""
        host = _reachable(self._bind_address(which), self.advertise)
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{getattr(self.args, f'{which}_port')}"

    @property
    def name(self) -> str:
        """The node's name in the cluster: its HTTP address (unique per host and port, and the
        same after a restart, so the rendezvous owner of a model does not move)."""
        return self.address("http")

    def describe(self) -> dict[str, str]:
        return {"node": self.name, "http": self.address("http"), "grpc": self.address("grpc"),
                "metrics": self.address("metrics")}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float | None = None) -> None:
        """Start the node and return once its models are loaded and its listeners are up;
        RuntimeError with `torpor serve`'s one-line reason when it cannot start."""
        self._thread = threading.Thread(target=self._run, name="torpor-node", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise RuntimeError(f"the node did not start within {timeout} s")
        if self._failure is not None:
            self._thread.join(30)
            raise RuntimeError(self._failure)

    def _run(self) -> None:
        try:
            import uvloop

            loop = uvloop.new_event_loop()
        except ImportError:
            loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        try:
            await self._open()
        except Exception as e:  # reported by start() in one line, as `torpor serve` does
            log.debug("node start-up failed", exc_info=True)
            self._failure = one_line(reason(e))
            await self._close(0.0)
            self._started.set()
            return
        self._started.set()
        await self._stop.wait()
        await self._close(self.args.exit_timeout_secs)

    async def _open(self) -> None:
        from torpor import cli
        from torpor.adapters import create_model_function, python_backend
        from torpor.adapters.bls import install_bls
        from torpor.dataplane.engine import Engine

        options = cli.engine_options(self.args)
        for repo in options.model_repositories:  # as `torpor serve`: a node serving nothing is not healthy
            if not Path(repo).is_dir():
                raise RuntimeError(f"--model-repository {repo}: no such directory")
        in_use = cli.port_in_use(self.args)
        if in_use:
            raise RuntimeError(in_use)
        python_backend.auto_complete_enabled = not self.args.strict_model_config
        self.engine = Engine(options, create_model_function)
        failed_log = cli.open_log(self.engine, self.args)
        if failed_log:
            raise RuntimeError(failed_log)
        self._bls = install_bls(self.engine, asyncio.get_running_loop())
        await self.engine.start()
        cli.log_model_table(self.engine)
        if self.engine.registry.start_failures and self.args.exit_on_error:
            raise RuntimeError(cli.start_failure(self.engine.registry.start_failures))
        cli.freeze_start_up_heap()
        await cli.start_front_ends(self.engine, self.args, self._servers, self._tasks)
        if self.args.allow_http:
            await self._http_listening()
        self.engine.set_peers(self.name, [], 0.0)  # its report names it (peers come with set_peers)
        log.info("node %s serving %s", self.name, ", ".join(f"{k} on {v}" for k, v in self.describe().items()
                                                             if k != "node"))

    async def _http_listening(self, timeout: float = 30.0) -> None:
        """Until the HTTP listener accepts (uvicorn binds in its task, after start_front_ends
        returns): a node that says it started can be sent requests at once."""
        host = _reachable(self.args.http_address, "127.0.0.1")
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection(host, self.args.http_port)
                writer.close()
                return
            except OSError:
                ended = next((t for t in self._tasks if t.done()), None)
                if ended is not None:  # the listener's own reason
                    raise RuntimeError(reason(ended.exception()) if ended.exception() else "the HTTP listener ended")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the HTTP listener did not start on {self.address('http')}") from None
                await asyncio.sleep(0.02)

    async def _close(self, grace: float) -> None:
        """`torpor serve`'s exit: refuse new work, let the listeners finish what they hold, drain."""
        if self.engine is None:
            return
        if self._forwarder is not None:
            await self._forwarder.stop()
        self.engine.begin_exit()
        await asyncio.gather(*(stop(grace) for _, stop in self._servers), return_exceptions=True)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace + 1)
        if not await self.engine.drain(grace):
            log.warning("exit timeout: %d requests still in flight", self.engine.in_flight())
        await self.engine.stop()
        if self._bls is not None:
            from torpor.adapters.bls import uninstall_bls

            uninstall_bls(self._bls)  # a stopped node leaves no bridge behind in this process

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop (at most `grace` seconds for requests in flight; default the node's
        --exit-timeout-secs), then end the thread."""
        if self._thread is None or self.loop is None or self._stop is None:
            return
        if grace is not None:
            self.args.exit_timeout_secs = grace
        with contextlib.suppress(RuntimeError):  # the loop already ended (a failed start)
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self.args.exit_timeout_secs + 30)

    # -- what Ray asks -----------------------------------------------------------------------
    def unhealthy(self) -> str | None:
        """Why the node should be replaced, or None: it failed or has not started, a listener
        ended, or the node is not ready (the node's own readiness: --strict-readiness)."""
        if self._failure is not None:
            return self._failure
        if not self._started.is_set() or self.engine is None:
            return "not started"
        for task in self._tasks:
            if task.done():
                return "a listener ended" + (f": {reason(task.exception())}" if task.exception() else "")
        if not self.engine.is_ready():
            return "not ready"
        return None

    async def _set_peers(self, peers: Sequence[Mapping[str, str]]) -> None:
        from torpor.api.forward import Forwarder, PeerSpec

        specs = sorted({PeerSpec(f"http://{p['http']}", p.get("grpc")) for p in peers if p.get("node") != self.name},
                       key=lambda spec: spec.url)
        if specs == self._peer_specs or self.engine is None or self.engine.is_exiting():
            return
        old, self._forwarder, self._peer_specs = self._forwarder, None, specs
        if old is not None:
            await old.stop()
        if not specs:
            self.engine.set_peers(self.name, [], 0.0)
            return
        self._forwarder = Forwarder(self.engine, specs, self.name, getattr(self.args, "peer_poll_interval", 0.5),
                                    getattr(self.args, "forward_timeout_secs", 30.0))
        self._forwarder.start()
        log.info("node %s: peers %s", self.name, ", ".join(spec.url for spec in specs))

    def set_peers(self, peers: Sequence[Mapping[str, str]], timeout: float = 30.0) -> None:
        """The other nodes (their describe()), for forwarding once (torpor.api.forward): a request
        for a model device-hot on one of them goes there when that beats a local swap. The node
        itself may be among them. A change replaces the forwarder; the same set changes nothing."""
        self.submit(self._set_peers(list(peers))).result(timeout)

    def submit(self, coro) -> concurrent.futures.Future:
        """Run a coroutine on the node's loop, from any other thread."""
        if self.loop is None:
            coro.close()
            raise RuntimeError("the node is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def _report(self) -> dict[str, Any]:
        return {**self.engine.residency(), "in_flight": self.engine.in_flight()}

    async def report(self) -> dict[str, Any]:
        """The node's residency report (`Engine.residency()`, GET /v2/torpor/residency), read on
        the node's loop (the device pool is that loop's to read), awaited from another loop."""
        return await asyncio.wrap_future(self.submit(self._report()))

    async def infer(self, model: str, request: InferRequest | Mapping[str, np.ndarray]) -> InferResponse:
        """One inference on this node, as its front ends would run it (from another loop)."""
        return await asyncio.wrap_future(self.submit(self.engine.infer(as_request(model, request))))
