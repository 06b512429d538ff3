"""Late binding through the real server on CPU virtual devices: more model bytes than the
device arena holds, answers identical to running where loaded, evictions visible in the
residency endpoint, statistics and metrics."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from .. import models
from .test_metrics import scrape, value

HIDDEN = 512  # 4 layers: ~4.2 MB of FP32 weights per model
MODELS = [f"mlp{i}" for i in range(6)]


def mlp_config(name: str, seed: int) -> str:
    return models.mlp_config(name, seed, HIDDEN)


@pytest.fixture(scope="module")
def mlp_repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("mlps")
    for i, name in enumerate(MODELS):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(mlp_config(name, 100 + i))
    return repo


@pytest.fixture(scope="module")
def servers(mlp_repo, tmp_path_factory):
    """The same repository served twice: models run where loaded, and late-bound to one CPU
    virtual device whose arena holds about two of the six models."""
    from ..conftest import Server

    logs = tmp_path_factory.mktemp("lblogs")
    host = Server(mlp_repo, "--devices", "none").start(logs)
    bound = Server(mlp_repo, "--devices", "cpu", "--device-memory-bytes", "10MiB").start(logs)
    yield host, bound
    host.stop()
    assert bound.stop() == 0


def infer(client, model: str, x: np.ndarray) -> np.ndarray:
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp]).as_numpy("output")


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_swapped_outputs_match_and_evictions_happen(servers):
    host, bound = servers
    hc = httpclient.InferenceServerClient(host.http_url)
    bc = httpclient.InferenceServerClient(bound.http_url)
    rng = np.random.default_rng(0)
    xs = {m: rng.standard_normal((2, HIDDEN)).astype(np.float32) for m in MODELS}
    expected = {m: infer(hc, m, xs[m]) for m in MODELS}
    # a mixed workload: round robin, then a burst on one model, then random order
    order = MODELS * 3 + [MODELS[0]] * 5 + list(rng.choice(MODELS, 20))
    for m in order:
        np.testing.assert_array_equal(infer(bc, m, xs[m]), expected[m])  # bit for bit on CPU
    residency = get_json(f"http://{bound.http_url}/v2/torpor/residency")
    (dev,) = residency["devices"]
    assert dev["kind"] == "cpu" and dev["capacity_bytes"] == 10 * 2**20
    assert dev["evictions"] > 0
    assert 0 < len(dev["models"]) < len(MODELS)
    assert dev["used_bytes"] <= dev["capacity_bytes"]
    # statistics report where a resident model's weights are
    resident = dev["models"][0]["model"].split(":")[0]
    stats = bc.get_inference_statistics(resident)["model_stats"][0]
    assert stats["memory_usage"] and stats["memory_usage"][0]["type"] == "CPU"
    assert stats["memory_usage"][0]["byte_size"] > 0
    # the host-bound server reports no device residency
    assert get_json(f"http://{host.http_url}/v2/torpor/residency")["devices"] == []


def test_swap_metrics(servers):
    _, bound = servers
    bc = httpclient.InferenceServerClient(bound.http_url)
    x = np.ones((1, HIDDEN), dtype=np.float32)
    for m in MODELS:
        infer(bc, m, x)
    with urllib.request.urlopen(bound.metrics_url, timeout=10) as r:
        text = r.read().decode()
    swap_ins = {
        line.split('model="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("torpor_swap_ins{")
    }
    assert set(swap_ins) == set(MODELS)
    assert all(v >= 1 for v in swap_ins.values())
    assert "torpor_device_memory_free_bytes" in text


def resident_models(server) -> set[str]:
    (dev,) = get_json(f"http://{server.http_url}/v2/torpor/residency")["devices"]
    return {m["model"].split(":")[0] for m in dev["models"]}


def device_counts(server, model: str) -> tuple[float, float]:
    """(swap-ins, requests served on a device: hits + joins + misses) of `model`, from the
    torpor_swap_* metrics. Every request the device runtime serves counts as exactly one of
    hit, join or miss; a request run where the model was loaded counts as none."""
    samples, _, _ = scrape(server)
    n = {k: value(samples, f"torpor_swap_{k}", model=model, version="1") for k in ("ins", "hits", "joins", "misses")}
    return n["ins"], n["hits"] + n["joins"] + n["misses"]


def test_grpc_goes_through_the_same_devices(servers):
    """gRPC requests are served by the device runtime like HTTP ones: the metrics move by exactly
    the gRPC traffic (one swap-in, three device acquisitions), and the answers match the host's."""
    host, bound = servers
    target = MODELS[-1]
    bc = httpclient.InferenceServerClient(bound.http_url)
    ones = np.ones((1, HIDDEN), dtype=np.float32)
    for m in MODELS[:-1] * 2:  # evict the target (the arena holds about two models) over HTTP
        if target not in resident_models(bound):
            break
        infer(bc, m, ones)
    assert target not in resident_models(bound)
    swap_ins, served = device_counts(bound, target)

    x = np.full((1, HIDDEN), 0.5, dtype=np.float32)
    outs = {}
    for s in (host, bound):
        c = grpcclient.InferenceServerClient(s.grpc_url)
        inp = grpcclient.InferInput("input", [1, HIDDEN], "FP32")
        inp.set_data_from_numpy(x)
        outs[s] = [c.infer(target, [inp]).as_numpy("output") for _ in range(3)]
        c.close()
    for out in outs[host] + outs[bound]:
        np.testing.assert_array_equal(out, outs[host][0])
    assert device_counts(bound, target) == (swap_ins + 1, served + 3)
    assert target in resident_models(bound)


def test_model_larger_than_the_arena_is_a_clean_error(tmp_path, start_server):
    repo = tmp_path / "big"
    (repo / "big" / "1").mkdir(parents=True)
    (repo / "big" / "config.pbtxt").write_text(mlp_config("big", 7))
    s = start_server(repo, "--devices", "cpu", "--device-memory-bytes", "2MiB")
    c = httpclient.InferenceServerClient(s.http_url)
    with pytest.raises(Exception) as e:
        infer(c, "big", np.ones((1, HIDDEN), dtype=np.float32))
    assert "503" in str(e.value) or "UNAVAILABLE" in str(e.value).upper()
    assert c.is_server_live()
