"""`torpor serve` start-up failures: one clear line on stderr and exit status 1, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

from ..conftest import ROOT, free_port


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torpor.cli", "serve", "--http-address", "127.0.0.1",
           "--grpc-address", "127.0.0.1", "--grpc-port", str(free_port()),
           "--metrics-port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_unknown_device_kind(simple_repo):
    r = serve("--model-repository", str(simple_repo), "--http-port", str(free_port()), "--devices", "tpu")
    assert r.returncode == 1
    assert "torpor: could not start" in r.stderr and "unknown device kind" in r.stderr
    assert "Traceback" not in r.stderr


def test_http_port_in_use(simple_repo):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = serve("--model-repository", str(simple_repo), "--http-port", str(port))
    assert r.returncode == 1
    assert f"HTTP listener could not start on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_device_bandwidths(simple_repo):
    r = serve("--model-repository", str(simple_repo), "--http-port", str(free_port()), "--devices", "cpu:2",
              "--device-memory-bytes", "16MiB", "--device-bandwidths", '{"pcie_GBps": -3}')
    assert r.returncode == 1
    assert "torpor: could not start" in r.stderr and "pcie_GBps" in r.stderr and "positive" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_default_slo(simple_repo):
    r = serve("--model-repository", str(simple_repo), "--default-slo-ms", "-5")
    assert r.returncode == 2 and "--default-slo-ms" in r.stderr and "positive" in r.stderr


def test_a_repository_that_does_not_exist(tmp_path):
    """Triton refuses to start on a repository it cannot stat; serving zero models would look healthy."""
    missing = tmp_path / "does" / "not" / "exist"
    r = serve("--model-repository", str(missing), "--http-port", str(free_port()), timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip() == f"torpor: could not start: --model-repository {missing}: no such directory"
