"""torpor.cluster without Ray and without a server: requests as a handle gives them, node flags,
errors that survive pickling, the autoscaling rule, and `torpor cluster`'s flags and the Ray
settings it prints. The node host runs in tests/cluster/test_node.py, the Ray side in
tests/cluster/test_ray.py."""

from __future__ import annotations

import argparse
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from torpor.cluster.autoscale import ATTAINMENT, QUEUE, SloAutoscaler
from torpor.cluster.launch import (
    PORTS_ANYWHERE,
    _node_args,
    add_cluster_parser,
    ray_start_lines,
    run_cluster,
    system_config,
)
from torpor.cluster.node import as_request, parse_node_args
from torpor.cluster.ray_node import NodeError
from torpor.errors import Status, TorporError
from torpor.tensors import InferRequest, Tensor


def test_node_flags_are_serve_flags_and_refused_as_values():
    args = parse_node_args(["--devices", "cpu:1", "--grpc-port", "9001"])
    assert args.devices == "cpu:1" and args.grpc_port == 9001 and args.http_restricted == {}
    with pytest.raises(ValueError, match="--grpc-port"):
        parse_node_args(["--grpc-port", "70000"])
    with pytest.raises(ValueError, match="unrecognized arguments: --no-such-flag"):
        parse_node_args(["--no-such-flag"])


def test_requests_from_a_handle():
    x = np.ones((2, 3), dtype=np.float32)
    req = as_request("m", {"input": x})
    assert req.model_name == "m" and [(t.name, t.datatype, t.shape) for t in req.inputs] == [("input", "FP32", (2, 3))]
    old = InferRequest("other", inputs=[Tensor("input", "FP32", (2, 3), x)], arrival_ns=1)
    again = as_request("m", old)
    # the model is the one the call names, the arrival this host's clock (the client's means nothing here)
    assert again.model_name == "m" and again.arrival_ns > 1 and again.inputs is old.inputs
    with pytest.raises(TypeError, match="InferRequest or a mapping"):
        as_request("m", [x])


def test_a_node_error_survives_pickling_as_a_torpor_error():
    e = pickle.loads(pickle.dumps(NodeError(Status.UNAVAILABLE, "Exceeds maximum queue size: shed")))
    assert isinstance(e, TorporError) and e.status == Status.UNAVAILABLE and e.message.startswith("Exceeds")


def test_the_autoscaler_adds_a_node_for_missed_objectives_or_long_queues():
    policy = SloAutoscaler(target_attainment=0.99, queue_high=8, queue_low=1)
    assert policy.desired(2, {"a": 1.0, "b": 0.95}, {"a": 0, "b": 0}) == 3  # one node missing objectives
    assert policy.desired(2, {"a": 1.0, "b": 1.0}, {"a": 10, "b": 8}) == 3  # 9 queued per node
    assert policy.desired(2, {"a": 1.0, "b": 0.995}, {"a": 3, "b": 2}) == 2  # fine: as is
    assert policy.desired(3, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0, "b": 1, "c": 0}) == 2  # idle: one fewer
    assert policy.desired(1, {"a": 1.0}, {"a": 0}) == 1  # never below one by this rule (Serve's min applies)
    assert policy.desired(0, {}, {}) == 0  # Serve's cold start, not this rule, starts the first node
    ctx = SimpleNamespace(current_num_replicas=2, policy_state={"k": 1},
                          aggregated_metrics={ATTAINMENT: {"a": 0.5, "b": 1.0}, QUEUE: {"a": 0.0, "b": 0.0}})
    assert policy(ctx) == (3, {"k": 1})
    with pytest.raises(ValueError, match="target_attainment"):
        SloAutoscaler(target_attainment=1.5)
    with pytest.raises(ValueError, match="queue_low"):
        SloAutoscaler(queue_high=1, queue_low=2)


def cluster_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="torpor")
    add_cluster_parser(p.add_subparsers(dest="command"))
    return p.parse_args(["cluster", *argv])


def test_cluster_flags_and_the_ray_settings_they_print(capsys):
    args = cluster_args("--nodes", "2", "--gpus-per-node", "8", "--", "--devices", "cuda")
    # started here with several nodes on one host: each listens on ports of its own
    assert _node_args(args) == ["--devices", "cuda", *PORTS_ANYWHERE]
    assert _node_args(cluster_args("--address", "auto", "--nodes", "2", "--", "--devices", "cuda")) == \
        ["--devices", "cuda"]
    assert system_config(None) == {"memory_monitor_refresh_ms": 0}
    assert system_config(0.99) == {"memory_usage_threshold": 0.99}
    with pytest.raises(ValueError, match="memory-usage-threshold"):
        system_config(1.5)
    head, worker = ray_start_lines(args)
    assert "RAY_memory_monitor_refresh_ms=0 ray start --head" in head
    assert f"--object-store-memory={256 * 2**20}" in head and "--num-gpus=8" in head and "torpor_node" in head
    assert "--address=HEAD_IP:6379" in worker
    assert run_cluster(cluster_args("--print-ray-start", "--", "--devices", "cuda")) == 0
    assert "ray start --head" in capsys.readouterr().out
    # a bad node flag is refused before anything starts
    assert run_cluster(cluster_args("--", "--grpc-port", "x")) == 1
    assert "torpor: could not start:" in capsys.readouterr().err
    assert run_cluster(cluster_args("--min-nodes", "2")) == 1
    assert "--min-nodes and --max-nodes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cluster_args("--nodes", "0")

