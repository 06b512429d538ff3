"""Soak: mixed traffic with injected faults against one server for a set time; reports requests
sent, answered and failed by cause, and the server's memory over time (RSS, and the bytes models
hold on the devices), with a PNG plot.

    python loadtest/soak.py --duration 600 --devices cpu          # starts its own server
    python loadtest/soak.py --duration 60 --out /tmp/soak          # a short run

Traffic (closed loop, --concurrency workers, HTTP and gRPC alternating): `simple` and
`simple_string` (answers checked), four small PyTorch-eager MLPs late-bound to the devices (an
arena that holds about two, so they swap), and faults: a model that raises, one that answers with
the wrong shape, one that hangs past the request's `timeout`, malformed HTTP bodies, gRPC calls
whose client deadline expires mid-request (the server cancels them), a queue-limited model hit in
bursts, and a reload of a serving model every 20 s. Each reply is classified by what that request
should have got; "lost" counts requests that got no answer at all (transport errors, client
timeouts) and "unexpected" answers that were not what the request should have got. A good run
has both at zero. RSS growth compares the median of the last minute with the median of the
minute after --warmup.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fault_models import write_fault_models
from tests.models import mlp_config

HIDDEN = 256
MLPS = [f"mlp{i}" for i in range(4)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_repo(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for m in ("simple", "simple_string"):
        shutil.copytree(ROOT / "examples" / "models" / m, dest / m, ignore=shutil.ignore_patterns("__pycache__"))
    write_fault_models(dest, ["good", "raises", "wrong_shape", "hangs"])
    write_fault_models_queued(dest)
    for i, name in enumerate(MLPS):
        (dest / name / "1").mkdir(parents=True, exist_ok=True)
        (dest / name / "config.pbtxt").write_text(mlp_config(name, 7 + i, HIDDEN))
    return dest


def write_fault_models_queued(dest: Path) -> None:
    from tests.fault_models import _QUEUED_CONFIG, CODE
    from tests.models import write_model

    write_model(dest, "queued", _QUEUED_CONFIG.format(name="queued"), CODE["hangs"])


class Tally:
    def __init__(self):
        self.sent = 0
        self.answered = 0
        self.ok = 0
        self.expected_failures: collections.Counter = collections.Counter()
        self.unexpected: collections.Counter = collections.Counter()
        self.lost: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}

    def note(self, bucket: collections.Counter, cause: str, detail: str = "") -> None:
        bucket[cause] += 1
        if detail and cause not in self.examples:
            self.examples[cause] = detail[:300]


def _is_transport(text: str) -> bool:
    t = text.lower()
    return any(s in t for s in ("connect", "reset", "broken pipe", "eof", "timed out", "server disconnected",
                                "stream removed", "socket closed"))


async def worker(idx: int, args, stop_at: float, tally: Tally, http_url: str, grpc_url: str) -> None:
    import aiohttp
    import tritonclient.grpc.aio as gaio
    import tritonclient.http.aio as haio
    from tritonclient.utils import InferenceServerException

    rng = random.Random(idx)
    h = haio.InferenceServerClient(http_url, conn_timeout=30)
    g = gaio.InferenceServerClient(grpc_url)
    session = aiohttp.ClientSession()
    kinds = (["simple"] * 6 + ["simple_string"] * 2 + ["mlp"] * 5 + ["good"] * 2 + ["raises", "wrong_shape",
             "hangs_timeout", "malformed", "grpc_cancel", "queued"])
    try:
        while time.monotonic() < stop_at:
            kind = rng.choice(kinds)
            use_grpc = rng.random() < 0.5
            mod = gaio if use_grpc else haio
            c = g if use_grpc else h
            tally.sent += 1
            try:
                if kind == "malformed":
                    body = rng.choice([b'{"inputs": [', b"[]", b'{"inputs":[{"name":"INPUT0","shape":[1,16],'
                                       b'"datatype":"INT32","data":[1,2]}]}', os.urandom(64)])
                    async with session.post(f"http://{http_url}/v2/models/simple/infer", data=body,
                                            timeout=aiohttp.ClientTimeout(total=30)) as r:
                        text = await r.text()
                    tally.answered += 1
                    if r.status == 400 and '"error"' in text:
                        tally.note(tally.expected_failures, "malformed -> 400")
                    else:
                        tally.note(tally.unexpected, f"malformed -> {r.status}", text)
                    continue
                if kind == "grpc_cancel":
                    x = gaio.InferInput("INPUT0", [1], "INT32")
                    x.set_data_from_numpy(np.array([400], dtype=np.int32))
                    try:
                        await g.infer("hangs", [x], client_timeout=0.05)
                        tally.answered += 1
                        tally.note(tally.unexpected, "grpc_cancel answered")
                    except InferenceServerException as e:
                        # the client gave up; the server cancels the call (nothing is owed)
                        tally.answered += 1
                        if "Deadline" in str(e) or "DEADLINE" in str(e.status()):
                            tally.note(tally.expected_failures, "client deadline (cancelled)")
                        else:
                            tally.note(tally.unexpected, "grpc_cancel: " + str(e.status()), str(e))
                    continue
                expect, result = await _one(kind, rng, mod, c, use_grpc)
                tally.answered += 1
                if expect is None:
                    tally.ok += 1
                else:
                    tally.note(tally.unexpected, f"{kind}: answered, expected {expect}")
            except InferenceServerException as e:
                text = str(e)
                if _is_transport(text) and not any(s in text for s in ("Request timeout expired", "Exceeds maximum")):
                    tally.note(tally.lost, f"{kind}: transport", text)
                    continue
                tally.answered += 1
                cause = _expected_cause(kind, text)
                if cause:
                    tally.note(tally.expected_failures, cause)
                else:
                    tally.note(tally.unexpected, f"{kind}: {e.status()}", text)
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                tally.note(tally.lost, f"{kind}: {type(e).__name__}", str(e))
    finally:
        await h.close()
        await g.close()
        await session.close()


def _expected_cause(kind: str, text: str) -> str | None:
    if kind == "raises" and "this model raises" in text:
        return "model raises -> INTERNAL"
    if kind == "wrong_shape" and "but its config expects" in text:
        return "wrong output shape -> INTERNAL"
    if kind == "hangs_timeout" and "Request timeout expired" in text:
        return "request timeout -> UNAVAILABLE"
    if kind == "queued" and ("Exceeds maximum queue size" in text or "Request timeout expired" in text):
        return "queue full -> UNAVAILABLE"
    return None


async def _one(kind: str, rng: random.Random, mod, c, use_grpc: bool):
    """(what was expected instead, result) for a request that was answered successfully."""
    if kind in ("simple", "simple_string"):
        a = np.array([rng.randrange(1000) for _ in range(16)], dtype=np.int32).reshape(1, 16)
        b = np.ones((1, 16), dtype=np.int32)
        dt = "INT32"
        if kind == "simple_string":
            a, b, dt = a.astype(np.bytes_).astype(np.object_), b.astype(np.bytes_).astype(np.object_), "BYTES"
        ins = [mod.InferInput("INPUT0", [1, 16], dt), mod.InferInput("INPUT1", [1, 16], dt)]
        ins[0].set_data_from_numpy(a)
        ins[1].set_data_from_numpy(b)
        r = await c.infer(kind, ins)
        out = r.as_numpy("OUTPUT0")
        if kind == "simple_string":
            out = out.astype(np.int64)
            want = a.astype(np.int64) + 1
        else:
            want = a + 1
        if not np.array_equal(out, want):
            return "correct sums", r
        return None, r
    if kind == "mlp":
        name = rng.choice(MLPS)
        x = np.full((1, HIDDEN), 0.01, dtype=np.float32)
        i = mod.InferInput("input", [1, HIDDEN], "FP32")
        i.set_data_from_numpy(x)
        r = await c.infer(name, [i])
        return (None if r.as_numpy("output").shape == (1, HIDDEN) else "output of shape [1,256]"), r
    x = mod.InferInput("INPUT0", [1, 1] if kind == "queued" else [1], "INT32")
    if kind == "good":
        x.set_data_from_numpy(np.array([21], dtype=np.int32))
        r = await c.infer("good", [x])
        return (None if int(r.as_numpy("OUTPUT0")[0]) == 42 else "42"), r
    if kind == "hangs_timeout":
        x.set_data_from_numpy(np.array([300], dtype=np.int32))  # sleeps 300 ms, allowed 50 ms
        r = await c.infer("hangs", [x], timeout=50_000)
        return "a timeout", r
    if kind == "queued":
        x.set_data_from_numpy(np.array([[30]], dtype=np.int32))
        r = await c.infer("queued", [x])
        return None, r
    x.set_data_from_numpy(np.array([1], dtype=np.int32))
    r = await c.infer(kind, [x])  # raises, wrong_shape
    return "a failure", r


async def reloader(stop_at: float, http_url: str, tally: Tally) -> None:
    import tritonclient.http.aio as haio
    from tritonclient.utils import InferenceServerException

    c = haio.InferenceServerClient(http_url)
    try:
        while time.monotonic() + 20 < stop_at:
            await asyncio.sleep(20)
            tally.sent += 1
            try:
                await c.load_model("good")
                tally.answered += 1
                tally.ok += 1
            except InferenceServerException as e:
                tally.answered += 1
                tally.note(tally.unexpected, "reload failed", str(e))
    finally:
        await c.close()


def _device_bytes(http_url: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/torpor/residency", timeout=5) as r:
            doc = json.loads(r.read())
    except OSError:
        return -1
    return sum(int(d.get("used_bytes", 0)) for d in doc.get("devices", []))


async def sampler(pid: int, stop_at: float, every: float, http_url: str, samples: list, tally: Tally, t0: float):
    import psutil

    proc = psutil.Process(pid)
    while True:
        now = time.monotonic()
        rss = proc.memory_info().rss
        dev = await asyncio.to_thread(_device_bytes, http_url)
        samples.append({"t": round(now - t0, 1), "rss": rss, "device_bytes": dev, "sent": tally.sent,
                        "answered": tally.answered})
        if now >= stop_at:
            return
        await asyncio.sleep(min(every, max(0.0, stop_at - now)))


def _median(vals):
    return statistics.median(vals) if vals else float("nan")


def summarize(args, tally: Tally, samples: list, exit_code) -> dict:
    warm_end = args.warmup
    first = [s["rss"] for s in samples if warm_end <= s["t"] < warm_end + 60]
    last = [s["rss"] for s in samples if s["t"] >= samples[-1]["t"] - 60]
    base, end = _median(first), _median(last)
    return {
        "duration_s": args.duration,
        "concurrency": args.concurrency,
        "devices": args.devices,
        "sent": tally.sent,
        "answered": tally.answered,
        "succeeded": tally.ok,
        "expected_failures": dict(tally.expected_failures),
        "unexpected": dict(tally.unexpected),
        "lost": dict(tally.lost),
        "lost_total": sum(tally.lost.values()),
        "unexpected_total": sum(tally.unexpected.values()),
        "examples": tally.examples,
        "rss_after_warmup_mb": round(base / 2**20, 1),
        "rss_last_minute_mb": round(end / 2**20, 1),
        "rss_max_mb": round(max(s["rss"] for s in samples) / 2**20, 1),
        "rss_growth_pct": round(100 * (end - base) / base, 2) if base == base and base else None,
        "device_bytes_max": max(s["device_bytes"] for s in samples),
        "server_exit_code": exit_code,
        "samples": samples,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["samples"]
    t = [x["t"] / 60 for x in s]
    fig, ax = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax[0].plot(t, [x["rss"] / 2**20 for x in s], label="server RSS (MiB)")
    ax[0].plot(t, [x["device_bytes"] / 2**20 for x in s], label="model bytes on devices (MiB)")
    ax[0].axvline(report.get("warmup_s", 60) / 60, color="grey", ls=":", label="end of warm-up")
    ax[0].set_ylabel("MiB")
    ax[0].legend(loc="center right")
    ax[0].set_title(f"soak: {report['sent']} sent, {report['answered']} answered, {report['lost_total']} lost, "
                    f"{report['unexpected_total']} unexpected; RSS growth {report['rss_growth_pct']}%")
    rates = [0.0] + [(b["answered"] - a["answered"]) / max(1e-9, b["t"] - a["t"]) for a, b in zip(s, s[1:])]
    ax[1].plot(t, rates)
    ax[1].set_ylabel("answers / s")
    ax[1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="torpor-soak-"))
    proc = None
    try:
        if args.url:
            http_url, grpc_url, pid = args.url, args.grpc_url, args.pid
        else:
            repo = build_repo(workdir / "repo")
            hp, gp, mp = _free_port(), _free_port(), _free_port()
            cmd = [sys.executable, "-m", "torpor.cli", "serve", "--model-repository", str(repo),
                   "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--http-port", str(hp),
                   "--grpc-port", str(gp), "--metrics-port", str(mp), "--devices", args.devices,
                   "--device-memory-bytes", args.device_memory, "--model-control-mode", "explicit",
                   "--load-model", "*", "--max-queue-size", "64"]
            log = open(workdir / "server.log", "wb")
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            http_url, grpc_url, pid = f"127.0.0.1:{hp}", f"127.0.0.1:{gp}", proc.pid
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    print((workdir / "server.log").read_text(), file=sys.stderr)
                    return 1
                await asyncio.sleep(0.2)
        tally = Tally()
        samples: list = []
        t0 = time.monotonic()
        stop_at = t0 + args.duration
        tasks = [asyncio.create_task(worker(i, args, stop_at, tally, http_url, grpc_url))
                 for i in range(args.concurrency)]
        tasks.append(asyncio.create_task(reloader(stop_at, http_url, tally)))
        tasks.append(asyncio.create_task(sampler(pid, stop_at, args.sample_every, http_url, samples, tally, t0)))
        await asyncio.gather(*tasks)
        exit_code = None
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                exit_code = await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                exit_code = "killed after 60 s"
        report = summarize(args, tally, samples, exit_code)
        report["warmup_s"] = args.warmup
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(report, indent=1))
        plot(report, out / "soak.png")
        brief = {k: v for k, v in report.items() if k not in ("samples",)}
        print(json.dumps(brief, indent=1))
        print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}")
        good = report["lost_total"] == 0 and report["unexpected_total"] == 0
        return 0 if good else 2
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds before the RSS baseline")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--devices", default="cpu")
    p.add_argument("--device-memory", default="4MiB",
                   help="arena per device: two 2 MiB blocks, so two of the four ~1 MiB MLPs fit and they swap")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--out", default=str(ROOT / "loadtest" / "results" / "soak"))
    p.add_argument("--url", help="an already running server's HTTP host:port (then also --grpc-url, --pid)")
    p.add_argument("--grpc-url")
    p.add_argument("--pid", type=int)
    args = p.parse_args()
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
