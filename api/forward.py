"""Forward once between nodes (issue 22, item 4): a request for a model that is device-hot on a
peer node goes there when the cost model says that beats a local swap.

`--peers http://10.0.0.3:8000?grpc=10.0.0.3:8001,...` names the other nodes (the HTTP base URL;
`?grpc=HOST:PORT` where gRPC requests may be forwarded to it too). A `Forwarder` polls every
peer's `GET /v2/torpor/residency` (`--peer-poll-interval`, default 0.5 s) into the engine
(`Engine.peer_report`); for each unary infer request the front ends ask `Engine.forward_target`
(the rule: `torpor.scheduling.peers.pick_peer`) and, given a peer, send it the raw v2 request
(HTTP: method, path, headers and body as received; gRPC: the ModelInferRequest with the client's
metadata) and return its answer unchanged: status, headers (binary-tensor ones included) and
body, or the gRPC status and details.

- The marker: a forwarded request carries `torpor-forwarded: <this node's name>` (HTTP header,
  gRPC metadata); a node never forwards a request that carries it, and answers it with
  `torpor-server-time-us` (HTTP header, gRPC trailing metadata), its own time on the request,
  from which the sender measures the forwarding overhead the rule counts.
- Never forwarded: streaming requests (gRPC streams, decoupled models), sequence models, requests
  naming a shared-memory region (the region is this host's), compressed HTTP bodies (the
  shared-memory check cannot read them), requests already forwarded.
- A peer that cannot be reached, times out (`--forward-timeout-secs`) or answers UNAVAILABLE
  (it did not run the request: exiting, overloaded) costs the request nothing but the try: it
  is served here. Every forward is counted per peer, protocol and outcome
  (`Engine.forward_done`; `torpor_forwards` on /metrics).

The CLI wiring: `add_cluster_arguments(parser)` adds the flags, `await start_forwarder(engine,
args)` starts polling (None without --peers), `await forwarder.stop()` ends it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
import weakref
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import orjson
from tritonclient.grpc import service_pb2 as pb

from torpor.dataplane.engine import Engine

from .peer_http import PeerConnectionError, PeerHttp

log = logging.getLogger("torpor.forward")

MARKER = "torpor-forwarded"
SERVER_TIME = "torpor-server-time-us"
_MARKER_B = MARKER.encode()
_SERVER_TIME_B = SERVER_TIME.encode()

# request headers that describe one hop, not the request: the forwarder sets its own
_HOP_REQUEST = {b"host", b"connection", b"content-length", b"transfer-encoding", b"keep-alive", b"te",
                b"upgrade", b"expect", b"proxy-connection", _MARKER_B}
# answer headers the local listener writes itself (a copy would repeat them)
_HOP_RESPONSE = {b"content-length", b"connection", b"transfer-encoding", b"keep-alive", b"date", b"server"}
# gRPC metadata gRPC itself sets per call
_GRPC_RESERVED = ("grpc-", ":")
_GRPC_OWN = {"user-agent", "content-type", "te", "host", MARKER}
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_FAILURES = (OSError, PeerConnectionError, TimeoutError)


@dataclass(frozen=True)
class PeerSpec:
    url: str  # http://host:port, the peer's name in reports and metrics
    grpc: str | None  # host:port of its gRPC listener, where gRPC requests may go


def parse_peers(text: str) -> list[PeerSpec]:
    """`--peers`: comma-separated `http://HOST:PORT[?grpc=HOST:PORT]`; ValueError naming the bad one."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = urlsplit(item)
        try:
            port = parts.port
        except ValueError:
            port = None
        query = parse_qs(parts.query)
        grpc_addr = query.pop("grpc", [None])[-1]
        if parts.scheme != "http" or not parts.hostname or port is None or parts.path not in ("", "/") or query \
                or (grpc_addr is not None and not _host_port(grpc_addr)):
            raise ValueError(f"--peers: {item!r} is not http://HOST:PORT or http://HOST:PORT?grpc=HOST:PORT")
        out.append(PeerSpec(f"http://{parts.netloc}", grpc_addr))
    if not out:
        raise ValueError("--peers: no peer given")
    return out


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _positive_seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return v


def _peers_type(text: str) -> list[PeerSpec]:
    try:
        return parse_peers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """`torpor serve`'s flags for forwarding between nodes."""
    g = parser.add_argument_group("cluster (forward once between nodes)")
    g.add_argument("--peers", type=_peers_type, default=None, metavar="URL[,URL...]",
                   help="other Torpor nodes, http://HOST:PORT (?grpc=HOST:PORT to forward gRPC too); a request "
                        "for a model device-hot on one of them is forwarded there when that beats a local swap "
                        "(default: none, every request is served here)")
    g.add_argument("--peer-poll-interval", type=_positive_seconds, default=0.5, metavar="SECONDS",
                   help="how often each peer's residency report is read (default: 0.5)")
    g.add_argument("--forward-timeout-secs", type=_positive_seconds, default=30.0, metavar="SECONDS",
                   help="a forwarded request not answered within this is served here instead (default: 30)")
    g.add_argument("--node-name", default=None, metavar="NAME",
                   help="this node's name in the forwarded-request marker and its residency report "
                        "(default: the HTTP address and port, the host name for a wildcard address)")


