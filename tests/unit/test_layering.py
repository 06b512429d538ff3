"""The import-layering contract: which part of torpor may import which.

    torpor.cli                      the composition root: may import everything
    torpor.cluster                  nodes on Ray Serve: a composition root per node (cli, front ends,
                                    adapters, data plane, the routing policy); the only part that
                                    imports ray, which is optional (inside the functions that need it)
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
    "cluster": {"cluster", "cli", "api", "adapters", "dataplane", "scheduling", COMMON},
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
# an optional dependency (the `ray` extra): torpor.cluster's alone, never at module level (the
# request router's Serve base class is bound on first access: torpor.cluster.router.__getattr__)
OPTIONAL = ("ray",)


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
    top_level = _top_level_lines(path, source)
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
        elif top in OPTIONAL and (own != "cluster" or line in top_level):
            bad.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name} (optional: torpor.cluster only, "
                       "inside the functions that need it)")
    return bad


def _top_level_lines(path: Path, source: str | None = None) -> set[int]:
    """Lines of the imports a module runs when it is imported (not those inside functions)."""
    tree = ast.parse(source if source is not None else path.read_text(), str(path))
    return {n.lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)}


def test_the_tree_keeps_the_layers():
    mods = modules()
    assert len(mods) > 40 and "torpor.dataplane.engine" in mods and "torpor.api.http" in mods
    bad = [v for m, p in sorted(mods.items()) for v in check(m, p)]
    assert not bad, "\n".join(bad)


# (module, text appended to it, a violation that must be reported; None: none may be)
VIOLATIONS = [
    ("torpor.scheduling.admission", "\nfrom torpor.runtime.staging import StagingQueue\n",
     "scheduling imports torpor.runtime.staging"),
    ("torpor.runtime.residency", "\n\ndef f():\n    import fastapi\n", "fastapi"),
    ("torpor.sim.simulation", "\nfrom ..runtime import memory\n", "sim imports torpor.runtime"),
    ("torpor.dataplane.engine", "\n\ndef f():\n    import ray\n", "imports ray"),
    ("torpor.cluster.ray_node", "\nimport ray\n", "imports ray"),
    ("torpor.cluster.ray_node", "\n\ndef f():\n    import ray\n", None),
]


def test_a_violation_is_caught():
    mods = modules()
    for module, added, expected in VIOLATIONS:
        path = mods[module]
        found = check(module, path, path.read_text() + added)
        if expected is None:
            assert not found, (module, added, found)
        else:
            assert any(expected in v for v in found), (module, added, found)


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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_module_imports_without_ray():
    """With ray made unimportable, every module loads (the CLI, the engine, the front ends, and
    torpor.cluster's launcher, node, deployment class and request router, which import ray only
    when run)."""
    code = ("import importlib, sys\n"
            "class NoRay:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'ray':\n"
            "            raise ImportError('ray is not installed')\n"
            "sys.meta_path.insert(0, NoRay())\n"
            f"names = {sorted(modules())!r}\n"
            "bad = []\n"
            "for n in names:\n"
            "    try:\n"
            "        importlib.import_module(n)\n"
            "    except Exception as e:\n"
            "        bad.append(f'{n}: {e!r}')\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "torpor.cluster.launch" in modules() and "torpor.cli" in modules()


def test_the_request_router_loads_ray_only_when_serve_asks_for_it():
    """`torpor.cluster.router` imports neither ray nor the web stack Serve pulls in; the class
    Serve loads by its path (ray_node.ROUTER) is a RequestRouter, made once, picklable by name."""
    code = ("import sys, pickle, torpor.cluster.router as r, torpor.cluster.ray_node as n\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'fastapi', 'starlette', 'uvicorn'))\n"
            "assert not bad, bad\n"
            "mod, _, attr = n.ROUTER.partition(':')\n"
            "assert mod == r.__name__\n"
            "cls = getattr(r, attr)\n"
            "from ray.serve.request_router import RequestRouter\n"
            "assert issubclass(cls, RequestRouter) and issubclass(cls, r.RoutingRules)\n"
            "assert r.TorporRouter is cls and pickle.loads(pickle.dumps(cls)) is cls\n"
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
