"""Residency-aware routing for DeploymentHandle callers: a Ray Serve `RequestRouter`.

The request router API is alpha in Ray 2.60 (it may change in any release), so Torpor pins
ray==2.60.0. Serve runs one router per handle, in the caller's process; for each request it
asks `choose_replicas` for ranks of replicas and sends the request to the first rank with a
replica whose queue has room. The order is `torpor.scheduling.routing.route`'s (the policy is
written once there): each replica's routing stats are its node's residency report
(ray_node.TorporNode.record_routing_stats), turned into the router's `NodeView`s by
`torpor.scheduling.peers.node_view`, and every node gets a rank of its own, so the policy's
order holds and a full node passes the request to the next.

Between two reports of a node (Serve polls them every `request_routing_stats_period_s`) the
router remembers where it sent each model: a request it routed shows the model as loading on
that node until a report newer than the one it routed on arrives and at least `hold_s` has
passed. Without that, every request in the period before the first copy shows up in a report
would be routed on the same stale view; with it, they follow the first to the node that is
loading the model, which is what the node's report will say a moment later.

Importing this module imports neither Ray nor the web stack Ray Serve pulls in (FastAPI,
Starlette, uvicorn): the policy is `RoutingRules`, plain Python; `TorporRouter`, the class Serve
loads by its path (ray_node.ROUTER), is those rules on Serve's `RequestRouter` base, made on first
access (the module's `__getattr__`) and kept, so it pickles by reference like any class."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torpor.scheduling.peers import node_view
from torpor.scheduling.routing import DEVICE, LOADING, route

if TYPE_CHECKING:
    from ray.serve.request_router import PendingRequest, RunningReplica

INFER = "infer"  # the one deployment method routed by model (ray_node.TorporNode.infer)


def requested_model(pending: PendingRequest | None) -> str | None:
    """The model a pending `infer(model, request)` call names; None for any other call."""
    if pending is None or pending.metadata.call_method != INFER:
        return None
    model = pending.args[0] if pending.args else pending.kwargs.get("model")
    return model if isinstance(model, str) else None


class RoutingRules:
    """What Serve's request router for the Torpor node deployment (ray_node.node_deployment)
    does; `TorporRouter` puts it first in the MRO over `RequestRouter`, whose hooks the last two
    methods extend."""

    def initialize_state(self, hold_s: float = 5.0, suspect_s: float = 10.0, **kwargs: Any) -> None:
        self.hold_s = hold_s
        self.suspect_s = suspect_s
        # model -> node name -> (the epoch of the report the router routed on, when)
        self._sent: dict[str, dict[str, tuple[int, float]]] = {}
        # replicas a call could not reach, since when: ranked last for suspect_s (Serve drops a
        # replica only once Ray has declared it dead, which takes seconds after its host died)
        self._suspect: dict[Any, float] = {}

    def view(self, replica: RunningReplica, model: str, now: float):
        """The replica's node as its report shows it, with the model shown loading where this
        router sent it since that report."""
        stats = replica.routing_stats or {}
        name = stats.get("node") or replica.replica_metadata.get("node") or replica.replica_id.unique_id
        v = node_view(stats.get("report") or {}, name)
        sent = self._sent.get(model, {}).get(v.name)
        if sent is not None and v.models.get(model) not in (DEVICE, LOADING):
            epoch, at = sent
            if v.epoch <= epoch or now - at < self.hold_s:
                v = replace(v, models={**v.models, model: LOADING})
        return v

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # every rank is offered on each round: when all are full, wait before the next
            pending_request.routing_context.should_backoff = True
        model = requested_model(pending_request)
        if model is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        now = time.monotonic()
        by_name: dict[str, RunningReplica] = {}
        views = []
        for r in candidate_replicas:
            v = self.view(r, model, now)
            by_name[v.name] = r
            views.append(v)
        suspects = {n for n, r in by_name.items() if self._suspected(r, now)}
        order = sorted(route(model, None, views), key=lambda n: n in suspects)  # stable: the policy's order
        # Remembered as sent to the first: each rank holds one node and the first takes the
        # request unless its queue is full (Serve tells a router where a request went only
        # when it enforces max_ongoing_requests strictly, so this does not wait for that).
        first = next(v for v in views if v.name == order[0])
        self._sent.setdefault(model, {})[first.name] = (first.epoch, now)
        return [[by_name[n]] for n in order]

    def _suspected(self, replica: RunningReplica, now: float) -> bool:
        since = self._suspect.get(replica.replica_id)
        if since is not None and now - since >= self.suspect_s:
            del self._suspect[replica.replica_id]
            return False
        return since is not None

    def on_replica_actor_unavailable(self, replica_id: Any) -> None:
        super().on_replica_actor_unavailable(replica_id)
        self._suspect[replica_id] = time.monotonic()

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._suspect.pop(replica_id, None)


def _router_class() -> type:
    from ray.serve.request_router import RequestRouter

    return type("TorporRouter", (RoutingRules, RequestRouter),
                {"__module__": __name__, "__qualname__": "TorporRouter", "__doc__": RoutingRules.__doc__})


def __getattr__(name: str) -> Any:
    if name == "TorporRouter":
        cls = globals()["TorporRouter"] = _router_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
