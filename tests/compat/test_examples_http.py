"""Triton's own HTTP example clients, run unmodified against Torpor.

They live in triton-inference-server/client (src/python/examples); point
TRITON_CLIENT_EXAMPLES at that folder. Skipped when it is absent (as in CI): the behaviour
they check is covered by tests/server/test_http.py on its own.
"""

from __future__ import annotations

import pytest

from ..conftest import SIMPLE_MODELS, TRITON_EXAMPLES, Server, make_repo, run_example

pytestmark = pytest.mark.skipif(not TRITON_EXAMPLES.is_dir(), reason="Triton client examples not available")

SCRIPTS = [
    ["simple_http_infer_client.py"],
    ["simple_http_async_infer_client.py"],
    ["simple_http_aio_infer_client.py"],
    ["simple_http_string_infer_client.py"],
    ["simple_http_health_metadata.py"],
    ["simple_http_sequence_sync_infer_client.py"],
    ["simple_http_shm_client.py"],
    ["simple_http_shm_string_client.py"],
    ["reuse_infer_objects_client.py", "-i", "http"],
]


@pytest.fixture(scope="module")
def shm_server(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("exrepo"), SIMPLE_MODELS)
    s = Server(repo, "--allow-client-shm", "true").start(tmp_path_factory.mktemp("exlogs"))
    yield s
    s.stop()


@pytest.mark.parametrize("args", SCRIPTS, ids=lambda a: a[0])
def test_http_example(shm_server, args):
    r = run_example(args, shm_server.http_url)
    assert r.returncode == 0, r.stdout + r.stderr


def test_http_model_control_example(start_server, simple_repo):
    s = start_server(simple_repo, "--model-control-mode", "explicit")
    r = run_example(["simple_http_model_control.py"], s.http_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS: model control" in r.stdout
