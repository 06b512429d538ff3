"""Triton's own load generator, perf_analyzer, against Torpor (and tritonserver where given), side
by side: what a Triton user runs first to size a server.

    python loadtest/perf_analyzer.py --fetch                      # once: the tool, into .tools/
    python loadtest/perf_analyzer.py --hosts threads,aio --concurrency 1,8,32 --runs 2 \\
        --tritonserver /path/to/tritonserver --json loadtest/results/perf-analyzer.json

perf_analyzer is a C++ program; the last Python client wheel that carries it for Linux is
tritonclient 2.34.0 (`tritonclient-2.34.0.data/data/bin/perf_analyzer`). It needs libb64
(Debian's libb64-0d) and libcudart.so.12 loadable, though it makes no CUDA call unless asked for
CUDA shared memory: `--fetch` downloads the wheel and NVIDIA's CUDA runtime wheel with pip and
libb64 with `apt-get download`, and unpacks them under `.tools/perf_analyzer/` (git-ignored).

Every server serves one bundled model (`--model`, default `simple`: a python-backend model,
two INT32 [1,16] inputs, sum and difference; Torpor with `--devices none` unless `--server-arg`
says otherwise, e.g. `--model resnet50 --server-arg=--devices=cuda` on a GPU machine), each Torpor gRPC host (`--grpc-server`; `aio-pinned`
adds `--pin-front-end true`) as a server of its own, tritonserver with its python backend where `--tritonserver` names its binary (the
`nvidia-pytriton` wheel's, see docs/compatibility.md). For each run, protocol and concurrency the
servers are measured one after another (so a ratio compares neighbours in time), each point
perf_analyzer's own stable measurement (`--measurement-interval` windows, the last three within
`--stability` % of each other, at most `--max-trials` windows; a point that never settles is
reported as failed). Printed: req/s, mean and p99 latency (perf_analyzer's, in the client); the JSON
has every run. `--pin` puts every server on core 0 and perf_analyzer on core 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest.servers import free_port, wait_ready

TOOLS = ROOT / ".tools" / "perf_analyzer"
BINARY = TOOLS / "tritonclient-2.34.0.data" / "data" / "bin" / "perf_analyzer"
LIBS = (TOOLS / "libb64" / "usr" / "lib" / "x86_64-linux-gnu", TOOLS / "cudart" / "nvidia" / "cuda_runtime" / "lib")


def library_path(binary: Path) -> str:
    """Where the tool's two libraries are: as `--fetch` unpacks them, or in a `lib` folder beside
    the binary's folder (loadtest/gpu_prepare.sh copies them so: .gpu/perf_analyzer/{bin,lib})."""
    return ":".join(str(p) for p in (binary.parent.parent / "lib", *LIBS))


