"""Two Torpor nodes on a two-node Ray cluster on this machine (ray.cluster_utils.Cluster: a head
and a worker, each with one `torpor_node` resource), deployed through Ray Serve as
torpor.cluster.ray_node builds it, with CPU virtual devices and twenty small generated MLPs.

Requests go through a DeploymentHandle (torpor.cluster.client.ClusterClient, routed by
torpor.cluster.router.TorporRouter), or straight to a node's own listeners (HTTP, gRPC) where a
node forwards them once to its peer; which node served a model is read back from each node's own
statistics and residency report over HTTP, which is also how a client outside Ray sees them.
Then, under load, the nodes are upgraded (redeployed) and the worker host is killed: every
request sent is answered, correctly; last, a new host gets a replacement node.

Run alone with `pytest -m cluster` (about a minute on two cores); skipped where ray is not
installed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed (the `ray` extra: ray[serve]==2.60.0)")

import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from ray import serve
from ray.cluster_utils import Cluster

from torpor.cluster.client import ClusterClient
from torpor.cluster.launch import system_config
from torpor.cluster.ray_node import NODE_RESOURCE, node_deployment
from torpor.scheduling.routing import rendezvous_owner

from .. import models

pytestmark = pytest.mark.cluster

HIDDEN = 64  # 4 layers: 66 KB of weights, one 2 MiB block of a node's arena
MODELS = [f"m{i:02d}" for i in range(20)]
PER_NODE = 3  # models used per node: with 20 to choose from, a node owning fewer is a 1 in 5,000 chance
OBJECT_STORE = 100 * 2**20


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cluster-models")
    for i, name in enumerate(MODELS):
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(models.mlp_config(name, 200 + i, HIDDEN))
    return root


@dataclass
class Setup:
    ray: Cluster
    worker: Any  # the worker Ray node (the head cannot be killed)
    handle: Any
    argv: list[str]
    nodes: dict[str, dict]  # node name -> its describe(), as of the last test that changed them

    def deploy(self, argv: list[str]):
        app = node_deployment(argv, nodes=2, routing_stats_period_s=0.5, health_check_period_s=2, peer_sync_s=1)
        return serve.run(app, name="torpor", route_prefix=None)


@pytest.fixture(scope="module")
def cluster(repo):
    head = {"num_cpus": 1, "resources": {NODE_RESOURCE: 1}, "object_store_memory": OBJECT_STORE,
            "include_dashboard": False, "_system_config": system_config(None)}
    c = Cluster(initialize_head=True, head_node_args=head)
    worker = c.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}, object_store_memory=OBJECT_STORE)
    ray.init(address=c.address)
    try:
        serve.start(proxy_location="Disabled")
        # --profile-runs 0: no model is on a device before its first request, so where each
        # lands is the router's doing. Host links paced to 2 MB/s: a swap-in takes ~30 ms, so a
        # peer where the model is hot answers sooner and a node forwards to it.
        argv = ["--model-repository", str(repo), "--devices", "cpu:1", "--device-memory-bytes", "16MiB",
                "--device-bandwidths", "pcie=0.002", "--default-slo-ms", "2000", "--profile-runs", "0",
                "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
                "--metrics-port", "0", "--exit-timeout-secs", "2"]
        setup = Setup(c, worker, None, argv, {})
        setup.handle = setup.deploy(argv)
        setup.nodes = describe_all(setup.handle, 2)
        # the handle's router learns each replica's report every 0.5 s: let it have both before
        # the first request, so that request is routed on reports, not on replica ids
        time.sleep(2.0)
        yield setup
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def describe_all(handle, count: int) -> dict[str, dict]:
    seen: dict[str, dict] = {}
    for _ in range(50):
        d = handle.describe.remote().result(timeout_s=30)
        seen[d["node"]] = d
        if len(seen) == count:
            return seen
    raise AssertionError(f"only {sorted(seen)} of {count} nodes answered describe()")


def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {m: rng.standard_normal((2, HIDDEN)).astype(np.float32) for m in MODELS}


def owned(nodes: dict[str, dict]) -> dict[str, list[str]]:
    """PER_NODE models whose rendezvous owner is each node (where a model on no device goes)."""
    out: dict[str, list[str]] = {n: [] for n in nodes}
    for m in MODELS:
        out[rendezvous_owner(m, list(nodes))].append(m)
    assert all(len(v) >= PER_NODE for v in out.values()), out
    return {n: v[:PER_NODE] for n, v in out.items()}


def executions(node: dict, model: str) -> int:
    stats = httpclient.InferenceServerClient(node["http"]).get_inference_statistics(model)
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def residency(node: dict) -> dict:
    with urllib.request.urlopen(f"http://{node['http']}/v2/torpor/residency", timeout=10) as r:
        return json.loads(r.read())


async def test_each_model_stays_on_one_node_and_both_nodes_are_used(cluster):
    handle, nodes = cluster.handle, cluster.nodes
    mine = owned(nodes)
    chosen = [m for ms in mine.values() for m in ms]
    xs = inputs()
    client = ClusterClient(handle)
    answers: dict[str, list[np.ndarray]] = {m: [] for m in chosen}
    for round_ in range(4):  # sequential first, then the same models concurrently
        if round_ < 2:
            for m in chosen:
                answers[m].append((await client.infer(m, {"input": xs[m]})).outputs[0].data)
        else:
            got = await asyncio.gather(*(client.infer(m, {"input": xs[m]}) for m in chosen for _ in range(3)))
            for i, r in enumerate(got):
                answers[chosen[i // 3]].append(r.outputs[0].data)
        await asyncio.sleep(0.6)  # a routing-stats period: later rounds route on reports, not only memory
    for m, outs in answers.items():
        for out in outs[1:]:
            np.testing.assert_array_equal(out, outs[0])
    served_by = {m: {n for n, d in nodes.items() if executions(d, m) > 0} for m in chosen}
    assert all(len(where) == 1 for where in served_by.values()), served_by
    assert {next(iter(w)) for w in served_by.values()} == set(nodes), served_by  # both nodes used
    for name, ms in mine.items():
        assert all(served_by[m] == {name} for m in ms), served_by  # cold models went to their owner
        report = residency(nodes[name])
        assert report["node"] == name
        assert {m for m in ms if report["models"][f"{m}:1"]["state"] == "device"} == set(ms)
    # routing stats are the node's residency report, named as the router knows the node
    stats = await handle.record_routing_stats.remote()
    assert stats["node"] in nodes and stats["report"]["node"] == stats["node"] and "epoch" in stats["report"]


def infer_http(node: dict, model: str, x: np.ndarray, headers: dict | None = None) -> np.ndarray:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("output", binary_data=True)
    client = httpclient.InferenceServerClient(node["http"])
    return client.infer(model, [inp], outputs=[out], headers=headers).as_numpy("output")


def infer_grpc(node: dict, model: str, x: np.ndarray) -> np.ndarray:
    client = grpcclient.InferenceServerClient(node["grpc"])
    try:
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp]).as_numpy("output")
    finally:
        client.close()


def forwarded(node: dict, protocol: str) -> int:
    """Requests `node` forwarded over `protocol` and had answered by the peer."""
    return sum(f["requests"] for p in residency(node)["forwarding"]["peers"] for f in p["forwards"]
               if f["protocol"] == protocol and f["outcome"] == "answered")


def wait_peer_seen(node: dict, peer: dict, timeout: float = 20.0) -> None:
    """Until `node` has learnt `peer` from Ray and read its residency report as it is now."""
    epoch = residency(peer)["epoch"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in residency(node)["forwarding"]["peers"]:
            if p["peer"] == f"http://{peer['http']}" and p["up"] and (p["epoch"] or -1) >= epoch:
                return
        time.sleep(0.1)
    raise AssertionError(f"{node['node']} never saw {peer['node']} at epoch {epoch}: {residency(node)['forwarding']}")


def test_a_forwarded_request_is_answered_over_http_and_grpc(cluster):
    """A client that talks to a node directly (not through Ray) asks node B for a model that is
    hot on node A only: B forwards it once to A, over HTTP and over gRPC, and the answer is A's."""
    nodes = cluster.nodes
    a, b = (nodes[n] for n in sorted(nodes))
    model = owned(nodes)[a["node"]][-1]
    x = inputs()[model]
    # the marker makes A serve it itself: the model is now on A's device, on no other
    expected = infer_http(a, model, x, headers={"torpor-forwarded": "test"})
    assert residency(a)["models"][f"{model}:1"]["state"] == "device"
    assert residency(b)["models"][f"{model}:1"]["state"] == "host"
    wait_peer_seen(b, a)
    for protocol, infer in (("http", infer_http), ("grpc", infer_grpc)):
        on_a, on_b, sent = executions(a, model), executions(b, model), forwarded(b, protocol)
        np.testing.assert_array_equal(infer(b, model, x), expected)
        assert (executions(a, model), executions(b, model), forwarded(b, protocol)) == (on_a + 1, on_b, sent + 1)


