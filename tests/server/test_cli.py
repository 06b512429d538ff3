"""`torpor serve` start-up failures: one clear line on stderr and exit status 1, no traceback;
`--exit-on-error` and `--strict-readiness` as Triton's; every flag's help with its default, and
README's flags section in agreement with `serve --help`."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from torpor.cli import build_parser

from ..conftest import ROOT, free_port
from ..fault_models import write_fault_models


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torpor.cli", "serve", "--http-address", "127.0.0.1",
           "--grpc-address", "127.0.0.1", "--grpc-port", str(free_port()),
           "--metrics-port", str(free_port()), *args]
    return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def refusal(r: subprocess.CompletedProcess) -> str:
    """The one line a refused start prints (the log, also on stderr, is left out)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("torpor:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_unknown_device_kind(simple_repo):
    r = serve("--model-repository", str(simple_repo), "--http-port", str(free_port()), "--devices", "tpu")
    assert r.returncode == 1
    assert refusal(r) == ("torpor: could not start: unknown device kind in 'tpu': expected cuda, cuda:0,1, cpu "
                          "or cpu:N")


def test_devices_cuda_without_cuda_says_so_once(simple_repo):
    """No exception class names and no repeated text: the flag once, then what is wrong."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA works here")
    r = serve("--model-repository", str(simple_repo), "--http-port", str(free_port()), "--devices", "cuda")
    assert r.returncode == 1
    assert refusal(r) == ("torpor: could not start: --devices 'cuda': CUDA is not available (no GPU or a CPU-only "
                          "torch build)")


def test_a_port_taken_after_the_check_still_ends_the_start_in_one_line(simple_repo):
    """The metrics listener binds after HTTP and gRPC are up: a port taken between the early
    check and the bind (the check is switched off here) ends the start in one line, the
    listeners already started closed without a stray task error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        flags = ["serve", "--model-repository", str(simple_repo), "--devices", "none", "--http-address", "127.0.0.1",
                 "--http-port", str(free_port()), "--grpc-address", "127.0.0.1", "--grpc-port", str(free_port()),
                 "--metrics-port", str(port)]
        code = f"import torpor.cli as c; c.port_in_use = lambda args: None; c.main({flags!r})"
        started = time.monotonic()
        r = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
        took = time.monotonic() - started
    assert r.returncode == 1 and took < 30
    assert refusal(r) == (f"torpor: could not start: failed to bind the metrics listener to 127.0.0.1:{port}: "
                          "Address already in use")
    assert "successfully loaded 'simple'" in r.stderr and "Task exception" not in r.stderr


def test_an_unopenable_log_file(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "torpor.log"
    r = serve("--model-repository", str(tmp_path), "--http-port", str(free_port()), "--log-file", str(target))
    assert r.returncode == 1
    assert r.stderr.strip() == f"torpor: could not start: --log-file {target}: No such file or directory"


@pytest.mark.parametrize("listener", ["HTTP", "metrics"])
def test_a_port_in_use_is_refused_before_any_model_loads(simple_repo, listener):
    """One line, exit 1, at once: no model is loaded for a server that cannot listen."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        ports = {"HTTP": free_port(), "metrics": free_port(), listener: port}
        r = serve("--model-repository", str(simple_repo), "--metrics-address", "127.0.0.1",
                  "--http-port", str(ports["HTTP"]), "--metrics-port", str(ports["metrics"]))
    assert r.returncode == 1
    assert refusal(r) == (f"torpor: could not start: failed to bind the {listener} listener to 127.0.0.1:{port}: "
                          "Address already in use")
    assert "loading" not in r.stderr


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
        r = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"gRPC listener to 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr


def test_ports_out_of_range_and_version():
    r = serve("--http-port", "99999", timeout=30)
    assert r.returncode == 2
    assert r.stderr == ("torpor serve: error: argument --http-port: a port is 0 to 65535, got 99999"
                        " (see torpor serve --help)\n")  # one line, not argparse's usage block
    v = subprocess.run([sys.executable, "-m", "torpor.cli", "--version"], check=False, cwd=ROOT, capture_output=True,
                       text=True, timeout=30)
    assert v.returncode == 0 and v.stdout.startswith("torpor ")


# -- --exit-on-error, --strict-readiness -----------------------------------------------------------

@pytest.fixture(scope="module")
def failing_repo(tmp_path_factory):
    """'good' loads; 'fails_load' raises in initialize, as a python model with a broken weights file would."""
    return write_fault_models(tmp_path_factory.mktemp("failing_repo"), ["good", "fails_load"])


def test_a_model_that_fails_at_start_ends_the_server(failing_repo):
    """Triton's --exit-on-error default: the table is logged, then the server exits 1 naming the model."""
    r = serve("--model-repository", str(failing_repo), "--http-port", str(free_port()), "--devices", "none")
    assert r.returncode == 1
    assert refusal(r) == ("torpor: could not start: failed to load 'fails_load', version 1: RuntimeError: this model "
                          "cannot load (--exit-on-error false serves the other models)")
    assert "| fails_load | 1       | UNAVAILABLE: RuntimeError: this model cannot load |" in r.stderr
    assert "successfully unloaded 'good' version 1" in r.stderr  # what had loaded is unloaded on the way out


def test_a_missing_explicit_model_ends_the_server_too(failing_repo):
    r = serve("--model-repository", str(failing_repo), "--http-port", str(free_port()), "--devices", "none",
              "--model-control-mode", "explicit", "--load-model", "good", "--load-model", "nope")
    assert r.returncode == 1
    assert refusal(r).startswith("torpor: could not start: failed to load 'nope', failed to poll from model repository")


def _ready(server) -> int:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize(("strict", "ready"), [("true", 400), ("false", 200)])
def test_exit_on_error_false_serves_the_rest(failing_repo, start_server, strict, ready):
    """Readiness with a failed model: not ready under --strict-readiness true (tritonserver 2.51
    answers 400, seen on the real binary), ready under false; the good model serves either way."""
    s = start_server(failing_repo, "--exit-on-error", "false", "--strict-readiness", strict)
    assert _ready(s) == ready
    with urllib.request.urlopen(f"http://{s.http_url}/v2/models/good/ready", timeout=10) as r:
        assert r.status == 200


# -- help and README ---------------------------------------------------------------------------

def _serve_parser() -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices["serve"]


def _expanded_help(action: argparse.Action) -> str:
    """The help text as `serve --help` prints it, before line wrapping."""
    return " ".join((action.help % {**vars(action), "default": action.default}).split())


def test_every_serve_flag_says_its_default():
    flags = [a for a in _serve_parser()._actions if a.option_strings and a.help != argparse.SUPPRESS
             and "-h" not in a.option_strings]
    assert len(flags) > 40
    missing = [a.option_strings[0] for a in flags if not re.search(r"\(default: [^)]+\)", _expanded_help(a))]
    assert not missing


def test_readme_flags_agree_with_serve_help():
    """Each flag in README's 'Main flags' table is in `torpor serve --help` with the default the
    table gives, and the section points to `torpor serve --help` for the rest."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12_000
    section = readme.split("## Main flags", 1)[1].split("\n## ", 1)[0]
    assert "torpor serve --help" in section
    rows = [ln for ln in section.splitlines() if ln.startswith("| `--")]
    assert len(rows) >= 10
    help_text = subprocess.run([sys.executable, "-m", "torpor.cli", "serve", "--help"], check=True, cwd=ROOT,
                               capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"}).stdout
    actions = {opt: a for a in _serve_parser()._actions for opt in a.option_strings}
    for row in rows:
        flag_cell, default_cell = (c.strip() for c in re.split(r"(?<!\\)\|", row.strip("|"))[:2])
        flag = re.match(r"`(--[a-z-]+)", flag_cell).group(1)
        assert re.search(rf"^\s+{re.escape(flag)}\b", help_text, re.MULTILINE), flag
        default = default_cell.replace("`", "")
        assert f"(default: {default})" in _expanded_help(actions[flag]), (flag, default)


def test_docs_command_line_names_every_serve_flag():
    """docs/command-line.md is the full reference: every long option of `torpor serve` is there."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "command-line.md").read_text()
    missing = [o for a in _serve_parser()._actions for o in a.option_strings
               if o.startswith("--") and o != "--help" and f"`{o}" not in doc]
    assert not missing, f"docs/command-line.md lacks {missing}"
