"""`torpor cluster`: Torpor nodes on a Ray cluster, one per host, through Ray Serve.

    torpor cluster --print-ray-start --gpus-per-node 8       # the `ray start` lines for each host
    torpor cluster --address auto --nodes 6 -- --devices cuda --model-repository /models
    torpor cluster --nodes 2 -- --devices cpu:1              # try it: a Ray instance on this host

Two Ray settings matter to a host whose memory is Torpor's model cache (every model's weights
live in host memory, by design most of it):

- **The object store is small** (`--object-store-mib`, 256 by default). Ray reserves 30% of a
  host's memory for it unless told otherwise, and counts it as used; Torpor passes only requests
  and answers through Ray (the weights never enter the object store), so a few hundred MiB
  suffice and the rest stays for models.
- **The memory monitor does not kill the node.** Ray's raylet kills a worker when the host's
  used memory passes `memory_usage_threshold` (0.95), largest first: on a Torpor host that is
  the node, holding the cache, so a host filled on purpose would lose every model and start
  over. The monitor is off by default (`memory_monitor_refresh_ms=0`); with
  `--memory-usage-threshold F` it stays on, at F. Either way the node's cache is bounded by the
  repository it loads, not by Ray.

Both are raylet settings: a cluster this command starts gets them; a cluster started with
`ray start` on each host gets them from the lines `--print-ray-start` prints.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import threading

from torpor.cli import positive_int
from torpor.cluster.ray_node import NODE_RESOURCE

PORTS_ANYWHERE = ["--http-port", "0", "--grpc-port", "0", "--metrics-port", "0"]


def add_cluster_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser(
        "cluster", help="run Torpor nodes on a Ray cluster through Ray Serve (one per host)",
        description="Run Torpor nodes on a Ray cluster, one per host, as Ray Serve replicas: Ray places, "
                    "supervises, scales and routes them; clients talk to each node's own HTTP and gRPC "
                    "listeners. Flags after -- are each node's `torpor serve` flags.")
    c.add_argument("--address", default="", help="the Ray cluster to join ('auto': the one `ray start` started "
                   "on this host) (default: start Ray on this host)")
    c.add_argument("--name", default="torpor", help="the Serve application and deployment name (default: %(default)s)")
    c.add_argument("--nodes", type=positive_int, default=1, help="Torpor nodes to start (default: %(default)s)")
    c.add_argument("--min-nodes", type=positive_int, default=None,
                   help="with --max-nodes: scale the node count on SLO attainment and queues (default: fixed)")
    c.add_argument("--max-nodes", type=positive_int, default=None, help="see --min-nodes (default: fixed)")
    c.add_argument("--target-attainment", type=float, default=0.99,
                   help="autoscaling: add a node while the worst node's SLO attainment is under this "
                        "(default: %(default)s)")
    c.add_argument("--gpus-per-node", type=float, default=0,
                   help="GPUs each node takes: all of its host's (default: %(default)s)")
    c.add_argument("--routing-stats-period", type=float, default=2.0, metavar="SECS",
                   help="how often Serve reads each node's residency report for routing (default: %(default)s)")
    c.add_argument("--object-store-mib", type=positive_int, default=256,
                   help="Ray object store per host, when this command starts Ray (default: %(default)s)")
    c.add_argument("--memory-usage-threshold", type=float, default=None, metavar="F",
                   help="keep Ray's memory monitor on at this share of host memory (default: off)")
    c.add_argument("--print-ray-start", action="store_true",
                   help="print the `ray start` lines for a cluster's hosts, with these settings, and exit")
    c.add_argument("--detach", action="store_true",
                   help="with --address: leave the nodes running on the cluster and exit (default: stop them on exit)")
    c.add_argument("node_args", nargs=argparse.REMAINDER, metavar="-- SERVE_FLAGS",
                   help="each node's `torpor serve` flags (default: none)")
    return c


def system_config(threshold: float | None) -> dict:
    """The raylet's memory monitor: off, or on at `threshold` (module docstring)."""
    if threshold is None:
        return {"memory_monitor_refresh_ms": 0}
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--memory-usage-threshold is a share of host memory in (0, 1], got {threshold}")
    return {"memory_usage_threshold": threshold}


def ray_start_lines(args: argparse.Namespace) -> list[str]:
    env = " ".join(f"RAY_{k}={v}" for k, v in system_config(args.memory_usage_threshold).items())
    common = (f"--object-store-memory={args.object_store_mib * 2**20} "
              f"--resources={shlex.quote(json.dumps({NODE_RESOURCE: 1}))}")
    if args.gpus_per_node:
        common += f" --num-gpus={args.gpus_per_node:g}"
    return [f"# the head host:\n{env} ray start --head {common}",
            f"# every other host:\n{env} ray start --address=HEAD_IP:6379 {common}"]


def _node_args(args: argparse.Namespace) -> list[str]:
    argv = list(args.node_args)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not args.address and args.nodes > 1 and not any(a.startswith("--http-port") for a in argv):
        argv += PORTS_ANYWHERE  # several nodes on this one host: each on ports of its own
    return argv


def run_cluster(args: argparse.Namespace) -> int:
    """`torpor cluster`: exit status 0 after a clean stop, 1 when the nodes cannot start."""
    from torpor.cluster.node import parse_node_args

    try:
        conf = system_config(args.memory_usage_threshold)
        if (args.min_nodes is None) != (args.max_nodes is None):
            raise ValueError("--min-nodes and --max-nodes go together (autoscaling between them)")
        argv = _node_args(args)
        parse_node_args(argv)  # a bad node flag is refused here, not by every replica
    except ValueError as e:
        print(f"torpor: could not start: {e}", file=sys.stderr, flush=True)
        return 1
    if args.print_ray_start:
        print("\n".join(ray_start_lines(args)))
        return 0
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(resources={NODE_RESOURCE: args.nodes}, object_store_memory=args.object_store_mib * 2**20,
                 include_dashboard=False, _system_config=conf)
    try:
        return _deploy_and_wait(args, argv, serve)
    finally:
        if not args.address or not args.detach:
            serve.delete(args.name)
        ray.shutdown()


def _deploy_and_wait(args: argparse.Namespace, argv: list[str], serve) -> int:
    from torpor.cluster.ray_node import node_deployment

    app = node_deployment(argv, name=args.name, nodes=args.nodes, min_nodes=args.min_nodes,
                          max_nodes=args.max_nodes, gpus_per_node=args.gpus_per_node,
                          routing_stats_period_s=args.routing_stats_period,
                          autoscale={"target_attainment": args.target_attainment})
    serve.start(proxy_location="Disabled")  # the nodes' own listeners are the data path
    try:
        handle = serve.run(app, name=args.name, route_prefix=None)
    except Exception as e:  # noqa: BLE001 - a node that cannot start: Serve's reason in one line
        print(f"torpor: could not start: {e}", file=sys.stderr, flush=True)
        return 1
    seen = {}
    for _ in range(8 * args.nodes):  # any node answers describe(); ask until each has
        d = handle.describe.remote().result()
        seen[d["node"]] = d
        if len(seen) >= args.nodes:
            break
    for d in seen.values():
        print(f"torpor node {d['node']}: HTTP {d['http']}, gRPC {d['grpc']}, metrics {d['metrics']}", flush=True)
    if args.address and args.detach:
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    return 0