AFTER_ANSWERS = 20  # answers to requests sent after the disruption: service has resumed


async def send_under_load(client: ClusterClient, chosen: list[str], expected: dict[str, np.ndarray],
                          while_running, users: int = 4) -> dict[str, int]:
    """`users` handle clients sending the chosen models round robin, each answer checked, until
    `while_running()` (a coroutine) returns and once more as long again after; the counts."""
    xs = inputs()
    counts = {"sent": 0, "answered": 0, "after": 0}
    phase = {"after": False}
    done = asyncio.Event()

    async def user(i: int) -> None:
        k = i
        while not done.is_set():
            m = chosen[k % len(chosen)]
            k += 1
            counts["sent"] += 1
            after = phase["after"]
            out = (await client.infer(m, {"input": xs[m]})).outputs[0].data
            np.testing.assert_array_equal(out, expected[m])
            counts["answered"] += 1
            counts["after"] += after

    tasks = [asyncio.create_task(user(i)) for i in range(users)]
    try:
        await asyncio.sleep(1.0)
        started = time.monotonic()
        await while_running()
        phase["after"] = True
        # as long again, and until service has resumed (answers sent after it) or 30 s passed:
        # on a loaded machine Ray may take seconds to declare a killed host dead
        deadline = time.monotonic() + 30.0
        await asyncio.sleep(max(2.0, time.monotonic() - started))
        while counts["after"] <= AFTER_ANSWERS and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
    finally:
        done.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return counts


