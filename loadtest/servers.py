"""What the benchmarks share about the servers they start: a free port, and waiting for one to
answer ready (or to die trying)."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, interval: float = 0.25) -> str | None:
    """Poll `url` (a readiness endpoint) until it answers 200: None then; else why not, "exited
    with N" as soon as the process ends, or "not ready after T s". The caller words the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return None
        except OSError:
            time.sleep(interval)
    return f"not ready after {timeout:.0f} s"
