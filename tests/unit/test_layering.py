"""The import-layering contract: which part of torpor may import which.

    torpor.cli                      the composition root: may import everything
    torpor.api | torpor.adapters    front ends (HTTP, gRPC, metrics) | model formats
    torpor.dataplane                one request from front end to answer
    torpor.registry | torpor.runtime   models and their lifecycle | devices, memory, copies, runs
    torpor.scheduling               pure policy, shared with the simulator
    torpor.sim                      the simulator: scheduling only, never the runtime
    torpor.<module>                 common vocabulary (errors, tensors, datatypes, model, config, settings)

Every import in every module counts, lazy ones inside functions too. `check` is also run on a
deliberate violation, so the contract is known to be able to fail."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"torpor": ROOT / "torpor", "torpor.api": ROOT / "api", "torpor.adapters": ROOT / "adapters"}
COMMON = "common"
ALLOWED = {
    "cli": None,  # anything
    "api": {"api", "dataplane", COMMON},
    "adapters": {"adapters", COMMON},
    "dataplane": {"dataplane", "registry", "runtime", "scheduling", COMMON},
    "registry": {"registry", "scheduling", COMMON},
    "runtime": {"runtime", "scheduling", COMMON},
    "scheduling": {"scheduling", COMMON},
    "sim": {"sim", "scheduling", COMMON},
    COMMON: {COMMON},
}
# third-party packages the layers below the front ends must not import at all
WEB_AND_RPC = ("fastapi", "starlette", "uvicorn", "grpc", "tritonclient", "httpx", "gevent")
CORE = {"dataplane", "registry", "runtime", "scheduling", "sim", COMMON}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "torpor":
        raise ValueError(module)
    if len(parts) == 1:
        return COMMON
    if parts[1] in ALLOWED:
        return parts[1]
    return COMMON  # torpor.errors, torpor.tensors, ...


def modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in SOURCES.items():
        for p in folder.rglob("*.py"):
            rel = p.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((prefix, *rel))] = p
    return out


def imports(module: str, path: Path, source: str | None = None) -> list[tuple[int, str]]:
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "torpor" or (node.level and not node.module):  # from torpor import x: x is a module
                out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, name))
    return out


def check(module: str, path: Path, source: str | None = None) -> list[str]:
    """The contract's violations in one module (its text `source`, or the file)."""
    own = layer(module)
    allowed = ALLOWED[own]
    bad = []
    for line, name in imports(module, path, source):
        top = name.split(".")[0]
        if top == "torpor":
            if name == "torpor":
                continue
            target = layer(name)
            if allowed is not None and target not in allowed:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {name} ({target})")
        elif own in CORE and top in WEB_AND_RPC:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {name} (web or RPC stack)")
    return bad


def test_the_tree_keeps_the_layers():
    mods = modules()
    assert len(mods) > 40 and "torpor.dataplane.engine" in mods and "torpor.api.http" in mods
    bad = [v for m, p in sorted(mods.items()) for v in check(m, p)]
    assert not bad, "\n".join(bad)


def test_a_violation_is_caught():
    mods = modules()
    path = mods["torpor.scheduling.admission"]
    up = path.read_text() + "\nfrom torpor.runtime.staging import StagingQueue\n"
    assert any("scheduling imports torpor.runtime.staging" in v for v in check("torpor.scheduling.admission", path, up))
    path = mods["torpor.runtime.residency"]
    web = path.read_text() + "\n\ndef f():\n    import fastapi\n"
    assert any("fastapi" in v for v in check("torpor.runtime.residency", path, web))
    path = mods["torpor.sim.simulation"]
    rel = path.read_text() + "\nfrom ..runtime import memory\n"
    assert any("sim imports torpor.runtime" in v for v in check("torpor.sim.simulation", path, rel))


def test_the_device_core_imports_without_the_web_stack():
    """The engine, the device runtime, scheduling and the simulator load in a fresh interpreter
    without fastapi, uvicorn, grpc or tritonclient's client (torch is the runtime's to import);
    so do the residency report and the forward-once rule (the peers' I/O is the front ends')."""
    code = ("import sys, torpor.dataplane.engine, torpor.runtime.residency, torpor.runtime.device_path, "
            "torpor.sim.report, torpor.registry.repository, torpor.dataplane.cluster, torpor.scheduling.peers\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('fastapi', 'starlette', 'uvicorn', 'grpc') or "
            "(m.startswith('tritonclient') and m != 'tritonclient.grpc.model_config_pb2'))\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
