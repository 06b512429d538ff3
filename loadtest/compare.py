"""Protocol overhead side by side: Torpor, MLServer and KServe serving the same trivial model.

    python loadtest/compare.py                      # every server, HTTP and gRPC, c = 1, 8, 32, two runs each
    python loadtest/compare.py --servers torpor,mlserver --concurrency 8 --runs 2

Each server serves `simple` (two INT32 [1,16] inputs; OUTPUT0 = sum, OUTPUT1 = difference) from
the same loopback host, pinned to one core (`taskset -c 0`); the client, the same closed-loop
tritonclient aio program for all (`loadtest/closed_loop.py`), runs pinned to the other core
(`taskset -c 1`). HTTP is measured in the protocol's plain JSON form, which all three speak
(MLServer has no binary tensor extension); Torpor's binary form is measured too, as a row of its
own. Peers run in their own virtual environments under the cache folder (`~/.cache/torpor-bench`,
built on first use): MLServer 1.7.1 with `parallel_workers: 0` (its default worker pool crashes
with uvloop 0.23), `debug: false`, metrics on, and httptools; KServe 0.21.0's ModelServer with
latency logging off and WARNING logs. Each (server, protocol, concurrency) runs `--runs` times;
the table shows each run and the ratio of Torpor's median req/s to the peer's. Writes JSON and a
PNG chart (with matplotlib) to `loadtest/results/`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torpor-bench"
PEERS = {
    "mlserver": ["mlserver==1.7.1", "httptools"],
    "kserve": ["kserve==0.21.0"],
}

MLSERVER_MODEL = '''
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class SimpleModel(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        a = NumpyCodec.decode_input(payload.inputs[0])
        b = NumpyCodec.decode_input(payload.inputs[1])
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[NumpyCodec.encode_output("OUTPUT0", a + b), NumpyCodec.encode_output("OUTPUT1", a - b)])
'''

KSERVE_SERVER = '''
import logging
import sys

from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer

logging.getLogger().setLevel(logging.WARNING)
for name in ("kserve", "kserve.trace", "uvicorn", "uvicorn.access", "uvicorn.error"):
    logging.getLogger(name).setLevel(logging.WARNING)


class Simple(Model):
    def __init__(self):
        super().__init__("simple")
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
        a = payload.inputs[0].as_numpy()
        b = payload.inputs[1].as_numpy()
        outs = []
        for name, v in (("OUTPUT0", a + b), ("OUTPUT1", a - b)):
            o = InferOutput(name, list(v.shape), "INT32")
            o.set_data_from_numpy(v, binary_data=False)
            outs.append(o)
        return InferResponse(payload.id, "simple", outs, from_grpc=payload.from_grpc)


if __name__ == "__main__":
    http_port, grpc_port = int(sys.argv[1]), int(sys.argv[2])
    ModelServer(http_port=http_port, grpc_port=grpc_port, enable_latency_logging=False,
                enable_docs_url=False).start([Simple()])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_venv(name: str) -> Path:
    """The peer's own venv (its pins conflict with ours: MLServer downgrades FastAPI)."""
    venv = CACHE / name
    stamp = venv / ".installed"
    if not stamp.exists():
        print(f"installing {name} into {venv} (once) ...", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *PEERS[name]], check=True)
        stamp.touch()
    return venv


def taskset(core: int | None) -> list[str]:
    if core is None or shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        return []
    return ["taskset", "-c", str(core)]


class Launch:
    def __init__(self, name: str, cmd: list[str], http: int, grpc: int, cwd: Path, env: dict | None = None):
        self.name, self.cmd, self.http, self.grpc, self.cwd = name, cmd, http, grpc, cwd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log = cwd / f"{name}.log"

    def __enter__(self) -> Launch:
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); log: {self.log}\n"
                                   + self.log.read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/v2/models/simple/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} not ready in 120 s; log: {self.log}")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def launch(name: str, work: Path) -> Launch:
    http, grpc = free_port(), free_port()
    core = taskset(0)
    if name == "torpor":
        cmd = [*core, sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(ROOT / "examples/models"),
               "--model-control-mode", "explicit", "--load-model", "simple", "--devices", "none",
               "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", str(http),
               "--grpc-port", str(grpc), "--metrics-port", str(free_port())]
        return Launch(name, cmd, http, grpc, work)
    venv = peer_venv(name)
    if name == "mlserver":
        d = work / "mlserver"
        (d / "simple").mkdir(parents=True, exist_ok=True)
        (d / "simple" / "simple_model.py").write_text(MLSERVER_MODEL)
        (d / "simple" / "model-settings.json").write_text(json.dumps(
            {"name": "simple", "implementation": "simple_model.SimpleModel"}))
        (d / "settings.json").write_text(json.dumps({
            "debug": False, "parallel_workers": 0, "host": "127.0.0.1", "http_port": http, "grpc_port": grpc,
            "metrics_port": free_port()}))
        return Launch(name, [*core, str(venv / "bin" / "mlserver"), "start", str(d)], http, grpc, work)
    script = work / "kserve_simple.py"
    script.write_text(textwrap.dedent(KSERVE_SERVER))
    return Launch(name, [*core, str(venv / "bin" / "python"), str(script), str(http), str(grpc)], http, grpc, work)


