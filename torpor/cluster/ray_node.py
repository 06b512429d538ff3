"""One Torpor node per GPU host as a Ray Serve deployment replica.

Ray places the nodes (one per host: each replica takes the host's one `torpor_node` custom
resource, and its GPUs), supervises them (Serve's health checks call `check_health`, which
asks the node's own readiness; a replica that fails them or dies is replaced), upgrades them
(a redeploy with new flags or code replaces the replicas a few at a time; the new node on a
host starts once the old one has drained and released the host's resource, and with it the
ports), scales their number (autoscale.SloAutoscaler on what `record_autoscaling_stats`
reports) and routes DeploymentHandle calls (router.TorporRouter on what `record_routing_stats`
reports: the node's residency report). The data path stays on each node's own listeners.

This module imports Ray only inside the functions that need it, so it loads without Ray."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from torpor.cluster.autoscale import ATTAINMENT, QUEUE
from torpor.cluster.node import NodeHost
from torpor.errors import TorporError
from torpor.tensors import InferRequest, InferResponse

log = logging.getLogger("torpor")

NODE_RESOURCE = "torpor_node"  # one per host: at most one node per host
ROUTER = "torpor.cluster.router:TorporRouter"
AUTOSCALER = "torpor.cluster.autoscale:SloAutoscaler"


class NodeError(TorporError):
    """A node's TorporError as a handle caller receives it. Ray sends an actor's exception to
    the caller by pickle, and TorporError(status, message) does not survive pickling (Exception
    pickles its args, the message only); this one does, and is still a TorporError."""

    def __reduce__(self):
        return (NodeError, (self.status, self.message))


class TorporNode:
    """The deployment's class: one Torpor node (`torpor serve ARGV`) per replica."""

    def __init__(self, argv: Sequence[str], start_timeout_s: float | None = None, peer_sync_s: float = 5.0):
        import ray

        self.host = NodeHost(list(argv), advertise=ray.util.get_node_ip_address())
        self.host.start(start_timeout_s)
        self._stopping = threading.Event()
        if peer_sync_s > 0:
            threading.Thread(target=self._sync_peers, args=(peer_sync_s,), name="torpor-peers", daemon=True).start()

    def _sync_peers(self, period_s: float) -> None:
        """Every `period_s`: ask every replica of this deployment where it listens (Serve's
        broadcast) and give the node the others as its forwarding peers. Nodes come and go
        (restarts, scaling, upgrades) and a node's ports are its own, so peers cannot be flags."""
        from ray import serve

        ctx = serve.get_replica_context()
        handle = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        while not self._stopping.wait(period_s):
            try:
                answers = handle.broadcast("describe").results(timeout_s=period_s, return_exceptions=True)
                self.host.set_peers([a for a in answers if isinstance(a, dict)])
            except Exception as e:  # noqa: BLE001 - a replica starting or stopping: the next round sees it
                log.debug("peer sync: %s", e)

    # -- Serve's hooks -------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: a node that failed, lost a listener or is
        not ready (its /v2/health/ready, --strict-readiness decides whether every model counts)."""
        why = self.host.unhealthy()
        if why is not None:
            raise RuntimeError(f"torpor node {self.host.name}: {why}")

    def record_replica_metadata(self) -> dict[str, str]:
        """Fixed for the replica's life: the node's name and where its listeners are."""
        return self.host.describe()

    async def record_routing_stats(self) -> dict[str, Any]:
        """What the request router ranks nodes by: the node's residency report."""
        return {**self.host.describe(), "report": await self.host.report()}

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """The node's SLO attainment (1.0 before any request with an objective) and the
        requests queued on its devices, whichever way they came (autoscale.SloAutoscaler)."""
        report = await self.host.report()
        attainment = report.get("slo_attainment")
        queued = sum(int(d.get("queue_length", 0)) for d in report.get("devices") or ())
        return {ATTAINMENT: 1.0 if attainment is None else float(attainment), QUEUE: float(queued)}

    def __del__(self) -> None:
        # Serve calls this on a graceful stop (scale-down, upgrade, shutdown): drain as
        # `torpor serve` does on SIGTERM. Also reached for a constructor that failed half way.
        stopping = getattr(self, "_stopping", None)
        if stopping is not None:
            stopping.set()
        host = getattr(self, "host", None)
        if host is not None:
            host.stop()

    # -- what handle callers call --------------------------------------------------------------
    async def infer(self, model: str, request: InferRequest | Mapping[str, np.ndarray]) -> InferResponse:
        """One inference for `model`, answered as the node's data plane answers it (the engine's
        InferResponse, or its error as a NodeError)."""
        try:
            return await self.host.infer(model, request)
        except TorporError as e:
            raise NodeError(e.status, e.message) from None

    def describe(self) -> dict[str, Any]:
        """The node's name, where its listeners are, the Ray node and the process it runs in."""
        import ray

        return {**self.host.describe(), "ray_node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def node_deployment(argv: Sequence[str], *, name: str = "torpor", nodes: int = 1, min_nodes: int | None = None,
                    max_nodes: int | None = None, gpus_per_node: float = 0, node_resource: str = NODE_RESOURCE,
                    routing_stats_period_s: float = 2.0, health_check_period_s: float = 10.0,
                    peer_sync_s: float = 5.0, autoscale: Mapping[str, float] | None = None,
                    max_ongoing_requests: int = 1000):
    """The bound Serve application: `nodes` Torpor nodes running `torpor serve ARGV`.

    `min_nodes` / `max_nodes` (both, or neither): the node count follows SLO attainment and
    queues (autoscale.SloAutoscaler with `autoscale` as its settings) within those bounds,
    starting at `nodes`. `gpus_per_node`: the GPUs each node takes (all of its host's).
    `peer_sync_s`: how often each node learns the others, to forward to (0: never)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    grace = _exit_timeout(argv)
    options: dict[str, Any] = {
        "name": name,
        "ray_actor_options": {"num_cpus": 0, "num_gpus": gpus_per_node, "resources": {node_resource: 1}},
        # the node's scheduler queues and sheds; Serve's own cap would only refuse work the
        # node would take
        "max_ongoing_requests": max_ongoing_requests,
        "health_check_period_s": health_check_period_s,
        "graceful_shutdown_timeout_s": grace + 5,
        "request_router_config": RequestRouterConfig(request_router_class=ROUTER,
                                                     request_routing_stats_period_s=routing_stats_period_s),
    }
    if (min_nodes is None) != (max_nodes is None):
        raise ValueError("give both min_nodes and max_nodes, or neither")
    if min_nodes is not None:
        options["autoscaling_config"] = {
            "min_replicas": min_nodes, "max_replicas": max_nodes, "initial_replicas": nodes,
            "policy": {"policy_function": AUTOSCALER, "policy_kwargs": dict(autoscale or {})},
        }
    else:
        options["num_replicas"] = nodes
    return serve.deployment(TorporNode).options(**options).bind(list(argv), peer_sync_s=peer_sync_s)


def _exit_timeout(argv: Sequence[str]) -> float:
    from torpor.cluster.node import parse_node_args

    return float(parse_node_args(argv).exit_timeout_secs)


__all__ = ["NODE_RESOURCE", "NodeError", "TorporNode", "node_deployment"]
