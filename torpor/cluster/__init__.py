"""Torpor beyond one host (issue 22): one Torpor node per GPU host as a Ray Serve replica.

Ray places, supervises, scales and routes; the data path stays on each node's own HTTP and
gRPC front ends (Ray Serve's Python HTTP proxy adds about 30 ms p50 in front of a trivial
model). Ray is optional: only the functions that start or use Ray import it (the request router's
Serve base class too, on first access), and nothing outside the package imports this package but
the CLI, lazily.

- `node.NodeHost`: a Torpor node (engine and listeners) on its own event loop in a thread.
- `ray_node.TorporNode`: the Serve deployment around it; `ray_node.node_deployment` builds it.
- `router.TorporRouter`: Serve's request router, residency-aware (`router.RoutingRules` over
  torpor.scheduling.routing).
- `autoscale.slo_policy`: the node count from SLO attainment and queues.
- `client.ClusterClient`: infer through a DeploymentHandle, retried where a node died.
- `launch`: `torpor cluster`.
"""
