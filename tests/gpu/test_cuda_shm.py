"""Client CUDA shared memory (CUDA IPC regions) over HTTP and gRPC against a real server on a CUDA
machine. Skipped without a CUDA driver and device."""

from __future__ import annotations

import base64
import ctypes

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from ..server.test_shm import PROTOCOLS, make_client, status_names

pytestmark = pytest.mark.gpu


class _Cuda:
    """Just enough of the CUDA driver API to play the client: allocate, fill, export a handle."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")
        self._ok(self.lib.cuInit(0))
        dev = ctypes.c_int()
        self._ok(self.lib.cuDeviceGet(ctypes.byref(dev), 0))
        self.ctx = ctypes.c_void_p()
        self._ok(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev))
        self._ok(self.lib.cuCtxSetCurrent(self.ctx))

    @staticmethod
    def _ok(code):
        assert code == 0, f"CUDA driver error {code}"

    def alloc(self, size: int) -> int:
        ptr = ctypes.c_uint64()
        self._ok(self.lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)))
        return ptr.value

    def handle(self, ptr: int) -> bytes:
        buf = (ctypes.c_char * 64)()
        self._ok(self.lib.cuIpcGetMemHandle(buf, ctypes.c_uint64(ptr)))
        return bytes(buf)

    def put(self, ptr: int, data: bytes) -> None:
        self._ok(self.lib.cuMemcpyHtoD_v2(ctypes.c_uint64(ptr), data, ctypes.c_size_t(len(data))))

    def get(self, ptr: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        self._ok(self.lib.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(ptr), ctypes.c_size_t(size)))
        return buf.raw

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ctypes.c_uint64(ptr))


def _cuda_or_skip() -> _Cuda:
    try:
        return _Cuda()
    except (OSError, AssertionError) as e:
        pytest.skip(f"no CUDA device: {e}")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cuda_shm_roundtrip(server, protocol):
    """The server (another process, as CUDA IPC requires) reads inputs from and writes outputs to
    the client's device memory in place."""
    cuda = _cuda_or_skip()
    _, c = make_client(server, protocol)
    mod = httpclient if protocol == "http" else grpcclient
    c.unregister_cuda_shared_memory()
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 5, dtype=np.int32)
    d_in, d_out = cuda.alloc(128), cuda.alloc(128)
    try:
        cuda.put(d_in, a.tobytes() + b.tobytes())
        cuda.put(d_out, b"\0" * 128)
        c.register_cuda_shared_memory("cin", base64.b64encode(cuda.handle(d_in)), 0, 128)
        c.register_cuda_shared_memory("cout", base64.b64encode(cuda.handle(d_out)), 0, 128)
        assert status_names(c, protocol, cuda=True) == ["cin", "cout"]
        ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
        ins[0].set_shared_memory("cin", 64)
        ins[1].set_shared_memory("cin", 64, offset=64)
        outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
        outs[0].set_shared_memory("cout", 64)
        outs[1].set_shared_memory("cout", 64, offset=64)
        c.infer("simple", ins, outputs=outs)
        got = np.frombuffer(cuda.get(d_out, 128), dtype=np.int32)
        np.testing.assert_array_equal(got[:16], (a + b).reshape(-1))
        np.testing.assert_array_equal(got[16:], (a - b).reshape(-1))
        with pytest.raises(InferenceServerException) as e:
            ins[0].set_shared_memory("cin", 64, offset=96)
            c.infer("simple", ins)
        assert "Invalid offset + byte size" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            c.register_cuda_shared_memory("bad", base64.b64encode(b"\x07" * 64), 0, 128)
        assert "unable to open the CUDA IPC handle" in e.value.message()
        c.unregister_cuda_shared_memory()
        assert status_names(c, protocol, cuda=True) == []
    finally:
        cuda.free(d_in)
        cuda.free(d_out)