def node_name(args: argparse.Namespace) -> str:
    if args.node_name:
        return args.node_name
    host = args.http_address if args.http_address not in ("", "0.0.0.0", "::") else socket.gethostname()
    return f"{host}:{args.http_port}"


async def start_forwarder(engine: Engine, args: argparse.Namespace) -> Forwarder | None:
    """Start polling the peers `--peers` names (None without any); the node's name is set
    either way, so its report says who it is."""
    name = node_name(args)
    if not args.peers:
        engine.set_peers(name, [], 0.0)
        return None
    forwarder = Forwarder(engine, args.peers, name, args.peer_poll_interval, args.forward_timeout_secs)
    forwarder.start()
    return forwarder


_ACTIVE: weakref.WeakKeyDictionary[Engine, Forwarder] = weakref.WeakKeyDictionary()


def active(engine: Engine) -> Forwarder | None:
    """The engine's running forwarder (the front ends' question per request), if any."""
    return _ACTIVE.get(engine)


class _Peer:
    def __init__(self, spec: PeerSpec):
        self.spec = spec
        self.http = PeerHttp(spec.url)
        self.channel = None
        self.infer = None
        if spec.grpc:
            opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            self.channel = grpc.aio.insecure_channel(spec.grpc, options=opts)
            self.infer = self.channel.unary_unary(_MODEL_INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                                  response_deserializer=pb.ModelInferResponse.FromString)
        self.failing = False  # logged once per outage, not per request


