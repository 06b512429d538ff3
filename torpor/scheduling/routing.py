"""Which node of a cluster a request should go to: residency-aware routing, written once.

Pure policy over what each node reports (`NodeView`), shared by every router in front of Torpor
nodes (the Ray Serve request router, the forward-once path between nodes, the simulator's
multi-node mode), so each of them sends the same request to the same node.

`route(model, slo_s, nodes)` returns every node's name, best first. The caller tries the first
and falls back down the list (a node gone, a replica full). A node *fits* where the request's
predicted finish there is within `slo_s`: its predicted wait plus exec_s where the model is on a
device or loading, else plus max(exec_s, copy_s), since a swap pipelines the copy with the run
(compute starts as the first layer groups land), as the nodes' own cost model counts it. The
order, and why each step:

1. **Device-hot nodes that fit, earliest finish first.** A node with the model already on a
   device runs it with no copy at all, the cheapest place in the cluster, as long as its queue
   leaves the request time to run. Among several, the earliest finish spreads a hot model's
   load over its replicas.
2. **Nodes holding it in host memory or loading it, that fit, earliest finish first.** A
   loading node will have it on a device as soon as its copy lands, and a host-resident node
   swaps it in over its own PCIe without fetching it from the repository; both keep the model
   where it already is instead of making another node hold a second copy. Host memory counts
   only where some node does not hold the model there: a cluster whose every node loaded the
   whole repository reports every model in host memory everywhere, which says nothing about
   where it should go, and letting it decide would scatter a cold model's requests by load and
   undo step 3.
3. **The rendezvous-hash owner of a cold model, if it fits.** A model on no device anywhere
   (nor loading) goes to the node with the highest random weight for it (`rendezvous_owner`),
   so its requests converge on one node, which then has it hot, instead of each arrival loading
   it on another node. Rendezvous hashing needs no ring or shared state, every router computes
   the same owner from the node names alone, and when a node joins or leaves only the models
   whose owner changed (about 1/N of them) move.
4. **Any other node that fits, earliest finish first.** The holders and the owner are too busy
   to meet the objective: a copy on a node that can is worth a second replica.
5. **The nodes that do not fit, cheapest first:** where the model is on a device, then
   loading, then its owner, then the rest, each by earliest finish. A request that misses
   wherever it goes should cost the cluster least: sent to the least-loaded node instead, it
   adds a copy and a replica there, and under overload every node thrashes (tuning runs of the
   simulator's six V100 nodes at 3,300 functions, seeds 1 and 2, 240 s each: 0.68-0.89 of
   functions compliant that way, 0.945-0.96 this way; docs/cluster.md).

Ties go to more free device bytes, then to the higher rendezvous weight, so the order is the
same on every router.

`epoch` and `slo_attainment` are carried for the callers (a router drops a report older than
the one it holds; autoscaling reads attainment) and do not change the order: the predicted wait
already says how loaded a node is now, and attainment lags it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# a model's state on a node, as the node's residency report says it
DEVICE = "device"  # on a device, landed
LOADING = "loading"  # being copied to a device now
HOST = "host"  # in host memory only
STATES = (DEVICE, LOADING, HOST)


@dataclass(frozen=True)
class NodeView:
    """One node as its latest residency report shows it."""

    name: str
    epoch: int = 0  # the report's sequence number on that node: higher is newer
    # model key -> DEVICE, LOADING or HOST; a model absent is not held on this node
    models: Mapping[str, str] = field(default_factory=dict)
    predicted_wait_s: float = 0.0  # the least predicted wait before a new request could start on a device
    free_bytes: int = 0  # device bytes free for weights, over all its devices
    queue_len: int = 0  # requests queued on its devices
    slo_attainment: float | None = None  # windowed share of requests within SLO (None: no requests yet)


def weight(model: str, node: str) -> int:
    """The rendezvous (highest random weight) score of `node` for `model`: a stable 64-bit hash.

    hashlib, not hash(): Python salts str hashes per process, and every router must agree."""
    digest = hashlib.blake2b(f"{model}\x00{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(model: str, names: Iterable[str]) -> str:
    """The node among `names` with the highest weight for `model` (ValueError when empty)."""
    best = max(names, key=lambda n: (weight(model, n), n), default=None)
    if best is None:
        raise ValueError("rendezvous_owner: no nodes")
    return best


def route(
    model: str, slo_s: float | None, nodes: Sequence[NodeView], *, exec_s: float = 0.0, copy_s: float = 0.0
) -> list[str]:
    """Every node's name in preference order for a request for `model` (module docstring).

    `slo_s`: the request's latency objective in seconds (None: none, every node fits);
    `exec_s`: its predicted run time; `copy_s`: the predicted time to copy the model onto a
    device from a node's host memory (or the repository)."""
    if not nodes:
        return []
    limit = math.inf if slo_s is None else slo_s
    # each node's state for the model, read once (a report's mapping may be computed on demand)
    state = {v.name: v.models.get(model) for v in nodes}
    weights = {v.name: weight(model, v.name) for v in nodes}
    swap = max(exec_s, copy_s)  # a swap pipelines the copy with the run

    def finish(v: NodeView) -> float:
        return v.predicted_wait_s + (exec_s if state[v.name] in (DEVICE, LOADING) else swap)

    def soonest(v: NodeView) -> tuple[float, int, int]:
        return (finish(v), -v.free_bytes, -weights[v.name])

    def fitting(states: tuple[str | None, ...]) -> list[str]:
        return [
            v.name
            for v in sorted((v for v in nodes if state[v.name] in states and finish(v) <= limit), key=soonest)
        ]

    owner = max(nodes, key=lambda v: (weights[v.name], v.name))
    everywhere = all(x is not None for x in state.values())
    out = fitting((DEVICE,)) + fitting((LOADING,) if everywhere else (LOADING, HOST))
    cold = not any(x in (DEVICE, LOADING) for x in state.values())
    if cold and owner.name not in out and finish(owner) <= limit:
        out.append(owner.name)
    taken = set(out)
    rest = [v for v in nodes if v.name not in taken]
    out += [v.name for v in sorted((v for v in rest if finish(v) <= limit), key=soonest)]

    def cheapest(v: NodeView) -> tuple[int, float, int, int]:
        where = {DEVICE: 0, LOADING: 1}.get(state[v.name], 2 if v is owner else 3)
        return (where, *soonest(v))

    out += [v.name for v in sorted((v for v in rest if finish(v) > limit), key=cheapest)]
    return out
