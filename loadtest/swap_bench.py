"""Swap-in benchmark: is a cold model's first answer about max(transfer, compute)?

    python loadtest/swap_bench.py --device cuda --json swap_bench.json
    python loadtest/swap_bench.py --device cpu            # small inputs; a minute or two

For a ResNet-50-shaped, a BERT-base-shaped and a ~1 GB WideMLP model (`torpor.adapters.networks`),
through the real swap engine (`torpor.runtime.residency.DevicePool`, the path the Engine uses):

- native: latency of a request when the model is resident (acquire + forward, outputs on host)
- cold pipelined: the model evicted first; acquire issues every group copy at once and the
  forward runs while they land, each layer group waiting only for its own copy
- cold not pipelined: evicted; acquire, wait until every group has landed, then run
- pinned H2D bandwidth: one plain large copy from a pinned buffer into device memory on the
  same copy stream (CUDA event timing); on CPU, a memcpy through the same copy thread
- swap bandwidth: model bytes / copy-stream time of the pipelined swap-ins
- d2d bandwidth: peer copy of the resident model into a second arena (two logical devices on
  one GPU: `cuda:0,0`; on CPU two virtual devices)
- floor = max(bytes / pinned bandwidth, native latency)

Targets (CUDA): pipelined cold <= 1.25 x floor + 1 ms; swap bandwidth >= 85% of pinned;
non-pipelined slower than pipelined. Timings are medians over `--reps` after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def adapter_module(name: str):
    """`adapters.<name>`, or the file itself where the package's __init__ cannot be imported
    (it needs the web stack; a bare CUDA machine has only torch and numpy)."""
    try:
        return importlib.import_module(f"adapters.{name}")
    except ImportError:
        spec = importlib.util.spec_from_file_location(f"_adapters_{name}", ROOT / "adapters" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


_networks = adapter_module("networks")
BertEncoder, ResNet50, WideMLP = _networks.BertEncoder, _networks.ResNet50, _networks.WideMLP
module_layer_groups = adapter_module("weights").module_layer_groups

from torpor.runtime.devices import open_devices, parse_devices
from torpor.runtime.hoststore import allocate_slab
from torpor.runtime.partition import MiB, PartitionRule
from torpor.runtime.residency import DevicePool


def build_models(device: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    cpu = device == "cpu"
    hidden, layers = (args.wide_hidden or (4096 if cpu else 8192)), args.wide_layers
    seq = args.seq or (64 if cpu else 128)
    batch = args.batch
    specs = {
        "resnet50": (lambda: ResNet50(), lambda: (torch.randn(batch, 3, 224, 224),)),
        "bert_base": (
            lambda: BertEncoder(),
            lambda: (torch.randint(1, 30000, (batch, seq)), torch.ones(batch, seq, dtype=torch.int64)),
        ),
        f"wide_mlp_{hidden}x{layers}": (
            lambda: WideMLP(hidden, layers),
            lambda: (torch.randn(batch, hidden),),
        ),
    }
    wanted = args.models.split(",") if args.models else list(specs)
    out = []
    for name, (make, inputs) in specs.items():
        if not any(name.startswith(w) for w in wanted):
            continue
        torch.manual_seed(0)
        t0 = time.perf_counter()
        module = make().eval().requires_grad_(False)
        out.append({"name": name, "module": module, "inputs": inputs(), "build_s": time.perf_counter() - t0})
    return out


async def measure_pinned(pool: DevicePool, nbytes: int, reps: int) -> float:
    """Bytes/s of one plain copy of `nbytes` from a pinned buffer into device memory, on the
    device's copy stream (the same stream setup the swapper uses)."""
    dev = pool.devices[0]
    src, _method, registration = allocate_slab(nbytes, pin=dev.kind == "cuda")
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev.torch_device)
    best = 0.0
    for _ in range(reps + 1):
        batch = dev.issue_copies([(dst, src, None)])
        await dev.wait(batch.events[-1])
        best = max(best, nbytes / batch.seconds())
    del dst
    if registration is not None:
        registration.close()  # the copies are done; unregister before the buffer is freed
    return best


async def request(
    pool: DevicePool, key: str, inputs: tuple, device: int = 0, pipelined: bool = True
) -> tuple[float, Any, str]:
    t0 = time.perf_counter()
    async with pool.acquire(key, device) as p:
        if not pipelined:
            await p.ready()
        out = await p.forward(*inputs)
    return time.perf_counter() - t0, out, p.outcome


