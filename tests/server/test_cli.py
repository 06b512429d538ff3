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


def test_a_grpc_port_in_use_is_refused_unless_reuse_is_asked_for(simple_repo):
    """gRPC binds with SO_REUSEPORT unless told not to: a second server would start on a port in
    use and the kernel would split connections between them. Like Triton without
    --reuse-grpc-port, refuse. The first listener here sets SO_REUSEPORT itself, so only the
    server's own option decides."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(simple_repo),
               "--http-address", "127.0.0.1", "--http-port", str(free_port()), "--grpc-address", "127.0.0.1",
               "--grpc-port", str(port), "--metrics-port", str(free_port())]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"gRPC listener to 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_ports_out_of_range_and_version():
    r = serve("--http-port", "99999", timeout=30)
    assert r.returncode == 2 and "a port is 0 to 65535, got 99999" in r.stderr
    v = subprocess.run([sys.executable, "-m", "torpor.cli", "--version"], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert v.returncode == 0 and v.stdout.startswith("torpor ")
