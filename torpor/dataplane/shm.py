"""Client shared memory: registered regions that inputs are read from and outputs written to.

System regions are POSIX shm segments (`/dev/shm/<key>`) mapped with mmap. CUDA regions
(cudaIpcMemHandle) are opened lazily through torpor.dataplane.cudashm when CUDA is present. System and
CUDA regions share one name space, as in Triton.

As in Triton: registering and unregistering need `--allow-client-shm` (Triton's default since
2.69 as well), status answers either way; a region that requests in flight use stays registered
(listed, usable) when it is unregistered, and goes when the last of them finishes; keys that start
with the python backend's reserved prefix are refused.
"""

from __future__ import annotations

import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

from torpor.errors import Status, TorporError, already_exists, internal, invalid_arg, not_found

# Triton reserves shm keys with this prefix for its python backend's own regions (its common.h)
RESERVED_PREFIX = "triton_python_backend_shm_region_"


@dataclass
class SystemRegion:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap
    base: int  # where `offset` falls inside the mapping (mmap starts on a page boundary)
    users: int = 0  # requests in flight that named the region
    awaiting_unregister: bool = False  # unregistered while in use: goes when `users` drops to 0

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}

    def view(self, offset: int, size: int) -> memoryview:
        start = self.base + offset
        return memoryview(self.mapping)[start : start + size]

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            # a request still holds a view; the mapping is freed when the last view goes
            pass


