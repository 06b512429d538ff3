"""Fixtures of the compatibility tests that install other people's clients.

kserve pins and downgrades packages, so it never goes into the project venv: `kserve_python`
builds it once in a venv of its own and reuses it while its stamp matches. The venv is kept in
pytest's cache folder (`.pytest_cache/d/torpor-test/kserve-venv` under the repository, ignored by
git and removed by `make clean` and `pytest --cache-clear`), so that running the tests leaves
nothing behind outside the checkout. TORPOR_KSERVE_PYTHON names a ready python instead.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

KSERVE_REQUIREMENT = "kserve==0.21.0"


def build_kserve_venv(root: Path) -> tuple[Path | None, str]:
    """(python of a venv with kserve under `root`, '') or (None, why not)."""
    venv = root / "kserve-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".torpor-installed"
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / "kserve-venv.lock").touch()
    except OSError as e:
        return None, f"cannot create the kserve venv's cache folder {root}: {e}"
    with open(root / "kserve-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel sessions wait for one builder
        if stamp.exists() and stamp.read_text().strip() == KSERVE_REQUIREMENT and python.exists():
            return python, ""
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            ("python -m venv", [sys.executable, "-m", "venv", str(venv)]),
            # short network timeouts so an offline machine skips quickly instead of retrying for minutes
            ("pip install " + KSERVE_REQUIREMENT,
             [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--timeout", "30", "--retries", "1", KSERVE_REQUIREMENT]),
        ]
        for label, cmd in steps:
            try:
                p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                shutil.rmtree(venv, ignore_errors=True)
                return None, f"`{label}` timed out after 600 s"
            if p.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                lines = (p.stderr or p.stdout).splitlines()
                tail = "\n".join(line for line in lines if "is ignored" not in line)[-1500:]
                why = f"cannot build the kserve venv in {venv} (no network?): `{label}` failed:\n{tail}"
                return None, why
        stamp.write_text(KSERVE_REQUIREMENT + "\n")
        return python, ""


def cache_root(config: pytest.Config) -> Path | None:
    """Where this session keeps what the compatibility tests install: pytest's cache folder."""
    cache = getattr(config, "cache", None)
    return None if cache is None else Path(cache.mkdir("torpor-test"))


@pytest.fixture(scope="session")
def kserve_python(request) -> Path:
    override = os.environ.get("TORPOR_KSERVE_PYTHON")
    if override:
        return Path(override)
    root = cache_root(request.config)
    if root is None:
        pytest.skip("pytest's cache is off (-p no:cacheprovider): set TORPOR_KSERVE_PYTHON to a python with kserve")
    python, why = build_kserve_venv(root)
    if python is None:
        pytest.skip(why)
    return python
