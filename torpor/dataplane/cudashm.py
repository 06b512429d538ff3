"""CUDA shared-memory regions: a client's device buffer opened through its CUDA IPC handle.

The client (tritonclient.utils.cuda_shared_memory) allocates device memory, takes its
`cudaIpcMemHandle_t` (64 opaque bytes) and registers it; the server opens the handle and reads
inputs from / writes outputs to that device memory in place.

This talks to the CUDA driver (`libcuda.so.1`) through ctypes, so it needs no Python CUDA
package: any machine with the NVIDIA driver can open regions, and a machine without one answers
registration with a clear error. Runtime-API IPC handles (cudaIpcGetMemHandle, what cupy,
torch and cuda-python hand out) are driver-API handles, so either side may use either API.
Imported lazily by torpor.dataplane.shm.
"""

from __future__ import annotations

import ctypes
import threading

from torpor.errors import Status, TorporError, invalid_arg

IPC_HANDLE_SIZE = 64
_CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1

CUdeviceptr = ctypes.c_uint64


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_SIZE)]


class _Driver:
    """The few driver entry points used here, loaded once."""

    _instance: _Driver | None = None
    _error: str | None = None
    _lock = threading.Lock()

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.lock = threading.Lock()

        def fn(*names):
            for n in names:
                f = getattr(lib, n, None)
                if f is not None:
                    f.restype = ctypes.c_int
                    return f
            raise OSError(f"CUDA driver lacks {names[0]}")

        self.cuInit = fn("cuInit")
        self.cuGetErrorString = fn("cuGetErrorString")
        self.cuDeviceGet = fn("cuDeviceGet")
        self.cuDeviceGetCount = fn("cuDeviceGetCount")
        self.cuDevicePrimaryCtxRetain = fn("cuDevicePrimaryCtxRetain")
        self.cuDevicePrimaryCtxRelease = fn("cuDevicePrimaryCtxRelease_v2", "cuDevicePrimaryCtxRelease")
        self.cuCtxPushCurrent = fn("cuCtxPushCurrent_v2", "cuCtxPushCurrent")
        self.cuCtxPopCurrent = fn("cuCtxPopCurrent_v2", "cuCtxPopCurrent")
        self.cuIpcOpenMemHandle = fn("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        self.cuIpcOpenMemHandle.argtypes = [ctypes.POINTER(CUdeviceptr), _IpcHandle, ctypes.c_uint]
        self.cuIpcCloseMemHandle = fn("cuIpcCloseMemHandle")
        self.cuIpcCloseMemHandle.argtypes = [CUdeviceptr]
        self.cuMemcpyDtoH = fn("cuMemcpyDtoH_v2", "cuMemcpyDtoH")
        self.cuMemcpyDtoH.argtypes = [ctypes.c_void_p, CUdeviceptr, ctypes.c_size_t]
        self.cuMemcpyHtoD = fn("cuMemcpyHtoD_v2", "cuMemcpyHtoD")
        self.cuMemcpyHtoD.argtypes = [CUdeviceptr, ctypes.c_void_p, ctypes.c_size_t]
        self.check(self.cuInit(0), "cuInit")

    def error_text(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self.cuGetErrorString(code, ctypes.byref(s)) == 0 and s.value:
            return f"{s.value.decode(errors='replace')} ({code})"
        return f"CUDA error {code}"

    def check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed: {self.error_text(code)}")

    @classmethod
    def get(cls) -> _Driver:
        with cls._lock:
            if cls._instance is not None:
                return cls._instance
            if cls._error is None:
                try:
                    lib = ctypes.CDLL("libcuda.so.1")
                except OSError:
                    cls._error = "the CUDA driver (libcuda.so.1) was not found on this server"
                else:
                    try:
                        cls._instance = cls(lib)
                        return cls._instance
                    except (OSError, RuntimeError) as e:
                        cls._error = f"the CUDA driver could not be initialised: {e}"
            raise TorporError(
                Status.UNSUPPORTED,
                f"CUDA shared memory is not available: {cls._error}. "
                "Use system shared memory, or run the server on a machine with a CUDA GPU.",
            )


class CudaRegion:
    def __init__(self, name: str, raw_handle: bytes, device_id: int, byte_size: int):
        if len(raw_handle) != IPC_HANDLE_SIZE:
            raise invalid_arg(
                f"failed to register CUDA shared memory region '{name}': raw_handle must be a "
                f"{IPC_HANDLE_SIZE}-byte cudaIpcMemHandle_t, got {len(raw_handle)} bytes"
            )
        if byte_size <= 0:
            raise invalid_arg(f"failed to register CUDA shared memory region '{name}': byte_size must be positive")
        drv = _Driver.get()
        count = ctypes.c_int()
        drv.check(drv.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        if device_id < 0 or device_id >= count.value:
            raise invalid_arg(
                f"failed to register CUDA shared memory region '{name}': device {device_id} does not exist "
                f"({count.value} CUDA device(s))"
            )
        self.name = name
        self.device_id = int(device_id)
        self.byte_size = int(byte_size)
        self._drv = drv
        self._dev = ctypes.c_int()
        self._ctx = ctypes.c_void_p()
        self._ptr = CUdeviceptr(0)
        self._closed = False
        self.users = 0  # requests in flight that named the region (torpor.dataplane.shm)
        self.awaiting_unregister = False
        with drv.lock:
            drv.check(drv.cuDeviceGet(ctypes.byref(self._dev), self.device_id), "cuDeviceGet")
            drv.check(drv.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), self._dev), "cuDevicePrimaryCtxRetain")
            handle = _IpcHandle()
            ctypes.memmove(ctypes.byref(handle), raw_handle, IPC_HANDLE_SIZE)
            try:
                self._push()
                try:
                    code = drv.cuIpcOpenMemHandle(
                        ctypes.byref(self._ptr), handle, _CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
                    )
                finally:
                    self._pop()
                if code != 0:
                    raise invalid_arg(
                        f"failed to register CUDA shared memory region '{name}': unable to open the CUDA IPC "
                        f"handle: {drv.error_text(code)}"
                    )
            except BaseException:
                drv.cuDevicePrimaryCtxRelease(self._dev)
                raise

    def _push(self) -> None:
        self._drv.check(self._drv.cuCtxPushCurrent(self._ctx), "cuCtxPushCurrent")

    def _pop(self) -> None:
        old = ctypes.c_void_p()
        self._drv.cuCtxPopCurrent(ctypes.byref(old))

    def status(self) -> dict:
        return {"name": self.name, "device_id": self.device_id, "byte_size": self.byte_size}

    def _check_range(self, offset: int, size: int) -> None:
        if self._closed:
            raise invalid_arg(f"CUDA shared memory region '{self.name}' is closed")
        if offset < 0 or offset >= self.byte_size:
            raise invalid_arg(f"Invalid offset for shared memory region: '{self.name}'")
        if size < 0 or offset + size > self.byte_size:
            raise invalid_arg(f"Invalid offset + byte size for shared memory region: '{self.name}'")

    def read(self, offset: int, size: int) -> bytes:
        """Copy `size` bytes at `offset` from the device into host memory."""
        self._check_range(offset, size)
        buf = ctypes.create_string_buffer(size)
        if size:
            with self._drv.lock:
                self._push()
                try:
                    code = self._drv.cuMemcpyDtoH(buf, self._ptr.value + offset, size)
                finally:
                    self._pop()
            if code != 0:
                raise TorporError(Status.INTERNAL, f"reading CUDA shared memory region '{self.name}' failed: "
                                  f"{self._drv.error_text(code)}")
        return buf.raw

    def write(self, offset: int, data) -> None:
        """Copy host bytes into the device buffer at `offset`."""
        data = bytes(data)
        self._check_range(offset, len(data))
        if not data:
            return
        src = ctypes.create_string_buffer(data, len(data))
        with self._drv.lock:
            self._push()
            try:
                code = self._drv.cuMemcpyHtoD(self._ptr.value + offset, src, len(data))
            finally:
                self._pop()
        if code != 0:
            raise TorporError(Status.INTERNAL, f"writing CUDA shared memory region '{self.name}' failed: "
                              f"{self._drv.error_text(code)}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._drv.lock:
            try:
                self._push()
                try:
                    self._drv.cuIpcCloseMemHandle(self._ptr)
                finally:
                    self._pop()
            finally:
                self._drv.cuDevicePrimaryCtxRelease(self._dev)


def open_region(name: str, raw_handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
    """Open a client's CUDA IPC handle as a registered region (raises TorporError)."""
    return CudaRegion(name, bytes(raw_handle), int(device_id), int(byte_size))