class SharedMemoryManager:
    def __init__(self, allowed: bool = False):
        self.allowed = allowed
        self._lock = threading.Lock()
        self.system: dict[str, SystemRegion] = {}
        self.cuda: dict[str, Any] = {}  # name -> torpor.dataplane.cudashm.CudaRegion

    def _check_allowed(self) -> None:
        if not self.allowed:
            raise TorporError(
                Status.UNSUPPORTED,
                "Client shared memory is disabled. Start the server with "
                "'--allow-client-shm=true' to enable.",
            )

    def _check_new_name(self, name: str) -> None:
        if not name:
            raise invalid_arg("shared memory region name must not be empty")
        if name in self.system or name in self.cuda:
            raise already_exists(f"shared memory region '{name}' already in manager")

    @staticmethod
    def _check_key(name: str, key: str) -> None:
        """Triton's ValidateSharedMemoryKey: not all slashes, no reserved prefix after them."""
        bare = key.lstrip("/")
        if not bare:
            raise invalid_arg(f"cannot register shared memory region '{name}' - invalid shm key '{key}'")
        if bare.startswith(RESERVED_PREFIX):
            raise invalid_arg(f"cannot register shared memory region '{name}' with key '{key}' as the key "
                              f"contains the reserved prefix '{RESERVED_PREFIX}'")

    # system -------------------------------------------------------------------------------
    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_allowed()
        if offset < 0 or byte_size < 0:
            raise invalid_arg("shared memory offset and byte_size must not be negative")
        self._check_key(name, key)
        with self._lock:
            self._check_new_name(name)
            path = "/dev/shm/" + key.lstrip("/")
            # Triton's status and text (its clients' tests match both): INTERNAL, though the
            # key is usually the client's mistake (docs/compatibility.md)
            if "/" in key.lstrip("/"):
                raise internal(f"Unable to open shared memory region: '{key}'")
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                raise internal(f"Unable to open shared memory region: '{key}'") from None
            try:
                total = os.fstat(fd).st_size
                if offset + byte_size > total:
                    raise invalid_arg(
                        f"failed to register shared memory region '{name}': offset {offset} + "
                        f"byte_size {byte_size} exceeds the segment size {total}"
                    )
                if byte_size == 0:
                    raise invalid_arg(f"failed to register shared memory region '{name}': byte_size is 0")
                # mmap offsets must be page aligned: map from the aligned start, keep the rest as an offset
                start = offset - offset % mmap.ALLOCATIONGRANULARITY
                m = mmap.mmap(fd, byte_size + (offset - start), offset=start)
            finally:
                os.close(fd)
            self.system[name] = SystemRegion(name, key, offset, byte_size, m, offset - start)

    def system_status(self, name: str = "") -> list[dict]:
        with self._lock:
            if name:
                if name not in self.system:
                    raise not_found(f"Unable to find system shared memory region: '{name}'")
                return [self.system[name].status()]
            return [r.status() for r in self.system.values()]

    def unregister_system(self, name: str = "") -> None:
        self._check_allowed()
        with self._lock:
            for n in [name] if name else list(self.system):
                self._unregister(self.system, n)

    # cuda ---------------------------------------------------------------------------------
    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._check_allowed()
        with self._lock:
            self._check_new_name(name)
            from torpor.dataplane import cudashm  # imported lazily: needs CUDA

            self.cuda[name] = cudashm.open_region(name, raw_handle, device_id, byte_size)

    def cuda_status(self, name: str = "") -> list[dict]:
        with self._lock:
            if name:
                if name not in self.cuda:
                    raise not_found(f"Unable to find cuda shared memory region: '{name}'")
                return [self.cuda[name].status()]
            return [r.status() for r in self.cuda.values()]

    def unregister_cuda(self, name: str = "") -> None:
        self._check_allowed()
        with self._lock:
            for n in [name] if name else list(self.cuda):
                self._unregister(self.cuda, n)

    @staticmethod
    def _unregister(regions: dict, name: str) -> None:
        """Drop a region now, or (in use) mark it to go when its last request finishes."""
        region = regions.get(name)
        if region is None:
            return
        if region.users > 0:
            region.awaiting_unregister = True
            return
        del regions[name]
        region.close()

    # requests in flight -------------------------------------------------------------------
    def has_regions(self) -> bool:
        return bool(self.system or self.cuda)

    def pin(self, names: set[str]) -> list:
        """The registered regions among `names`, each counted as used by one more request
        (unregistering waits for them); hand the list back to `unpin` when the request is done."""
        pinned = []
        with self._lock:
            for n in names:
                region = self.system.get(n) or self.cuda.get(n)
                if region is not None:
                    region.users += 1
                    pinned.append(region)
        return pinned

    def unpin(self, pinned: list) -> None:
        with self._lock:
            for region in pinned:
                region.users -= 1
                if region.users == 0 and region.awaiting_unregister:
                    regions = self.system if isinstance(region, SystemRegion) else self.cuda
                    if regions.get(region.name) is region:
                        del regions[region.name]
                    region.close()

    # tensor I/O ---------------------------------------------------------------------------
    def _bounds(self, name: str, region_size: int, offset: int, size: int) -> None:
        # Triton's checks and texts (its tests match them)
        if offset < 0 or offset >= region_size:
            raise invalid_arg(f"Invalid offset for shared memory region: '{name}'")
        if size < 0 or offset + size > region_size:
            raise invalid_arg(f"Invalid offset + byte size for shared memory region: '{name}'")

    def read(self, name: str, offset: int, size: int) -> bytes | memoryview:
        """The bytes of an input tensor. System regions give a zero-copy view."""
        region = self.system.get(name)
        if region is not None:
            self._bounds(name, region.byte_size, offset, size)
            return region.view(offset, size)
        cregion = self.cuda.get(name)
        if cregion is not None:
            self._bounds(name, cregion.byte_size, offset, size)
            return cregion.read(offset, size)
        raise not_found(f"Unable to find shared memory region: '{name}'")

    def write(self, name: str, offset: int, size: int, data: bytes | memoryview) -> None:
        """Store an output tensor; `size` is the space the client reserved for it."""
        region = self.system.get(name)
        cregion = None if region is not None else self.cuda.get(name)
        if region is None and cregion is None:
            raise not_found(f"Unable to find shared memory region: '{name}'")
        region_size = region.byte_size if region is not None else cregion.byte_size
        self._bounds(name, region_size, offset, size)
        if len(data) > size:
            raise invalid_arg(
                f"shared memory size specified with the request for output is {size} bytes, "
                f"but the output needs {len(data)} bytes"
            )
        if region is not None:
            start = region.base + offset
            region.mapping[start : start + len(data)] = data
        else:
            cregion.write(offset, data)

    def close(self) -> None:
        with self._lock:
            for r in self.system.values():
                r.close()
            for r in self.cuda.values():
                r.close()
            self.system.clear()
            self.cuda.clear()
