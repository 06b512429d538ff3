"""A Torpor node hosted in a process that is not its own (torpor.cluster.node.NodeHost), as a Ray
Serve replica runs it, without Ray: its own listeners on chosen ports, inference and the residency
report from another event loop, peers, a start that fails in one line, a drained stop."""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import numpy as np
import pytest

from torpor.cluster.node import NodeHost

from ..conftest import EXAMPLES

LOCAL = ["--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", "0", "--grpc-port", "0",
         "--metrics-port", "0", "--devices", "none"]


@pytest.fixture
def root_logging():
    """A node installs `torpor serve`'s log handler on the root logger, as serve does: put
    pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_node_host_serves_on_its_own_loop_and_stops(root_logging):
    host = NodeHost(["--model-repository", str(EXAMPLES), "--model-control-mode", "explicit",
                     "--load-model", "simple", *LOCAL], advertise="10.0.0.9")
    d = host.describe()
    # ports given as 0 are chosen before binding, so the node can say where it is
    assert d["node"] == d["http"] and all(int(d[k].rsplit(":", 1)[1]) > 0 for k in ("http", "grpc", "metrics"))
    assert host.unhealthy() == "not started"
    host.start(60)
    try:
        assert host.unhealthy() is None
        with urllib.request.urlopen(f"http://{d['http']}/v2/health/ready", timeout=10) as r:
            assert r.status == 200  # its own listener, no Ray in between

        async def from_another_loop():
            a = np.arange(16, dtype=np.int32).reshape(1, 16)
            resp = await host.infer("simple", {"INPUT0": a, "INPUT1": np.ones_like(a)})
            return resp, await host.report()

        resp, report = asyncio.run(from_another_loop())
        out = {t.name: t.data for t in resp.outputs}
        np.testing.assert_array_equal(out["OUTPUT0"], np.arange(1, 17, dtype=np.int32).reshape(1, 16))
        np.testing.assert_array_equal(out["OUTPUT1"], np.arange(-1, 15, dtype=np.int32).reshape(1, 16))
        assert report["node"] == d["node"] and "epoch" in report and report["in_flight"] == 0
        host.set_peers([d])  # itself only: no peers, no forwarder
        assert asyncio.run(host.report())["forwarding"]["peers"] == []
    finally:
        host.stop(grace=1.0)
    assert host.unhealthy() is not None


def test_a_node_that_cannot_start_says_why_in_one_line(root_logging, tmp_path):
    host = NodeHost(["--model-repository", str(tmp_path / "missing"), *LOCAL])
    with pytest.raises(RuntimeError, match=r"^--model-repository .*missing: no such directory$"):
        host.start(60)
    assert host.unhealthy() is not None
