"""Triton's own gRPC example clients (and the HTTP shm one), run unmodified against Torpor.

They live in triton-inference-server/client (src/python/examples); point
TRITON_CLIENT_EXAMPLES at that folder. Skipped when it is absent (as in CI): the behaviour
they check is covered by tests/server/test_grpc.py and tests/server/test_shm.py on their own.
"""

from __future__ import annotations

import pytest

from ..conftest import SIMPLE_MODELS, TRITON_EXAMPLES, Server, make_repo, run_example

pytestmark = pytest.mark.skipif(not TRITON_EXAMPLES.is_dir(), reason="Triton client examples not available")

# Triton's gRPC L0 repository: the 7 example models plus simple_string_dyna_sequence (8).
GRPC_L0_MODELS = SIMPLE_MODELS + ["simple_string_dyna_sequence"]

# (script and args, protocol, what it prints last when it passes)
SCRIPTS = [
    (["simple_grpc_infer_client.py"], "grpc", "PASS: infer"),
    (["simple_grpc_aio_infer_client.py"], "grpc", "PASS: grpc aio infer"),
    (["simple_grpc_async_infer_client.py"], "grpc", "PASS: Async infer"),
    (["simple_grpc_string_infer_client.py"], "grpc", "PASS: string"),
    (["simple_grpc_health_metadata.py"], "grpc", None),
    (["simple_grpc_sequence_stream_infer_client.py"], "grpc", "PASS: Sequence"),
    (["simple_grpc_sequence_stream_infer_client.py", "-d"], "grpc", "PASS: Sequence"),
    (["simple_grpc_aio_sequence_stream_infer_client.py"], "grpc", "PASS: grpc aio sequence stream"),
    (["simple_grpc_sequence_sync_infer_client.py"], "grpc", "PASS: Sequence"),
    (["simple_grpc_custom_repeat.py"], "grpc", "PASS: Decoupled API"),
    (["simple_grpc_custom_args_client.py"], "grpc", "PASS: CustomArgs"),
    (["simple_grpc_keepalive_client.py"], "grpc", "PASS: KeepAlive"),
    (["grpc_explicit_int_content_client.py"], "grpc", "PASS: explicit int"),
    (["grpc_explicit_byte_content_client.py"], "grpc", "PASS: explicit string"),
    (["grpc_explicit_int8_content_client.py"], "grpc", "PASS: explicit int8"),
    (["simple_grpc_shm_client.py"], "grpc", "PASS: system shared memory"),
    (["simple_grpc_shm_string_client.py"], "grpc", "PASS: system shared memory"),
    (["reuse_infer_objects_client.py", "-i", "grpc"], "grpc", None),
]


@pytest.fixture(scope="module")
def l0_server(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("grpc_exrepo"), GRPC_L0_MODELS)
    s = Server(repo, "--allow-client-shm", "true").start(tmp_path_factory.mktemp("grpc_exlogs"))
    yield s
    s.stop()


@pytest.mark.parametrize("args,protocol,expect", SCRIPTS, ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_grpc_example(l0_server, args, protocol, expect):
    if not (TRITON_EXAMPLES / args[0]).exists():
        pytest.skip(f"{args[0]} not in this client checkout")
    url = l0_server.grpc_url if protocol == "grpc" else l0_server.http_url
    r = run_example(args, url)
    assert r.returncode == 0, r.stdout + r.stderr
    if expect is not None:
        assert expect in r.stdout, r.stdout


def test_grpc_model_control_example(start_server, tmp_path):
    repo = make_repo(tmp_path / "repo", GRPC_L0_MODELS)
    s = start_server(repo, "--model-control-mode", "explicit")
    r = run_example(["simple_grpc_model_control.py"], s.grpc_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: model control" in r.stdout
