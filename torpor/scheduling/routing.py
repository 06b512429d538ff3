"""Which node of a cluster a request should go to: residency-aware routing, written once.

Pure policy over what each node reports (`NodeView`), shared by every router in front of Torpor
nodes (the Ray Serve request router, the forward-once path between nodes, the simulator's
multi-node mode), so each of them sends the same request to the same node.

`route(model, slo_s, nodes)` returns every node's name, best first. The caller tries the first
and falls back down the list (a node gone, a replica full). The order, and why each step:

1. **Device-hot within the SLO slack, least predicted wait first.** A node with the model
   already on a device runs it with no copy at all; that is the cheapest place in the cluster,
   as long as its queue still leaves the request time to run (predicted wait <= SLO - exec_s).
   Among several, the least wait spreads a hot model's load over its replicas.
2. **Held in host memory or loading, earliest predicted start first.** A loading node will have
   it on a device as soon as its copy lands, and a host-resident node swaps it in over its own
   PCIe (copy_s) without fetching it from the repository; both keep the model where it already
   is instead of making another node hold a second copy. A node qualifies only where its start
   still fits the slack (wait, plus copy_s where it is only in host memory): where it does not,
   a copy somewhere idle beats queueing behind a busy node. Host memory counts only where some
   node does not hold the model there: a cluster whose every node loaded the whole repository
   reports every model in host memory everywhere, which says nothing about where it should go,
   and letting it decide would scatter a cold model's requests by load and undo step 3.
3. **The rendezvous-hash owner of a cold model.** A model on no device anywhere (nor loading)
   goes next to the node with the highest random weight for it (`rendezvous_owner`), so its
   requests converge on one node, which then has it hot, instead of each arrival loading it on
   another node. Rendezvous hashing needs no ring or shared state, every router computes the
   same owner from the node names alone, and when a node joins or leaves only the models whose
   owner changed (about 1/N of them) move. Skipped where the owner's start does not fit the
   slack, for the reason in step 2.
4. **The rest, earliest predicted start first** (the predicted wait, plus copy_s where the
   model is not on a device there): when no node can meet the objective by the steps above, the
   node that starts it soonest misses it by least. Ties go to more free device bytes, then to the
   higher rendezvous weight, so the order is the same on every router.

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

    `slo_s`: the request's latency objective in seconds (None: none, every start fits);
    `exec_s`: its predicted run time; `copy_s`: the predicted time to copy the model onto a
    device from a node's host memory (or the repository)."""
    if not nodes:
        return []
    slack = math.inf if slo_s is None else slo_s - exec_s
    # each node's state for the model, read once (a report's mapping may be computed on demand)
    state = {v.name: v.models.get(model) for v in nodes}
    weights = {v.name: weight(model, v.name) for v in nodes}

    def start(v: NodeView) -> float:
        return v.predicted_wait_s + (0.0 if state[v.name] in (DEVICE, LOADING) else copy_s)

    def order(v: NodeView) -> tuple[float, int, int]:
        return (start(v), -v.free_bytes, -weights[v.name])

    held_states = (LOADING,) if all(x is not None for x in state.values()) else (LOADING, HOST)
    hot = sorted((v for v in nodes if state[v.name] == DEVICE and v.predicted_wait_s <= slack), key=order)
    held = sorted((v for v in nodes if state[v.name] in held_states and start(v) <= slack), key=order)
    out = [v.name for v in hot + held]
    if not any(x in (DEVICE, LOADING) for x in state.values()):
        owner = max(nodes, key=lambda v: (weights[v.name], v.name))
        if start(owner) <= slack:
            out.append(owner.name)
    taken = set(out)
    out += [v.name for v in sorted(nodes, key=order) if v.name not in taken]
    return out
