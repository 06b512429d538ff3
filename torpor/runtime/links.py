"""The links between the host and the devices, as the cost model sees them: configured or measured.

`build_links(devices, spec)` returns the `torpor.scheduling.costmodel.LinkMap` the scheduler plans with:

- **Configured** (`spec`, from `--device-bandwidths` or a topology file; the format of
  `LinkMap.from_dict`): the numbers are taken as given. On CPU virtual devices they are also
  *emulated*: each device's copy thread paces a copy to its link's rate (`CpuDevice.link_rates`)
  and only pairs with a path may copy peer to peer, so a 4-device CPU server behaves like the
  node the file describes, at that node's speeds.
- **Measured** (no `spec`): on CUDA, the GPUs and their links come from NVML
  (`torpor.runtime.topology`: NVLink pairs, P2P access, GPUs behind one PCIe switch), and each host link
  and each peer pair is timed with a pinned 64 MiB copy (best of three after a warm-up; well
  under a second per GPU). On CPU devices a plain memcpy is timed once and used for every link.

Measured links say so (`measured: true` at `GET /v2/torpor/topology`), and the engine keeps
refining host links from real swaps (`CostModel.observe_swap`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torpor.scheduling.costmodel import GB, LinkMap, TopologyError

_log = logging.getLogger("torpor.runtime.links")

MEASURE_BYTES = 64 << 20
_SHORT_KEYS = {"pcie", "nvlink", "switch"}


def parse_bandwidth_spec(text: str) -> dict[str, Any]:
    """`--device-bandwidths` / `--topology`: a JSON file, inline JSON, or the short form
    `pcie=GBps[,nvlink=GBps]` (every device's host link; NVLink between every pair)."""
    text = text.strip()
    if not text:
        raise TopologyError("--device-bandwidths: empty")
    if text.startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise TopologyError(f"--device-bandwidths: not valid JSON: {e}") from None
    elif "=" in text and not Path(text).exists():
        spec = {}
        for part in text.split(","):
            k, _, v = part.partition("=")
            k = k.strip()
            if k not in _SHORT_KEYS:
                raise TopologyError(f"--device-bandwidths: unknown key {k!r}; expected one of {sorted(_SHORT_KEYS)}")
            try:
                spec[k] = float(v)
            except ValueError:
                raise TopologyError(f"--device-bandwidths: {k} must be a number of GB/s, got {v!r}") from None
        short = spec
        spec = {}
        if "pcie" in short:
            spec["pcie_GBps"] = short["pcie"]
        if "nvlink" in short:
            spec["nvlink_all_GBps"] = short["nvlink"]
        if "switch" in short:
            raise TopologyError("--device-bandwidths: PCIe switches need a topology file (\"switches\")")
    else:
        try:
            spec = json.loads(Path(text).read_text())
        except OSError as e:
            raise TopologyError(f"--device-bandwidths: cannot read {text}: {e}") from None
        except json.JSONDecodeError as e:
            raise TopologyError(f"--device-bandwidths: {text} is not valid JSON: {e}") from None
    if not isinstance(spec, dict):
        raise TopologyError("--device-bandwidths: expected a JSON object")
    return spec


def _expand(spec: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The short form's all-pairs NVLink as explicit pairs."""
    spec = dict(spec)
    bw = spec.pop("nvlink_all_GBps", None)
    if bw is not None:
        spec["nvlink"] = [[a, b, bw] for i, a in enumerate(names) for b in names[i + 1:]]
    return spec


def build_links(devices: Sequence[Any], spec: dict[str, Any] | None = None, *, measure: bool = True,
                nbytes: int = MEASURE_BYTES) -> LinkMap:
    """The LinkMap for a DevicePool's devices (see the module docstring)."""
    names = [d.name for d in devices]
    if spec is not None:
        links = LinkMap.from_dict(names, _expand(spec, names), where="--device-bandwidths")
        _emulate(devices, links)
        return links
    if devices and all(d.kind == "cuda" for d in devices):
        return _cuda_links(devices, measure=measure, nbytes=nbytes)
    links = LinkMap.from_dict(names, {"pcie_GBps": 5.0, "nvlink": [], "p2p": [
        [a, b] for i, a in enumerate(names) for b in names[i + 1:]]})
    if measure and devices:
        bw = measure_host(devices[0], nbytes)
        for n in names:
            links.set_bandwidth(f"pcie:{n}", bw, measured=True)
    return links


def _emulate(devices: Sequence[Any], links: LinkMap) -> None:
    """CPU virtual devices copy at the configured rates, and only where a path exists."""
    for d in devices:
        if d.kind != "cpu":
            continue
        rates = {"host": min(links.bandwidth(lk) for lk in links.host_path(d.name))}
        for s in devices:
            if s is d:
                continue
            path = links.peer_path(s.name, d.name)
            if path is not None:
                rates[s.name] = min(links.bandwidth(lk) for lk in path)
        d.link_rates = rates
        d.peers = {s for s in rates if s != "host"}


# ------------------------------------------------------------------------------------------------
# measurement
# ------------------------------------------------------------------------------------------------


def _best_rate(copy: Callable[[], None], sync: Callable[[], None], nbytes: int, repeats: int = 3) -> float:
    copy()
    sync()  # warm-up: first touch, lazy peer-access enablement, allocator
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        copy()
        sync()
        best = min(best, time.perf_counter() - t)
    return nbytes / max(best, 1e-9)


def _timed_copy(src_device: Any, dst_device: Any, nbytes: int, pin: bool) -> float:
    """Best-of-three bytes/s of one copy into `dst_device` from `src_device` (None: host, pinned
    if `pin`); the buffers are freed when it returns."""
    import torch

    src = (torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) if src_device is None
           else torch.empty(nbytes, dtype=torch.uint8, device=src_device.torch_device))
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dst_device.torch_device)
    cuda = [d.torch_device for d in (src_device, dst_device) if d is not None and d.kind == "cuda"]

    def sync() -> None:
        for d in cuda:
            torch.cuda.synchronize(d)

    return _best_rate(lambda: dst.copy_(src, non_blocking=bool(cuda)), sync, nbytes)


