"""The node count, from SLO attainment and queues: a Ray Serve custom autoscaling policy.

Serve's default policy scales on requests in flight through its own handles, which sees none of
the traffic that goes straight to a node's HTTP and gRPC listeners (most of it: the data path
stays off Ray). Each node instead reports, through the replica's `record_autoscaling_stats`,
what its own scheduler sees whichever way a request came: `slo_attainment` (the share of
requests with an objective that met it, over the node's window) and `queue_len` (requests queued
on its devices). Serve averages each over `look_back_period_s` per node and calls the policy.

The rule: one node more when the worst node's attainment is under target (someone is missing
objectives: more device memory and copy bandwidth help) or the mean queue per node is over
`queue_high`; one node fewer when every node meets the target and the mean queue is under
`queue_low`; else as is. One step at a time, because a new node starts cold (its models come to
its devices only as requests arrive) and its effect shows only after its first swaps. Serve
applies min / max replicas and the up / down delays around it.

This module imports nothing from Torpor: Serve pickles the policy by value into its controller,
where Torpor need not be installed."""

from __future__ import annotations

from typing import Any

ATTAINMENT = "slo_attainment"
QUEUE = "queue_len"


class SloAutoscaler:
    """Serve's `AutoscalingPolicy(policy_function=SloAutoscaler, policy_kwargs={...})`."""

    def __init__(self, target_attainment: float = 0.99, queue_high: float = 8.0, queue_low: float = 1.0):
        if not 0.0 < target_attainment <= 1.0:
            raise ValueError(f"target_attainment is a share in (0, 1], got {target_attainment}")
        if not 0.0 <= queue_low < queue_high:
            raise ValueError(f"queue_low must be at least 0 and below queue_high, got {queue_low} and {queue_high}")
        self.target = target_attainment
        self.high = queue_high
        self.low = queue_low

    def desired(self, current: int, attainment: dict[Any, float], queue: dict[Any, float]) -> int:
        """The node count wanted, given per node its attainment and queue length."""
        if current == 0:
            return current  # Serve's cold-start path starts the first node, not this rule
        worst = min(attainment.values(), default=1.0)
        mean_queue = sum(queue.values()) / current if queue else 0.0
        if worst < self.target or mean_queue > self.high:
            return current + 1
        if worst >= self.target and mean_queue < self.low and current > 1:
            return current - 1
        return current

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        want = self.desired(ctx.current_num_replicas, dict(metrics.get(ATTAINMENT) or {}),
                            dict(metrics.get(QUEUE) or {}))
        return want, ctx.policy_state
