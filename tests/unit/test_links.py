"""torpor.runtime.links: the bandwidth spec's forms and errors, configured links paced on CPU devices,
measured links where nothing is configured."""

from __future__ import annotations

import json
import time

import pytest
import torch

from torpor.runtime.devices import open_devices
from torpor.runtime.links import build_links, parse_bandwidth_spec
from torpor.scheduling.costmodel import GB, TopologyError


def test_short_form():
    assert parse_bandwidth_spec("pcie=12") == {"pcie_GBps": 12.0}
    assert parse_bandwidth_spec("pcie=12,nvlink=50") == {"pcie_GBps": 12.0, "nvlink_all_GBps": 50.0}


def test_json_inline_and_file(tmp_path):
    spec = {"pcie_GBps": [1, 2], "nvlink": [[0, 1, 10]]}
    assert parse_bandwidth_spec(json.dumps(spec)) == spec
    f = tmp_path / "topo.json"
    f.write_text(json.dumps(spec))
    assert parse_bandwidth_spec(str(f)) == spec


@pytest.mark.parametrize("text, words", [
    ("pcie=fast", "pcie must be a number"),
    ("wires=3", "unknown key 'wires'"),
    ("{not json", "not valid JSON"),
    ("/no/such/file.json", "cannot read"),
    ("[1, 2]", "cannot read"),
])
def test_bad_specs_name_the_problem(text, words):
    with pytest.raises(TopologyError, match=words):
        parse_bandwidth_spec(text)


@pytest.mark.parametrize("spec, words", [
    ({"pcie_GBps": -1}, r"pcie_GBps: bandwidth must be a positive"),
    ({"nvlink": [["cpu:0", "cpu:9", 5]]}, r"nvlink\[0\]: unknown device 'cpu:9'"),
    ({"links": []}, "unknown field"),
])
def test_bad_topology_values_name_the_field(spec, words):
    devices = open_devices("cpu:2")
    try:
        with pytest.raises(TopologyError, match=words):
            build_links(devices, spec)
    finally:
        for d in devices:
            d.close()


def test_configured_links_are_emulated_on_cpu_devices():
    devices = open_devices("cpu:3")
    try:
        links = build_links(devices, parse_bandwidth_spec('{"pcie_GBps": 0.5, "nvlink": [[0, 1, 5]]}'))
        assert links.bandwidth("pcie:cpu:0") == 0.5 * GB and links.measured.get("pcie:cpu:0") in (None, False)
        assert devices[1].link_rates == {"host": 0.5 * GB, "cpu:0": 5 * GB}
        assert devices[2].link_rates == {"host": 0.5 * GB}
        assert devices[1].can_peer(devices[0]) and not devices[2].can_peer(devices[0])
        # a host copy of 8 MiB at 0.5 GB/s takes ~17 ms: it is paced, not a memcpy
        src = torch.ones(8 << 20, dtype=torch.uint8)
        dst = torch.empty_like(src)
        t = time.perf_counter()
        batch = devices[2].issue_copies([(dst, src, None)])
        batch.events[-1].synchronize()
        assert time.perf_counter() - t >= 0.8 * (8 << 20) / (0.5 * GB)
        assert torch.equal(dst, src)
    finally:
        for d in devices:
            d.close()


def test_measured_when_not_configured():
    devices = open_devices("cpu:2")
    try:
        links = build_links(devices, None, nbytes=4 << 20)
        assert links.measured["pcie:cpu:0"] is True and links.bandwidth("pcie:cpu:0") > 0
        assert links.peer_path("cpu:0", "cpu:1") is not None
        assert devices[0].link_rates == {}  # measured links are not paced
    finally:
        for d in devices:
            d.close()


def test_cuda_links_from_discovered_topology(monkeypatch):
    """Without a GPU: the NVML topology (faked) becomes NVLink pairs, P2P pairs and switch
    groups; two logical devices on one GPU copy within its memory."""
    from types import SimpleNamespace

    from torpor.runtime import topology
    from torpor.runtime.links import _cuda_links

    topo = topology.Topology(
        nvlink_links={(0, 1): 4}, p2p={(0, 1), (1, 2)},
        common_ancestor={(0, 1): "system", (1, 2): "single_switch", (0, 2): "system"}, source="nvml")
    monkeypatch.setattr(topology, "discover", lambda: topo)
    devs = [SimpleNamespace(name=n, kind="cuda", ordinal=o)
            for n, o in (("cuda:0", 0), ("cuda:0/1", 0), ("cuda:1", 1), ("cuda:2", 2))]
    links = _cuda_links(devs, measure=False, nbytes=0)
    assert links.peer_path("cuda:0", "cuda:1") == ("nvlink:cuda:0>cuda:1",)
    assert links.peer_path("cuda:0", "cuda:0/1") == ("nvlink:cuda:0>cuda:0/1",)
    assert links.peer_path("cuda:1", "cuda:2") == ("pcie:cuda:1", "pcie:cuda:2")  # P2P through their switch
    assert links.peer_path("cuda:0", "cuda:2") is None
    assert links.siblings("cuda:1") == ["cuda:2"]
    assert links.host_path("cuda:2") == ("pcie:cuda:2", "switch:sw1")
    # two logical devices on one GPU share its one PCIe link, modelled as a switch of their own
    assert links.siblings("cuda:0") == ["cuda:0/1"]