def measure_host(device: Any, nbytes: int = MEASURE_BYTES) -> float:
    """Bytes/s of a host -> device copy (pinned source on CUDA), best of three."""
    rate = _timed_copy(None, device, nbytes, pin=device.kind == "cuda")
    if device.kind == "cuda":
        import torch

        torch.cuda.empty_cache()  # the arenas' owner may ask for memory next
    return rate


def measure_peer(src_dev: Any, dst_dev: Any, nbytes: int = MEASURE_BYTES) -> float:
    """Bytes/s of a device -> device copy (P2P or NVLink where enabled), best of three."""
    import torch

    rate = _timed_copy(src_dev, dst_dev, nbytes, pin=False)
    torch.cuda.empty_cache()
    return rate


def _cuda_links(devices: Sequence[Any], *, measure: bool, nbytes: int) -> LinkMap:
    from torpor.runtime.topology import discover

    topo = discover()
    names = [d.name for d in devices]
    by_ordinal: dict[int, list[Any]] = {}
    for d in devices:
        by_ordinal.setdefault(d.ordinal, []).append(d)
    # GPUs behind one PCIe switch share its uplink (union of single-switch pairs)
    group: dict[int, int] = {o: o for o in by_ordinal}
    for (i, j), level in topo.common_ancestor.items():
        if level in ("internal", "single_switch") and i in group and j in group:
            a, b = group[i], group[j]
            for k, v in group.items():
                if v == b:
                    group[k] = a
    switches: dict[int, list[str]] = {}
    for o, g in group.items():
        switches.setdefault(g, []).extend(d.name for d in by_ordinal[o])
    spec: dict[str, Any] = {"switches": [g for g in switches.values() if len(g) > 1], "nvlink": [], "p2p": []}
    for i, a in enumerate(devices):
        for b in devices[i + 1:]:
            pair = (min(a.ordinal, b.ordinal), max(a.ordinal, b.ordinal))
            if a.ordinal == b.ordinal or topo.nvlink_links.get(pair, 0) > 0:
                # NVLink (or two logical devices on one GPU: a copy within its own memory)
                spec["nvlink"].append([a.name, b.name])
            elif pair in topo.p2p:
                spec["p2p"].append([a.name, b.name])
    links = LinkMap.from_dict(names, spec, where="topology")
    if not measure:
        return links
    t0 = time.perf_counter()
    for o, devs in by_ordinal.items():
        bw = measure_host(devs[0], nbytes)
        for d in devs:
            links.set_bandwidth(f"pcie:{d.name}", bw, measured=True)
    for a in devices:
        for b in devices:
            if a is b or links.peer_path(a.name, b.name) is None:
                continue
            path = links.peer_path(a.name, b.name)
            if len(path) == 1 and path[0].startswith("nvlink:"):
                links.set_bandwidth(path[0], measure_peer(a, b, nbytes), measured=True)
    _log.info("measured %d host and %d peer links in %.2f s", len(by_ordinal),
              sum(1 for v in links.measured.values() if v) - len(by_ordinal), time.perf_counter() - t0)
    return links


__all__ = ["GB", "MEASURE_BYTES", "build_links", "measure_host", "measure_peer", "parse_bandwidth_spec"]