async def test_a_rolling_upgrade_replaces_the_nodes_one_at_a_time_with_no_request_lost(cluster):
    """Deployed again with other node flags, Serve replaces the nodes one at a time: each drains
    and releases its host's `torpor_node` before its successor starts there; handle clients
    keep being answered by the node that is up."""
    old = cluster.nodes
    client = ClusterClient(cluster.handle)
    chosen = [m for ms in owned(old).values() for m in ms]
    xs = inputs()
    expected = {m: (await client.infer(m, {"input": xs[m]})).outputs[0].data for m in chosen}
    argv = [*cluster.argv[:-1], "3"]  # --exit-timeout-secs 3: a new version of the deployment
    assert cluster.argv[-2] == "--exit-timeout-secs"

    async def upgrade() -> None:
        await asyncio.to_thread(cluster.deploy, argv)

    counts = await send_under_load(client, chosen, expected, upgrade, users=2)
    cluster.nodes = await asyncio.to_thread(describe_all, cluster.handle, 2)
    assert not set(cluster.nodes) & set(old)  # both nodes replaced (new listeners, new ports)
    assert counts["sent"] == counts["answered"] and counts["after"] > 0, (counts, client.resent)


async def test_killing_a_node_under_load_loses_no_request(cluster):
    c, worker, handle, nodes = cluster.ray, cluster.worker, cluster.handle, cluster.nodes
    victim = next(n for n, d in nodes.items() if d["ray_node"] == worker.node_id)
    (survivor,) = set(nodes) - {victim}
    mine = owned(nodes)
    chosen = mine[victim] + mine[survivor]
    xs = inputs()
    client = ClusterClient(handle)
    expected = {m: (await client.infer(m, {"input": xs[m]})).outputs[0].data for m in chosen}
    before = {m: executions(nodes[survivor], m) for m in mine[victim]}

    async def kill() -> None:
        # the host dies: the node's process at once (a raylet's workers outlive it by seconds),
        # then the Ray node's own processes, none drained
        os.kill(nodes[victim]["pid"], signal.SIGKILL)
        await asyncio.to_thread(c.remove_node, worker, False)

    counts = await send_under_load(client, chosen, expected, kill)
    assert counts["sent"] == counts["answered"] and counts["after"] > AFTER_ANSWERS, (counts, client.resent)
    # the dead node's models were served by the node left
    after = {m: executions(nodes[survivor], m) for m in mine[victim]}
    assert all(after[m] > before[m] for m in mine[victim]), (before, after)


def test_a_new_host_gets_a_replacement_node_that_takes_cold_models(cluster):
    """Serve restarts the dead node's replica once a host with a free `torpor_node` has joined;
    the router then sends it the cold models it owns."""
    c, worker, handle, nodes = cluster.ray, cluster.worker, cluster.handle, cluster.nodes
    (survivor,) = (n for n, d in nodes.items() if d["ray_node"] != worker.node_id)
    c.add_node(num_cpus=1, resources={NODE_RESOURCE: 1}, object_store_memory=OBJECT_STORE)
    deadline = time.monotonic() + 60
    while True:
        try:
            current = describe_all(handle, 2)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "no replacement node within 60 s"
            time.sleep(1.0)
    (new,) = set(current) - {survivor}
    held = residency(current[survivor])["models"]
    cold = [m for m in MODELS if held[f"{m}:1"]["state"] == "host" and rendezvous_owner(m, list(current)) == new][:2]
    time.sleep(1.0)  # a routing-stats period: the router has the new node's report
    client = ClusterClient(handle)
    xs = inputs()

    async def send() -> None:
        for m in cold:
            await client.infer(m, {"input": xs[m]})

    asyncio.run(send())
    assert cold and all(executions(current[new], m) == 1 for m in cold), cold
