"""Installing Torpor as a new user does: the Makefile's torch is PyTorch's CPU build everywhere,
`make clean` takes the test caches with it, and the wheel from `pip wheel .` carries the defaults
its commands use (`torpor simulate` with no scenario argument; `torpor serve` without a
repository says what to pass).

The Makefile is run for real with `make`, on a copy, against a stand-in pip that records what it
is asked and answers as an index would (PyPI has no `+cpu` builds; PyTorch's CPU index has).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..compat.conftest import cache_root
from ..conftest import ROOT

MAKE = shutil.which("make")

# A pip that logs its arguments and knows torch's +cpu builds only from PyTorch's CPU index, as
# on an ordinary Linux machine; LOCAL_CPU_WHEEL=1 makes it find them anywhere, as on machines
# whose pip is configured with a local wheel folder.
FAKE_PIP = """#!/bin/sh
echo "$*" >> "$(dirname "$0")/pip.log"
case "$*" in
  *+cpu*) [ "$LOCAL_CPU_WHEEL" = 1 ] || case "$*" in *download.pytorch.org/whl/cpu*) ;; *) exit 1 ;; esac ;;
esac
exit 0
"""


def make_checkout(tmp_path: Path) -> Path:
    """A copy of the Makefile beside a pyproject.toml and a venv whose pip is FAKE_PIP."""
    checkout = tmp_path / "checkout"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "Makefile", checkout / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    python = checkout / ".venv" / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 0\n")
    pip = checkout / ".venv" / "bin" / "pip"
    pip.write_text(FAKE_PIP)
    for f in (python, pip):
        f.chmod(0o755)
    return checkout


def run_make(checkout: Path, *targets: str, env: dict | None = None) -> list[str]:
    proc = subprocess.run([MAKE, "-C", str(checkout), *targets], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = checkout / ".venv" / "bin" / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.skipif(MAKE is None, reason="no make")
def test_make_install_takes_torch_from_pytorchs_cpu_index(tmp_path):
    calls = run_make(make_checkout(tmp_path), "install", env={"LOCAL_CPU_WHEEL": "0"})
    torch_calls = [c for c in calls if "torch==" in c]
    # the quiet first try fails (PyPI has no +cpu build); the second names PyTorch's CPU index
    assert len(torch_calls) == 2, calls
    assert "download.pytorch.org" not in torch_calls[0]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in torch_calls[1]
    assert all(c.endswith("torch==2.13.0+cpu") for c in torch_calls)
    # torch before the project, which does not list it
    assert calls.index(torch_calls[-1]) < calls.index("install -q -e .")


@pytest.mark.skipif(MAKE is None, reason="no make")
def test_make_install_uses_a_configured_cpu_wheel_as_it_is(tmp_path):
    calls = run_make(make_checkout(tmp_path), "install", env={"LOCAL_CPU_WHEEL": "1"})
    assert [c for c in calls if "torch==" in c] == ["install -q torch==2.13.0+cpu"]


def test_this_venvs_torch_is_a_cpu_build():
    """What `make install` gave this checkout (skipped where torch is absent)."""
    torch = pytest.importorskip("torch")
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"


@pytest.mark.skipif(MAKE is None, reason="no make")
def test_make_clean_removes_the_test_caches(tmp_path):
    checkout = make_checkout(tmp_path)
    kserve = checkout / ".pytest_cache" / "d" / "torpor-test" / "kserve-venv" / "bin"
    kserve.mkdir(parents=True)
    run_make(checkout, "clean")
    assert not (checkout / ".pytest_cache").exists() and not (checkout / ".venv").exists()


def test_the_kserve_venv_is_cached_inside_the_checkout_where_git_ignores_it(pytestconfig):
    root = cache_root(pytestconfig)
    if root is None:
        pytest.skip("pytest's cache is off")
    assert root.resolve().is_relative_to(ROOT)
    if shutil.which("git") and (ROOT / ".git").exists():
        probe = (root / "kserve-venv" / "bin" / "python").relative_to(ROOT)
        ignored = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{probe} is not ignored by git"


# -- the wheel ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds, installed (without dependencies: this venv has them) into
    a folder of its own, built from a copy of the sources the wheel is made of, so that no
    build output lands in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("torpor", "api", "adapters"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                            str(src)], capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("torpor-*.whl")
    target = tmp / "site"
    done = subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


def run_installed(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The installed `torpor` command, run from outside the checkout, importing the wheel's files."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([str(target / "bin" / "torpor"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_the_wheel_is_what_runs(installed, tmp_path):
    code = "import torpor.cli, torpor.sim.report as r; print(torpor.cli.__file__); print(r.DEFAULT_SCENARIO)"
    proc = subprocess.run([sys.executable, "-c", code],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)},
                          capture_output=True, text=True, timeout=60, check=False)
    cli_file, scenario = proc.stdout.split()
    assert Path(cli_file).is_relative_to(installed)
    assert Path(scenario).is_relative_to(installed) and Path(scenario).is_file()


def test_simulate_without_a_scenario_runs_the_packaged_default(installed, tmp_path):
    proc = run_installed(installed, tmp_path, "simulate", "--functions", "20", "--duration", "60",
                         "--search-gpus", "0", "--sweep", "none", "--json", "report.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["scenario"] == "h100x4"
    assert report["functions"] == 20


def test_serve_without_a_repository_says_what_to_pass(installed, tmp_path):
    proc = run_installed(installed, tmp_path, "serve", "--devices", "none")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "only in a source checkout" in lines[0] and "--model-repository" in lines[0]