async def bench_model(
    pool: DevicePool, m: dict[str, Any], rule: PartitionRule, pinned_bw: float, reps: int, d2d: bool
) -> dict:
    key = m["name"]
    t0 = time.perf_counter()
    hm = pool.register(key, module_layer_groups(m["module"]), m["module"], rule=rule)
    register_s = time.perf_counter() - t0
    nbytes = sum(g.nbytes for g in hm.groups)
    x = m["inputs"]

    moves = [0]

    async def cold(pipelined: bool) -> tuple[float, float]:
        assert pool.evict(key, device=0) in (0, 1)
        # Land at a different offset each time (a one-block pad in front, or not), so every cold
        # request pays for re-pointing the module at new addresses, as under real churn.
        moves[0] += 1
        if moves[0] % 2:
            await pool.prefetch(PAD, device=0)
        else:
            pool.evict(PAD, device=0)
        dt, _, outcome = await request(pool, key, x, 0, pipelined)
        assert outcome == "host", outcome
        c = pool.counters(key)
        return dt, c["last_swap_seconds"]

    # warm-up: clone creation, kernel selection, allocator growth (excluded from the numbers)
    await cold(True)
    await cold(False)
    for _ in range(2):
        await request(pool, key, x)
    native = [(await request(pool, key, x))[0] for _ in range(reps)]
    pipe, pipe_swap, nopipe = [], [], []
    for _ in range(reps):
        dt, swap_s = await cold(True)
        pipe.append(dt)
        pipe_swap.append(swap_s)
        dt, _ = await cold(False)
        nopipe.append(dt)
    # correctness while we are here: cold and resident answers agree
    pool.evict(key, device=0)
    _, out_cold, _ = await request(pool, key, x)
    _, out_warm, _ = await request(pool, key, x)
    same = all(torch.equal(a, b) for a, b in zip(_flat(out_cold), _flat(out_warm), strict=True))

    d2d_bw = None
    if d2d and len(pool.devices) > 1:
        speeds = []
        await request(pool, key, x, 0)
        for _ in range(max(2, reps // 2) + 1):
            pool.evict(key, device=1)
            async with pool.acquire(key, 1, source="peer") as p:
                assert p.outcome == "peer"
                await p.ready()
                speeds.append(nbytes / p.resident.batch.seconds())
        pool.evict(key, device=1)
        d2d_bw = statistics.median(speeds[1:])

    med = statistics.median
    native_s, pipe_s, nopipe_s = med(native), med(pipe), med(nopipe)
    swap_bw = nbytes / med(pipe_swap)
    floor_s = max(nbytes / pinned_bw, native_s)
    result = {
        "model": key,
        "bytes": nbytes,
        "groups": len(hm.groups),
        "pin_method": hm.pin_method,
        "register_s": register_s,
        "native_ms": native_s * 1e3,
        "cold_pipelined_ms": pipe_s * 1e3,
        "cold_not_pipelined_ms": nopipe_s * 1e3,
        "transfer_ms": nbytes / pinned_bw * 1e3,
        "floor_ms": floor_s * 1e3,
        "pipelined_over_floor": pipe_s / floor_s,
        "swap_gbps": swap_bw / 1e9,
        "pinned_gbps": pinned_bw / 1e9,
        "swap_over_pinned": swap_bw / pinned_bw,
        "d2d_gbps": None if d2d_bw is None else d2d_bw / 1e9,
        "cold_equals_resident": same,
        "target_latency_met": pipe_s <= 1.25 * floor_s + 1e-3,
        "target_bandwidth_met": swap_bw >= 0.85 * pinned_bw,
        "non_pipelined_slower": nopipe_s > pipe_s,
        "samples_ms": {
            "native": [v * 1e3 for v in native],
            "pipelined": [v * 1e3 for v in pipe],
            "not_pipelined": [v * 1e3 for v in nopipe],
        },
    }
    await pool.unregister(key)
    return result


def _flat(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _flat(x)]
    if isinstance(v, dict):
        return [t for x in v.values() for t in _flat(x)]
    return []


def environment(device: str) -> dict[str, Any]:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            env["pcie"] = (
                f"gen{pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)} x{pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)}"
            )
            pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001 - informational only
            env["nvml"] = str(e)
    return env


def table(rows: list[dict], device: str = "cuda") -> str:
    """The report as text; the targets are CUDA targets (on CPU copy and compute share cores
    and memory bandwidth, so they are shown for information only)."""
    cols = [
        ("model", "model", "{}"),
        ("MB", "bytes", "{:.0f}"),
        ("groups", "groups", "{}"),
        ("native ms", "native_ms", "{:.2f}"),
        ("cold pipe ms", "cold_pipelined_ms", "{:.2f}"),
        ("cold no-pipe ms", "cold_not_pipelined_ms", "{:.2f}"),
        ("floor ms", "floor_ms", "{:.2f}"),
        ("pipe/floor", "pipelined_over_floor", "{:.2f}"),
        ("swap GB/s", "swap_gbps", "{:.1f}"),
        ("pinned GB/s", "pinned_gbps", "{:.1f}"),
        ("swap/pinned", "swap_over_pinned", "{:.0%}"),
        ("d2d GB/s", "d2d_gbps", "{:.1f}"),
        ("CUDA targets" if device == "cuda" else "CUDA targets (n/a on cpu)", None, "{}"),
    ]
    lines = []
    header = [c[0] for c in cols]
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in cols:
            if key is None:
                ok = r["target_latency_met"] and r["target_bandwidth_met"] and r["non_pipelined_slower"]
                missed = "missed: " if device == "cuda" else "not met: "
                cells.append(
                    "met"
                    if ok
                    else missed
                    + ",".join(
                        n
                        for n, f in (
                            ("latency", "target_latency_met"),
                            ("bandwidth", "target_bandwidth_met"),
                            ("no-pipe slower", "non_pipelined_slower"),
                        )
                        if not r[f]
                    )
                )
            elif key == "bytes":
                cells.append(fmt.format(r[key] / 1e6))
            elif r.get(key) is None:
                cells.append("-")
            else:
                cells.append(fmt.format(r[key]))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("-+-".join("-" * w for w in widths))
    for b in body:
        lines.append(" | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
    return "\n".join(lines)


PAD = "_pad"  # a one-block model that shifts where the benchmarked model lands


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    models = build_models(args.device, args)
    largest = max(
        sum(t.numel() * t.element_size() for t in m["module"].state_dict().values()) for m in models
    )
    capacity = int(largest * 1.2) + 64 * MiB
    spec = "cuda:0,0" if args.device == "cuda" else "cpu:2"
    if args.no_d2d:
        spec = "cuda:0" if args.device == "cuda" else "cpu:1"
    pool = DevicePool(open_devices(parse_devices(spec, memory_bytes=capacity)))
    pool.register(PAD, [("pad", {"w": torch.zeros((pool.memories[0].block_bytes - 4096) // 4)})])
    rule = PartitionRule(target_bytes=int(args.target_mib * MiB), first_bytes=int(args.first_mib * MiB))
    try:
        pinned_bw = await measure_pinned(pool, min(largest, 1 << 30), reps=5)
        rows = []
        for m in models:
            row = await bench_model(pool, m, rule, pinned_bw, args.reps, not args.no_d2d)
            row["build_s"] = m["build_s"]
            rows.append(row)
            print(f"  {m['name']}: done", file=sys.stderr, flush=True)
        return {
            "device": args.device,
            "devices": spec,
            "environment": environment(args.device),
            "partition": {"target_bytes": rule.target_bytes, "first_bytes": rule.first_bytes},
            "batch": args.batch,
            "reps": args.reps,
            "pinned_gbps": pinned_bw / 1e9,
            "models": rows,
        }
    finally:
        pool.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--models", default="", help="comma list of prefixes: resnet50,bert_base,wide_mlp")
    ap.add_argument("--reps", type=int, default=None, help="measured repetitions (default: 20 cuda, 3 cpu)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="BERT sequence length (default 128 cuda, 64 cpu)")
    ap.add_argument(
        "--wide-hidden", type=int, default=None, help="WideMLP width (default 8192 cuda, 4096 cpu)"
    )
    ap.add_argument("--wide-layers", type=int, default=4)
    ap.add_argument("--target-mib", type=float, default=8.0, help="copy group target size")
    ap.add_argument("--first-mib", type=float, default=1.0, help="first copy group cap")
    ap.add_argument("--no-d2d", action="store_true", help="skip the device-to-device measurement")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 20 if args.device == "cuda" else 3
    report = asyncio.run(main_async(args))
    env = report["environment"]
    print(
        f"device {args.device} ({env.get('gpu', 'virtual CPU devices')}), torch {env['torch']}, "
        f"batch {args.batch}, groups <= {args.target_mib:g} MiB (first {args.first_mib:g} MiB), "
        f"pinned H2D {report['pinned_gbps']:.1f} GB/s"
    )
    print(table(report["models"], args.device))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
