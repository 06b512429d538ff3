"""Test fixtures: a real `torpor serve` process on free loopback ports.

Tests talk to it with the real tritonclient (http, http.aio, grpc, grpc.aio), as users do.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models"
# Triton's example repository (the one its example clients expect: 7 models over HTTP).
SIMPLE_MODELS = [
    "simple",
    "simple_dyna_sequence",
    "simple_identity",
    "simple_int8",
    "simple_sequence",
    "simple_string",
    "repeat_int32",
]


# Triton's own example clients (triton-inference-server/client src/python/examples), run
# unmodified by tests/compat/test_examples_*.py when this folder exists (it does not in CI).
TRITON_EXAMPLES = Path(os.environ.get("TRITON_CLIENT_EXAMPLES", "/work/tritonclient-src/src/python/examples"))


def run_example(args: list[str], url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRITON_EXAMPLES / args[0]), *args[1:], "-u", url],
                          capture_output=True, text=True, timeout=180, cwd=TRITON_EXAMPLES)


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default floor


_HANDED_OUT: set[int] = set()
_PORTS = random.Random(os.getpid())


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range and never handed out before in
    this run. Binding port 0 would pick from the ephemeral range, where any client's outgoing
    connection may take the port before the server binds it (a two-node test then points one node
    at a port its peer never got); below that range only a listener can take it."""
    floor = min(_ephemeral_floor(), 32768)
    if floor - 1025 < 1000:  # (almost) every port is ephemeral here: let the kernel pick one
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    for _ in range(1000):
        port = _PORTS.randrange(max(1025, floor - 12000), floor)
        if port in _HANDED_OUT:
            continue
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def make_repo(dest: Path, models: list[str], source: Path = EXAMPLES) -> Path:
    """A repository folder holding copies of the named bundled models."""
    dest.mkdir(parents=True, exist_ok=True)
    for m in models:
        shutil.copytree(source / m, dest / m, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    return dest


class Server:
    def __init__(self, repo: Path | list[Path], *extra: str, env: dict | None = None):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        repos = repo if isinstance(repo, list) else [repo]
        self.args = [sys.executable, "-m", "torpor.cli", "serve"]
        for r in repos:
            self.args += ["--model-repository", str(r)]
        self.args += [
            "--http-address", "127.0.0.1",
            "--grpc-address", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port),
            *extra,
        ]
        if "--devices" not in extra:
            # Test servers run models where loaded unless a test asks for devices: on a GPU
            # machine `auto` would reserve most of the GPU for every server a test starts.
            self.args += ["--devices", "none"]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _new_ports(self) -> None:
        """Fresh free ports in place of the ones in `args` (a test may have added flags to it)."""
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        for flag, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port),
                           ("--metrics-port", self.metrics_port)):
            self.args[self.args.index(flag) + 1] = str(port)

    def start(self, log_dir: Path, timeout: float = 120.0, tries: int = 3) -> Server:
        self.log_path = log_dir / f"server-{self.http_port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if tries > 1 and "Address already in use" in self.log():
                    # a port free_port() handed out was taken before the server bound it (by a
                    # client's ephemeral port, say): the same server on fresh ports
                    self._log.close()
                    self._new_ports()
                    return self.start(log_dir, timeout, tries - 1)
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/live", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def simple_repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("repo"), SIMPLE_MODELS)


@pytest.fixture(scope="session")
def server(simple_repo, tmp_path_factory):
    """One server in the default control mode (NONE) over Triton's example models."""
    s = Server(simple_repo, "--allow-client-shm", "true").start(tmp_path_factory.mktemp("logs"))
    yield s
    s.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start extra servers with their own flags; stopped at the end of the test."""
    started: list[Server] = []

    def _start(repo, *extra, **kw) -> Server:
        s = Server(repo, *extra, **kw).start(tmp_path)
        started.append(s)
        return s

    yield _start
    for s in started:
        s.stop()


def pending_requests(server: Server, model: str) -> float:
    """`nv_inference_pending_request_count` of `model` from the server's metrics."""
    with urllib.request.urlopen(server.metrics_url, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'nv_inference_pending_request_count{{model="{model}"'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