def fetch() -> None:
    """The tool and the two libraries it loads, under TOOLS (needs pip's index and apt's)."""
    TOOLS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp]
        subprocess.run([*pip, "--platform", "manylinux1_x86_64", "tritonclient==2.34.0"], check=True)
        subprocess.run([*pip, "--platform", "manylinux2014_x86_64", "nvidia-cuda-runtime-cu12==12.4.127"], check=True)
        subprocess.run(["apt-get", "download", "libb64-0d"], check=True, cwd=tmp)
        for whl in Path(tmp).glob("tritonclient-*.whl"):
            shutil.unpack_archive(whl, TOOLS, "zip")
        for whl in Path(tmp).glob("nvidia_cuda_runtime*.whl"):
            shutil.unpack_archive(whl, TOOLS / "cudart", "zip")
        for deb in Path(tmp).glob("libb64-0d_*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(TOOLS / "libb64")], check=True)
    BINARY.chmod(0o755)
    print(f"perf_analyzer: {BINARY}")


class Server:
    """A server on three free loopback ports, its output in a log file."""

    def __init__(self, name: str, cmd_for_ports, env: dict | None, log: Path, pin: bool, model: str):
        self.name = name
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        cmd = cmd_for_ports(self.http, self.grpc, self.metrics)
        if pin:
            cmd = ["taskset", "-c", "0", *cmd]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        why = wait_ready(self.proc, f"http://127.0.0.1:{self.http}/v2/models/{model}/ready", 600)
        if why is not None:
            raise SystemExit(f"{name} {why}: see {log}")

    def url(self, protocol: str) -> str:
        return f"127.0.0.1:{self.http if protocol == 'http' else self.grpc}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_servers(args, repo: Path, logs: Path) -> list[Server]:
    servers = []
    for spec in args.hosts:
        host, _, pinned = spec.partition("-")

        def torpor(h, g, m, host=host, pin_front_end="true" if pinned else "false"):
            return [sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(repo),
                    "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--metrics-address", "127.0.0.1",
                    "--http-port", str(h), "--grpc-port", str(g), "--metrics-port", str(m), "--grpc-server", host,
                    "--pin-front-end", pin_front_end, "--log-info", "false", *args.server_arg]
        servers.append(Server(f"torpor-{spec}", torpor, None, logs / f"torpor-{spec}.log", args.pin, args.model))
    if args.tritonserver:
        binary = Path(args.tritonserver)
        backends = binary.parent.parent / "backends"

        def triton(h, g, m):
            return [str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
                    "--http-port", str(h), "--grpc-port", str(g), "--metrics-port", str(m), "--log-info", "false"]
        env = dict(os.environ)
        if args.triton_path:  # the python backend's stub finds its interpreter on PATH
            env["PATH"] = f"{args.triton_path}:{env['PATH']}"
        servers.append(Server("tritonserver", triton, env, logs / "tritonserver.log", args.pin, args.model))
    return servers


LINE = re.compile(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec")
P99 = re.compile(r"p99 latency: (\d+) usec")


def measure(server: Server, protocol: str, concurrency: int, args) -> dict:
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(args.perf_analyzer))
    cmd = [str(args.perf_analyzer), "-m", args.model, "-i", protocol, "-u", server.url(protocol),
           "--concurrency-range", str(concurrency), "--measurement-interval", str(args.measurement_interval),
           "--stability-percentage", str(args.stability), "--max-trials", str(args.max_trials), *args.pa_arg]
    if args.pin:
        cmd = ["taskset", "-c", "1", *cmd]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        return {"error": "perf_analyzer ran past 300 s", "rc": None}
    m, p99 = LINE.search(r.stdout), P99.findall(r.stdout)
    if r.returncode != 0 or m is None:
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        return {"error": " / ".join(tail), "rc": r.returncode}
    return {"rps": float(m.group(2)), "mean_us": int(m.group(3)), "p99_us": int(p99[-1]) if p99 else None}


def table(results: list[dict], names: list[str], args) -> str:
    rows = ["| protocol | c | " + " | ".join(f"{n} req/s (mean / p99 us)" for n in names) + " |",
            "|---|---:|" + "---:|" * len(names)]
    for protocol in args.protocols:
        for c in args.concurrency:
            cells = []
            for n in names:
                pts = [r for r in results if r["server"] == n and r["protocol"] == protocol and r["c"] == c]
                ok = [p for p in pts if "rps" in p]
                if not ok:
                    cells.append("failed: " + (pts[0].get("error", "") if pts else "not run"))
                    continue
                runs = "/".join(f"{p['rps']:.0f}" for p in ok)
                mean = statistics.median(p["mean_us"] for p in ok)
                p99s = [p["p99_us"] for p in ok if p["p99_us"] is not None]
                p99 = f"{statistics.median(p99s):.0f}" if p99s else "-"
                cells.append(f"{runs} ({mean:.0f} / {p99})")
            rows.append(f"| {protocol} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fetch", action="store_true", help="download perf_analyzer and its libraries, then exit")
    ap.add_argument("--perf-analyzer", type=Path, default=BINARY)
    ap.add_argument("--hosts", type=lambda s: s.split(","), default=["threads", "aio"],
                    help="Torpor gRPC hosts to run, each a server of its own (auto, threads, aio; "
                         "aio-pinned: aio with --pin-front-end true)")
    ap.add_argument("--model", default="simple", help="a model of examples/models (default: simple)")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="more `torpor serve` flags, e.g. --server-arg=--devices=cuda (default: --devices none)")
    ap.add_argument("--pa-arg", action="append", default=[], help="more perf_analyzer flags, e.g. --pa-arg=-b4")
    ap.add_argument("--tritonserver", default=None, help="tritonserver binary to run beside Torpor")
    ap.add_argument("--triton-path", default=None, help="prepended to PATH for tritonserver (its venv's bin)")
    ap.add_argument("--protocols", type=lambda s: s.split(","), default=["http", "grpc"])
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--measurement-interval", type=int, default=2000, help="ms per perf_analyzer window")
    ap.add_argument("--stability", type=int, default=20,
                    help="perf_analyzer's --stability-percentage: the last three windows within this %% of each other")
    ap.add_argument("--max-trials", type=int, default=6, help="windows before perf_analyzer gives up on stability")
    ap.add_argument("--pin", action="store_true", help="servers on core 0, perf_analyzer on core 1")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.fetch:
        fetch()
        return
    if not args.perf_analyzer.exists():
        raise SystemExit(f"no perf_analyzer at {args.perf_analyzer}: run with --fetch first, or --perf-analyzer PATH")
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(ROOT / "examples" / "models" / args.model, repo / args.model,
                        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "model.pt"))
        if not any(a.startswith("--devices") for a in args.server_arg):
            args.server_arg.append("--devices=none")
        servers = start_servers(args, repo, Path(tmp))
        results = []
        try:
            for run in range(1, args.runs + 1):
                for protocol in args.protocols:
                    for c in args.concurrency:
                        for s in servers:
                            point = {"run": run, "server": s.name, "protocol": protocol, "c": c,
                                     **measure(s, protocol, c, args)}
                            print(json.dumps(point), flush=True)
                            results.append(point)
        finally:
            for s in servers:
                s.stop()
    names = [s.name for s in servers]
    print()
    print(table(results, names, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": args.model, "server_args": args.server_arg, "cpus": len(os.sched_getaffinity(0)), "pin": args.pin, "command": " ".join(sys.argv),
                "measurement_interval_ms": args.measurement_interval, "stability_pct": args.stability,
                "max_trials": args.max_trials}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