class Forwarder:
    """Polls the peers' reports and forwards requests to them (see the module docstring)."""

    def __init__(self, engine: Engine, peers: list[PeerSpec], node: str, interval_s: float = 0.5,
                 timeout_s: float = 30.0):
        self.engine = engine
        self.node = node
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.peers = {p.url: _Peer(p) for p in peers}
        self._marker = node.encode("latin-1", "replace")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        # a report older than a few polls is not trusted: the peer may have evicted the model
        self.engine.set_peers(self.node, list(self.peers), max(4 * self.interval_s, 2.0))
        _ACTIVE[self.engine] = self
        self._task = asyncio.get_running_loop().create_task(self._poll_loop())

    async def stop(self, grace: float = 0.0) -> None:
        if _ACTIVE.get(self.engine) is self:
            del _ACTIVE[self.engine]
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for p in self.peers.values():
            await p.http.close()
            if p.channel is not None:
                await p.channel.close()

    # polling ------------------------------------------------------------------------------------
    async def _poll_loop(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.gather(*(self.poll(p) for p in self.peers.values()))
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def poll(self, peer: _Peer) -> None:
        """Read one peer's residency report into the engine."""
        t = time.perf_counter()
        try:
            status, _, body = await peer.http.request("GET", "/v2/torpor/residency", [], b"",
                                                      timeout=max(1.0, 2 * self.interval_s))
            if status != 200:
                raise PeerConnectionError(f"HTTP {status}")
            report = orjson.loads(body)
        except TimeoutError:
            # slow, not gone (a busy host): its last report stays until it is stale (4 polls)
            log.debug("peer %s: residency report not answered within the poll's time", peer.spec.url)
            return
        except (*_FAILURES, orjson.JSONDecodeError) as e:
            self._failed(peer, f"residency report: {type(e).__name__}: {e}")
            self.engine.peer_down(peer.spec.url, str(e) or type(e).__name__)
            return
        if peer.failing:
            peer.failing = False
            log.info("peer %s answers again", peer.spec.url)
        self.engine.peer_report(peer.spec.url, report, time.perf_counter() - t)

    def _failed(self, peer: _Peer, why: str) -> None:
        if not peer.failing:
            peer.failing = True
            log.warning("peer %s: %s; requests are served here until it answers", peer.spec.url, why)

    # HTTP ---------------------------------------------------------------------------------------
    async def http(self, scope: dict, model: str, version: str, headers: dict[str, str],
                   body: bytes) -> tuple[int, dict[str, str], bytes] | None:
        """Forward `POST .../infer` as received, if the rule says so: the peer's (status,
        headers, body); None to serve it here (not forwarded, or the peer failed)."""
        if MARKER in headers or headers.get("content-encoding", "identity").strip().lower() != "identity":
            return None
        hlen = headers.get("inference-header-content-length")
        head = body[:int(hlen)] if hlen is not None and hlen.isdigit() else body
        if b"shared_memory_region" in head:
            return None
        target = self.engine.forward_target(model, version)
        if target is None:
            return None
        peer = self.peers[target]
        out = [(k, v) for k, v in scope["headers"] if k not in _HOP_REQUEST]
        out.append((_MARKER_B, self._marker))
        path = scope["raw_path"] if scope.get("raw_path") else scope["path"].encode()
        if scope.get("query_string"):
            path += b"?" + scope["query_string"]
        t = time.perf_counter()
        try:
            status, answer, content = await peer.http.request("POST", path.decode("latin-1"), out, body,
                                                              self.timeout_s)
        except _FAILURES as e:
            self._fallback(peer, "http", "failed", t, f"{type(e).__name__}: {e}")
            return None
        if status == 503:
            self._fallback(peer, "http", "refused", t, "UNAVAILABLE")
            return None
        server_us = next((v for k, v in answer if k == _SERVER_TIME_B), None)
        self.engine.forward_done(target, "http", "answered", time.perf_counter() - t, _seconds(server_us))
        return status, {k.decode("latin-1"): v.decode("latin-1") for k, v in answer if k not in _HOP_RESPONSE}, content

    def _fallback(self, peer: _Peer, protocol: str, outcome: str, t: float, why: str) -> None:
        """Count a forward that ends with the request served here ("failed" or "refused"). A
        peer that failed gets no more requests until a poll finds it answering again."""
        self.engine.forward_done(peer.spec.url, protocol, outcome, time.perf_counter() - t, None)
        if outcome == "failed":
            self._failed(peer, f"forwarding: {why}")
            self.engine.peer_down(peer.spec.url, why)

    # gRPC ---------------------------------------------------------------------------------------
    async def grpc(self, request: pb.ModelInferRequest, metadata: Any) -> GrpcAnswer | None:
        """Forward a ModelInfer call, if the rule says so and the peer takes gRPC: the peer's
        answer (a response, or its status and details); None to serve it here."""
        if marked_grpc(metadata) or _names_shared_memory(request):
            return None
        target = self.engine.forward_target(request.model_name, request.model_version)
        if target is None:
            return None
        peer = self.peers[target]
        if peer.infer is None:
            return None
        md = [(k, v) for k, v in metadata or () if not k.startswith(_GRPC_RESERVED) and k not in _GRPC_OWN]
        md.append((MARKER, self.node))
        t = time.perf_counter()
        call = peer.infer(request, metadata=md, timeout=self.timeout_s)
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                outcome = "refused" if code == grpc.StatusCode.UNAVAILABLE and _answered(e) else "failed"
                self._fallback(peer, "grpc", outcome, t, e.details() or code.name)
                return None
            self.engine.forward_done(target, "grpc", "answered", time.perf_counter() - t, None)
            return GrpcAnswer(None, code, e.details() or "")
        trailing = await call.trailing_metadata()
        server_us = next((v for k, v in trailing or () if k == SERVER_TIME), None)
        self.engine.forward_done(target, "grpc", "answered", time.perf_counter() - t, _seconds(server_us))
        return GrpcAnswer(response, grpc.StatusCode.OK, "")


@dataclass(frozen=True)
class GrpcAnswer:
    """A peer's answer to a forwarded ModelInfer: its response, or its status and details."""

    response: pb.ModelInferResponse | None
    code: grpc.StatusCode
    details: str


def _answered(e: grpc.aio.AioRpcError) -> bool:
    """An UNAVAILABLE the peer's server sent (it refused the request: exiting, overloaded), not
    the one gRPC's channel makes up when it cannot connect ("failed to connect to all addresses")."""
    return "connect" not in (e.details() or "").lower()


def marked_grpc(metadata: Any) -> bool:
    """The call came from a peer (its metadata carries the marker)."""
    return any(k == MARKER for k, _ in metadata or ())


def _names_shared_memory(request: pb.ModelInferRequest) -> bool:
    return any("shared_memory_region" in t.parameters for t in (*request.inputs, *request.outputs))


def _seconds(us: Any) -> float | None:
    try:
        return int(us) / 1e6
    except (TypeError, ValueError):
        return None


def marked_http(headers: dict[str, str]) -> bool:
    """The request came from a peer (it carries the marker)."""
    return MARKER in headers


def stamp_forwarded(engine: Engine, protocol: str, started: float) -> tuple[str, str]:
    """A forwarded request answered here: count it, and the (name, value) of the header or
    trailing metadata that tells the sender how long it took here (`started`: perf_counter())."""
    engine.forwarded_in(protocol)
    return SERVER_TIME, str(int((time.perf_counter() - started) * 1e6))