def client_run(url: str, protocol: str, encoding: str, c: int, n: int, out: Path) -> dict:
    cmd = [*taskset(1), sys.executable, str(ROOT / "loadtest" / "closed_loop.py"), "--url", url,
           "--protocol", protocol, "--encoding", encoding, "-c", str(c), "-n", str(n), "--warmup", "300",
           "--json", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip() else "failed"}
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="torpor,mlserver,kserve")
    ap.add_argument("--protocols", default="http,grpc")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--requests", type=int, default=6000, help="per run (c=1 runs a third of it)")
    ap.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results" / "compare")
    args = ap.parse_args()
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="torpor-compare-") as tmp:
        work = Path(tmp)
        for name in servers:
            try:
                with launch(name, work) as srv:
                    for proto in protocols:
                        modes = [("json", srv.http)] + ([("binary", srv.http)] if name == "torpor" else []) \
                            if proto == "http" else [("binary", srv.grpc)]
                        for encoding, port in modes:
                            for c in concurrency:
                                n = args.requests if c > 1 else args.requests // 3
                                runs = [client_run(f"127.0.0.1:{port}", proto, encoding, c, n, work / "row.json")
                                        for _ in range(args.runs)]
                                row = {"server": name, "protocol": proto if proto == "grpc" else f"http-{encoding}",
                                       "concurrency": c, "runs": runs}
                                ok = [r for r in runs if "error" not in r]
                                if ok:
                                    row["req_per_s"] = statistics.median(r["req_per_s"] for r in ok)
                                    row["p50_ms"] = statistics.median(r["p50_ms"] for r in ok)
                                    row["p99_ms"] = statistics.median(r["p99_ms"] for r in ok)
                                rows.append(row)
                                print(_row_line(row), flush=True)
            except RuntimeError as e:
                print(f"{name}: could not start: {e}", file=sys.stderr)
                rows.append({"server": name, "error": str(e)[:500]})
    report = {"machine": _machine(), "rows": rows, "ratios": _ratios(rows)}
    (args.out / "compare.json").write_text(json.dumps(report, indent=2))
    print()
    print(format_table(report))
    _plot(report, args.out / "compare.png")
    print(f"wrote {args.out / 'compare.json'}")
    return 0


def _row_line(row: dict) -> str:
    runs = " / ".join(f"{r['req_per_s']:.0f}" if "error" not in r else "err" for r in row["runs"])
    return f"{row['server']:<9} {row['protocol']:<11} c={row['concurrency']:<3} req/s {runs}"


def _ratios(rows: list[dict]) -> list[dict]:
    """Torpor's median req/s over each peer's, same protocol form and concurrency."""
    base = {(r["server"], r["protocol"], r["concurrency"]): r for r in rows if "req_per_s" in r}
    out = []
    for (srv, proto, c), r in base.items():
        if srv == "torpor":
            continue
        t = base.get(("torpor", proto, c))
        if t is not None:
            out.append({"peer": srv, "protocol": proto, "concurrency": c,
                        "throughput_ratio": t["req_per_s"] / r["req_per_s"],
                        "p99_torpor_ms": t["p99_ms"], "p99_peer_ms": r["p99_ms"]})
    return out


def format_table(report: dict) -> str:
    head = ["server", "protocol", "c", "req/s (runs)", "median", "p50 ms", "p99 ms", "torpor / this"]
    ratio = {(x["peer"], x["protocol"], x["concurrency"]): x["throughput_ratio"] for x in report["ratios"]}
    lines = []
    for r in report["rows"]:
        if "runs" not in r:
            lines.append([r["server"], "-", "-", "not started", "", "", "", ""])
            continue
        runs = " / ".join(f"{x['req_per_s']:.0f}" if "error" not in x else "err" for x in r["runs"])
        rt = ratio.get((r["server"], r["protocol"], r["concurrency"]))
        lines.append([r["server"], r["protocol"], str(r["concurrency"]), runs,
                      f"{r['req_per_s']:.0f}" if "req_per_s" in r else "-",
                      f"{r['p50_ms']:.2f}" if "p50_ms" in r else "-", f"{r['p99_ms']:.2f}" if "p99_ms" in r else "-",
                      f"{rt:.2f}x" if rt else ""])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = lambda xs: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(xs, widths)))
    m = report["machine"]
    title = f"{m['cpu']} ({m['cores']} cores), server on core 0, client on core 1; {m['date']}"
    return "\n".join([title, fmt(head), fmt(["-" * w for w in widths]), *(fmt(x) for x in lines)])


def _machine() -> dict:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "python": sys.version.split()[0]}


def _plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return
    rows = [r for r in report["rows"] if "req_per_s" in r]
    groups = sorted({(r["protocol"], r["concurrency"]) for r in rows}, key=lambda g: (g[0], g[1]))
    servers = sorted({r["server"] for r in rows}, key=lambda s: (s != "torpor", s))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 4))
    width = 0.8 / max(1, len(servers))
    for i, srv in enumerate(servers):
        vals = [next((r["req_per_s"] for r in rows if r["server"] == srv and (r["protocol"], r["concurrency"]) == g),
                     0) for g in groups]
        ax.bar([k + i * width for k in range(len(groups))], vals, width, label=srv)
    ax.set_xticks([k + width * (len(servers) - 1) / 2 for k in range(len(groups))])
    ax.set_xticklabels([f"{p}\nc={c}" for p, c in groups], fontsize=8)
    ax.set_ylabel("req/s (median of runs)")
    ax.set_title("simple model, server pinned to one core")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
