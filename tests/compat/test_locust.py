"""loadtest/locustfile.py against a real server: short headless runs of each user class.

Locust runs as its own process: importing it monkey-patches the interpreter with gevent, which
must never happen inside pytest or the server.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT, Server, make_repo

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
# Small models of every input kind the workload synthesizes (INT32, INT8, BYTES fixed and -1),
# plus a sequence and a decoupled model that discovery has to skip.
MODELS = ["simple", "simple_int8", "simple_string", "simple_identity", "simple_sequence", "repeat_int32"]


@pytest.fixture(scope="module")
def locust_server(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("locust-repo"), MODELS)
    s = Server(repo).start(tmp_path_factory.mktemp("locust-logs"))
    yield s
    s.stop()


def run_locust(server: Server, out: Path, *args: str, seconds: int = 5, users: int = 4):
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args,
        "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s",
        "--host", f"http://{server.http_url}", "--grpc-host", server.grpc_url,
        "--csv", str(out / "run"), "--only-summary",
    ]
    # cwd away from the repository: Locust would read a [tool.locust] table in pyproject.toml.
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=120)
    with open(out / "run_stats.csv", newline="") as f:
        stats = list(csv.DictReader(f))
    with open(out / "run_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    return proc, stats, failures


def by_type(stats: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in stats:
        if row["Name"] != "Aggregated":
            counts[row["Type"]] = counts.get(row["Type"], 0) + int(row["Request Count"])
    return counts


def aggregated(stats: list[dict]) -> dict:
    return next(r for r in stats if r["Name"] == "Aggregated")


@pytest.mark.parametrize("user_class, request_type", [("TorporHttpUser", "POST"), ("TorporGrpcUser", "grpc")])
def test_headless_run_has_no_failures(locust_server, tmp_path, user_class, request_type):
    proc, stats, failures = run_locust(locust_server, tmp_path, user_class)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    total = aggregated(stats)
    assert int(total["Request Count"]) > 0, log
    assert int(total["Failure Count"]) == 0, failures
    assert failures == []
    assert set(by_type(stats)) == {request_type}
    names = {r["Name"] for r in stats} - {"Aggregated"}
    assert names <= {"simple", "simple_int8", "simple_string", "simple_identity"}
    assert "simple_sequence" in log and "sequence model" in log
    assert "repeat_int32" in log and "decoupled model" in log


def test_slo_misses_are_their_own_failure_class(locust_server, tmp_path):
    # An objective no request can meet: every answer is correct yet reported as an SLOMiss.
    proc, stats, failures = run_locust(
        locust_server, tmp_path, "--models", "simple", "--slo-ms", "simple=0.001", seconds=2, users=2
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert failures, proc.stdout + proc.stderr
    assert {f["Method"] for f in failures} == {"POST", "grpc"}
    assert all(f["Name"] == "simple" and f["Error"].startswith("SLOMiss(") for f in failures), failures
    total = aggregated(stats)
    assert int(total["Failure Count"]) == int(total["Request Count"]) > 0
