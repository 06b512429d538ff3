"""GPU discovery and interconnect topology through NVML (pynvml), with clean fallbacks.

`discover()` never raises: without the NVML library, without a driver, or on any
`pynvml.NVMLError`, it returns what torch can tell (device count, names, memory) or an empty
topology, with `error` saying why. The scheduler reads it to know which GPUs share a PCIe switch
(concurrent host swaps split their bandwidth) and which pairs have NVLink or P2P (peer copies).

NVML indices follow the driver's order; CUDA ordinals may differ (CUDA_VISIBLE_DEVICES,
CUDA_DEVICE_ORDER), so GPUs are matched to CUDA ordinals by PCI bus id when torch exposes it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

_log = logging.getLogger("torpor.runtime.topology")

# nvmlDeviceGetTopologyCommonAncestor levels, nearest first (values as NVML defines them).
_TOPOLOGY_LEVELS = {
    0: "internal",
    10: "single_switch",
    20: "multiple_switches",
    30: "host_bridge",
    40: "numa_node",
    50: "system",
}


@dataclass(slots=True)
class GpuInfo:
    nvml_index: int
    cuda_ordinal: int | None
    name: str
    uuid: str = ""
    pci_bus_id: str = ""
    total_bytes: int = 0
    free_bytes: int = 0
    pcie_generation: int | None = None
    pcie_width: int | None = None
    pcie_max_generation: int | None = None
    pcie_max_width: int | None = None


@dataclass(slots=True)
class Topology:
    """What is known about the GPUs. Pairs are CUDA ordinals (i, j) with i < j."""

    gpus: list[GpuInfo] = field(default_factory=list)
    nvlink_links: dict[tuple[int, int], int] = field(default_factory=dict)  # active links per pair
    p2p: set[tuple[int, int]] = field(default_factory=set)  # peer access possible (any link)
    common_ancestor: dict[tuple[int, int], str] = field(default_factory=dict)  # PCIe path level
    source: str = "none"  # "nvml" | "torch" | "none"
    error: str | None = None

    def pcie_siblings(self, ordinal: int) -> list[int]:
        """GPUs behind the same PCIe switch as `ordinal` (they share its host link)."""
        out = []
        for (i, j), level in self.common_ancestor.items():
            if level in ("internal", "single_switch") and ordinal in (i, j):
                out.append(j if i == ordinal else i)
        return sorted(out)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "error": self.error,
            "gpus": [asdict(g) for g in self.gpus],
            "nvlink_links": {f"{i}-{j}": n for (i, j), n in sorted(self.nvlink_links.items())},
            "p2p": [f"{i}-{j}" for i, j in sorted(self.p2p)],
            "common_ancestor": {f"{i}-{j}": lv for (i, j), lv in sorted(self.common_ancestor.items())},
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _norm_bus_id(bus_id: str) -> str:
    # NVML: "00000000:3B:00.0"; torch: "0000:3b:00.0" or similar. Compare the last 3 fields.
    parts = bus_id.strip().lower().split(":")
    return ":".join(parts[-2:]) if len(parts) >= 2 else bus_id.lower()


def _torch_bus_ids() -> dict[str, int]:
    """PCI bus id -> CUDA ordinal, where torch reports it."""
    try:
        import torch

        if not torch.cuda.is_available():
            return {}
        out = {}
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            bus = getattr(p, "pci_bus_id", None)
            dev = getattr(p, "pci_device_id", None)
            if bus is None or dev is None:
                return {}
            out[f"{int(bus):02x}:{int(dev):02x}.0"] = i
        return out
    except Exception:  # noqa: BLE001 - topology is best effort
        return {}


def _discover_nvml() -> Topology:
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()
    try:
        topo = Topology(source="nvml")
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        bus_to_ordinal = _torch_bus_ids()
        for i, h in enumerate(handles):
            info = GpuInfo(nvml_index=i, cuda_ordinal=None, name=_text(pynvml.nvmlDeviceGetName(h)))
            for attr, call in (
                ("uuid", lambda h=h: _text(pynvml.nvmlDeviceGetUUID(h))),
                ("pci_bus_id", lambda h=h: _text(pynvml.nvmlDeviceGetPciInfo(h).busId)),
                ("pcie_generation", lambda h=h: pynvml.nvmlDeviceGetCurrPcieLinkGeneration(h)),
                ("pcie_width", lambda h=h: pynvml.nvmlDeviceGetCurrPcieLinkWidth(h)),
                ("pcie_max_generation", lambda h=h: pynvml.nvmlDeviceGetMaxPcieLinkGeneration(h)),
                ("pcie_max_width", lambda h=h: pynvml.nvmlDeviceGetMaxPcieLinkWidth(h)),
            ):
                try:
                    setattr(info, attr, call())
                except pynvml.NVMLError:
                    pass
            try:
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                info.total_bytes, info.free_bytes = int(mem.total), int(mem.free)
            except pynvml.NVMLError:
                pass
            if bus_to_ordinal and info.pci_bus_id:
                info.cuda_ordinal = bus_to_ordinal.get(_norm_bus_id(info.pci_bus_id))
            elif not bus_to_ordinal:
                info.cuda_ordinal = i  # same order assumed (CUDA_DEVICE_ORDER=PCI_BUS_ID is common)
            topo.gpus.append(info)
        ordinal = {g.nvml_index: g.cuda_ordinal for g in topo.gpus}
        by_bus = {_norm_bus_id(g.pci_bus_id): g.nvml_index for g in topo.gpus if g.pci_bus_id}

        def pair(a: int, b: int) -> tuple[int, int] | None:
            oa, ob = ordinal.get(a), ordinal.get(b)
            if oa is None or ob is None or oa == ob:
                return None
            return (min(oa, ob), max(oa, ob))

        max_links = getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)
        for i, h in enumerate(handles):
            for link in range(max_links):
                try:
                    if pynvml.nvmlDeviceGetNvLinkState(h, link) != pynvml.NVML_FEATURE_ENABLED:
                        continue
                    remote = _text(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(h, link).busId)
                except pynvml.NVMLError:
                    continue
                j = by_bus.get(_norm_bus_id(remote))
                p = pair(i, j) if j is not None else None
                if p is not None and i < j:  # count each link once, from the lower NVML index
                    topo.nvlink_links[p] = topo.nvlink_links.get(p, 0) + 1
        p2p_read = getattr(pynvml, "NVML_P2P_CAPS_INDEX_READ", 0)
        for i in range(count):
            for j in range(i + 1, count):
                p = pair(i, j)
                if p is None:
                    continue
                try:
                    level = pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[i], handles[j])
                    topo.common_ancestor[p] = _TOPOLOGY_LEVELS.get(int(level), str(level))
                except pynvml.NVMLError:
                    pass
                try:
                    status = pynvml.nvmlDeviceGetP2PStatus(handles[i], handles[j], p2p_read)
                    if status == getattr(pynvml, "NVML_P2P_STATUS_OK", 0):
                        topo.p2p.add(p)
                except pynvml.NVMLError:
                    pass
        return topo
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _discover_torch(error: str | None) -> Topology:
    topo = Topology(source="none", error=error)
    try:
        import torch

        if not torch.cuda.is_available():
            return topo
        topo.source = "torch"
        n = torch.cuda.device_count()
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            topo.gpus.append(
                GpuInfo(
                    nvml_index=i, cuda_ordinal=i, name=p.name, total_bytes=int(total), free_bytes=int(free)
                )
            )
        for i in range(n):
            for j in range(i + 1, n):
                if torch.cuda.can_device_access_peer(i, j):
                    topo.p2p.add((i, j))
    except Exception as e:  # noqa: BLE001 - topology is best effort
        topo.error = f"{error}; torch: {e}" if error else str(e)
    return topo


def discover() -> Topology:
    """The GPUs and their links; never raises (see the module docstring)."""
    try:
        import pynvml
    except ImportError as e:
        return _discover_torch(f"pynvml not installed: {e}")
    try:
        return _discover_nvml()
    except pynvml.NVMLError as e:
        _log.debug("NVML unavailable: %s", e)
        return _discover_torch(f"NVML: {e}")
