"""Client shared memory over HTTP and gRPC: system regions (POSIX shm), and the clear error CUDA
registration gives without CUDA. (CUDA IPC regions on a CUDA machine: tests/gpu/test_cuda_shm.py.)"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from ..conftest import make_repo

PROTOCOLS = ["http", "grpc"]


def make_client(server, protocol):
    if protocol == "http":
        return httpclient, httpclient.InferenceServerClient(server.http_url)
    return grpcclient, grpcclient.InferenceServerClient(server.grpc_url)


def status_names(client, protocol, cuda=False):
    st = client.get_cuda_shared_memory_status() if cuda else client.get_system_shared_memory_status()
    if protocol == "http":
        return sorted(r["name"] for r in st)
    return sorted(st.regions)


@pytest.fixture
def regions():
    """Create POSIX shm regions with tritonclient's helper; destroyed at the end."""
    made = []

    def _make(byte_size: int):
        key = f"/torpor_test_{uuid.uuid4().hex[:12]}"
        h = shm.create_shared_memory_region(key.strip("/"), key, byte_size)
        made.append(h)
        return key, h

    yield _make
    for h in made:
        shm.destroy_shared_memory_region(h)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_system_shm_inputs_and_outputs(server, regions, protocol):
    mod, c = make_client(server, protocol)
    c.unregister_system_shared_memory()
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), 3, dtype=np.int32)
    in_key, in_h = regions(128)
    out_key, out_h = regions(128)
    shm.set_shared_memory_region(in_h, [a, b])
    c.register_system_shared_memory("in_region", in_key, 128)
    c.register_system_shared_memory("out_region", out_key, 128)
    assert status_names(c, protocol) == ["in_region", "out_region"]
    st = c.get_system_shared_memory_status("in_region")
    if protocol == "http":
        assert st == [{"name": "in_region", "key": in_key, "offset": 0, "byte_size": 128}]
    else:
        r = st.regions["in_region"]
        assert (r.name, r.key, r.offset, r.byte_size) == ("in_region", in_key, 0, 128)

    ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    ins[0].set_shared_memory("in_region", 64)
    ins[1].set_shared_memory("in_region", 64, offset=64)
    outs = [mod.InferRequestedOutput("OUTPUT0"), mod.InferRequestedOutput("OUTPUT1")]
    outs[0].set_shared_memory("out_region", 64)
    outs[1].set_shared_memory("out_region", 64, offset=64)
    r = c.infer("simple", ins, outputs=outs)
    out0 = r.get_output("OUTPUT0")
    if protocol == "grpc":
        # an shm output still has its (empty) raw entry, aligned with `outputs`
        resp = r.get_response()
        assert len(resp.raw_output_contents) == 2 and resp.raw_output_contents[0] == b""
        assert list(out0.shape) == [1, 16]
    else:
        assert out0["shape"] == [1, 16]
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.int32, [1, 16]), a + b)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(out_h, np.int32, [1, 16], offset=64), a - b)

    # mixed: one input inline, one from shm; outputs inline
    ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    ins[0].set_data_from_numpy(a)
    ins[1].set_shared_memory("in_region", 64, offset=64)
    r = c.infer("simple", ins)
    np.testing.assert_array_equal(r.as_numpy("OUTPUT1"), a - b)

    c.unregister_system_shared_memory("in_region")
    assert status_names(c, protocol) == ["out_region"]
    c.unregister_system_shared_memory()
    assert status_names(c, protocol) == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_system_shm_bytes(server, regions, protocol):
    mod, c = make_client(server, protocol)
    c.unregister_system_shared_memory()
    a = np.array([str(i).encode() for i in range(16)], dtype=np.object_).reshape(1, 16)
    b = np.array([b"1"] * 16, dtype=np.object_).reshape(1, 16)
    sa, sb = serialize_byte_tensor(a), serialize_byte_tensor(b)
    na, nb = len(sa.item()), len(sb.item())  # serialized tensors are one bytes object each
    size = na + nb
    key, h = regions(size)
    shm.set_shared_memory_region(h, [sa, sb])
    c.register_system_shared_memory("str_in", key, size)
    ins = [mod.InferInput("INPUT0", [1, 16], "BYTES"), mod.InferInput("INPUT1", [1, 16], "BYTES")]
    ins[0].set_shared_memory("str_in", na)
    ins[1].set_shared_memory("str_in", nb, offset=na)
    r = c.infer("simple_string", ins)
    got = [int(x) for x in r.as_numpy("OUTPUT0").reshape(-1)]
    assert got == [i + 1 for i in range(16)]
    c.unregister_system_shared_memory()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_system_shm_errors(server, regions, protocol):
    mod, c = make_client(server, protocol)
    c.unregister_system_shared_memory()
    key, h = regions(64)
    c.register_system_shared_memory("r1", key, 64)

    def expect(fn, code_http, code_grpc, text):
        with pytest.raises(InferenceServerException) as e:
            fn()
        assert e.value.status() == (code_http if protocol == "http" else code_grpc), e.value.message()
        assert text in e.value.message(), e.value.message()

    # duplicate name, missing key, region larger than the segment
    expect(lambda: c.register_system_shared_memory("r1", key, 64), "400", "StatusCode.ALREADY_EXISTS",
           "shared memory region 'r1' already in manager")
    # Triton's status for it (its gRPC client test matches "[StatusCode.INTERNAL] Unable to open ...")
    expect(lambda: c.register_system_shared_memory("r2", "/no_such_torpor_key", 64), "500",
           "StatusCode.INTERNAL", "Unable to open shared memory region: '/no_such_torpor_key'")
    expect(lambda: c.register_system_shared_memory("r3", key, 128), "400", "StatusCode.INVALID_ARGUMENT",
           "exceeds")
    expect(lambda: c.get_system_shared_memory_status("nope"), "404", "StatusCode.NOT_FOUND",
           "Unable to find system shared memory region: 'nope'")

    def infer_with(region, byte_size, offset=0, out=None):
        ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
        ins[0].set_shared_memory(region, byte_size, offset=offset)
        ins[1].set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
        outs = None
        if out is not None:
            outs = [mod.InferRequestedOutput("OUTPUT0")]
            outs[0].set_shared_memory(*out)
        return c.infer("simple", ins, outputs=outs)

    expect(lambda: infer_with("nope", 64), "404", "StatusCode.NOT_FOUND", "Unable to find shared memory region: 'nope'")
    expect(lambda: infer_with("r1", 64, offset=32), "400", "StatusCode.INVALID_ARGUMENT",
           "Invalid offset + byte size for shared memory region: 'r1'")
    expect(lambda: infer_with("r1", 32), "400", "StatusCode.INVALID_ARGUMENT", "unexpected total byte size 32")
    expect(lambda: infer_with("r1", 64, out=("r1", 64, 16)), "400", "StatusCode.INVALID_ARGUMENT",
           "Invalid offset + byte size for shared memory region: 'r1'")
    expect(lambda: infer_with("r1", 64, out=("r1", 32)), "400", "StatusCode.INVALID_ARGUMENT",
           "but the output needs 64 bytes")
    # the server keeps serving
    ins = [mod.InferInput("INPUT0", [1, 16], "INT32"), mod.InferInput("INPUT1", [1, 16], "INT32")]
    ins[0].set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    ins[1].set_data_from_numpy(np.ones((1, 16), dtype=np.int32))
    np.testing.assert_array_equal(c.infer("simple", ins).as_numpy("OUTPUT0"), np.full((1, 16), 2))
    c.unregister_system_shared_memory()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_shm_disabled_by_default(start_server, tmp_path, protocol):
    s = start_server(make_repo(tmp_path / "repo", ["simple"]))
    _, c = make_client(s, protocol)
    with pytest.raises(InferenceServerException) as e:
        c.register_system_shared_memory("r", "/whatever", 64)
    assert "Client shared memory is disabled" in e.value.message()
    assert e.value.status() == ("501" if protocol == "http" else "StatusCode.UNIMPLEMENTED")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cuda_shm_without_cuda_answers_clearly(server, protocol):
    from torpor.dataplane import cudashm
    from torpor.errors import TorporError

    try:
        cudashm._Driver.get()
    except TorporError:
        pass
    else:
        pytest.skip("CUDA driver present: see tests/gpu/test_cuda_shm.py")
    _, c = make_client(server, protocol)
    import base64

    with pytest.raises(InferenceServerException) as e:
        c.register_cuda_shared_memory("cuda0", base64.b64encode(b"\0" * 64), 0, 64)
    assert "CUDA shared memory is not available" in e.value.message()
    assert e.value.status() == ("501" if protocol == "http" else "StatusCode.UNIMPLEMENTED")
    assert status_names(c, protocol, cuda=True) == []
