"""Triton's perf_analyzer (the C++ load generator a Triton user sizes a server with), run against
Torpor in the modes its users pick: HTTP and gRPC, sync, async and streaming, sequences (the
sequence batcher's control inputs), system shared memory.

Skipped unless the binary is there: `python loadtest/perf_analyzer.py --fetch` puts it under
.tools/ (the tritonclient 2.34.0 wheel, the last with it, and the two libraries it loads); CI
does not fetch it. TORPOR_PERF_ANALYZER may name another copy.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from loadtest.perf_analyzer import BINARY as FETCHED
from loadtest.perf_analyzer import library_path

BINARY = Path(os.environ.get("TORPOR_PERF_ANALYZER", FETCHED))

pytestmark = pytest.mark.skipif(not BINARY.exists(), reason="perf_analyzer not fetched (loadtest/perf_analyzer.py --fetch)")

THROUGHPUT = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec")

CASES = [
    ("simple", "http", []),
    ("simple", "grpc", []),
    ("simple", "http", ["--async"]),
    ("simple", "grpc", ["--async", "--concurrency-range", "4"]),
    ("simple", "grpc", ["--streaming"]),
    ("simple", "http", ["-b", "4"]),
    ("simple", "http", ["--shared-memory", "system"]),
    ("simple", "grpc", ["--shared-memory", "system", "--output-shared-memory-size", "256"]),
    ("simple_string", "http", ["--string-data", "7"]),
    ("simple_int8", "grpc", []),
    ("simple_identity", "grpc", ["--shape", "INPUT0:4", "--string-data", "x"]),
    ("simple_sequence", "grpc", ["--sequence-length", "5", "--concurrency-range", "2"]),
    ("simple_sequence", "http", ["--sequence-length", "5"]),
    ("simple_dyna_sequence", "grpc", ["--streaming", "--sequence-length", "5"]),
]


def perf_analyzer(server, model: str, protocol: str, extra: list[str]) -> subprocess.CompletedProcess:
    url = server.http_url if protocol == "http" else server.grpc_url
    env = {**os.environ, "LD_LIBRARY_PATH": library_path(BINARY)}
    cmd = [str(BINARY), "-m", model, "-i", protocol, "-u", url, "--measurement-interval", "300",
           "--max-trials", "4", "--stability-percentage", "100", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def successes(server, model: str) -> int:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=5) as r:
        stats = json.load(r)["model_stats"]
    return sum(int(s["inference_stats"]["success"]["count"]) for s in stats)


@pytest.mark.parametrize(("model", "protocol", "extra"), CASES, ids=[f"{m}-{p}-{' '.join(e)}" for m, p, e in CASES])
def test_perf_analyzer_measures_without_errors(server, model, protocol, extra):
    before = successes(server, model)
    r = perf_analyzer(server, model, protocol, extra)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    m = THROUGHPUT.search(r.stdout)
    assert m is not None and float(m.group(2)) > 0, out[-2000:]
    assert "error" not in out.lower(), out[-2000:]
    # what it measured reached the model: the server counted at least that many successes
    assert successes(server, model) - before >= 10
