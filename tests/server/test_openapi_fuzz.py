"""schemathesis against the HTTP API's own OpenAPI description (served at /openapi.json), with a
bounded number of examples per operation: no request may crash the server or get a 5xx that the
description does not name for that operation (Triton's own: 500 'failed to load ...' for a load,
501 UNSUPPORTED, 503 UNAVAILABLE), and every error is `{"error": "..."}`."""

from __future__ import annotations

import json
import urllib.request

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings

from ..conftest import Server, make_repo

EXAMPLES = 15  # per operation: about 550 requests, well under a minute on two cores


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    repo = make_repo(tmp_path_factory.mktemp("st_repo"), ["simple", "simple_string", "simple_identity"])
    s = Server(repo, "--model-control-mode", "explicit", "--load-model", "*").start(tmp_path_factory.mktemp("st_logs"))
    yield f"http://{s.http_url}"
    assert s.stop() == 0, s.log()[-3000:]


def _check(case, base_url: str) -> None:
    response = case.call(timeout=30)
    status = response.status_code
    documented = case.operation.definition.raw.get("responses", {})
    if status >= 500:
        assert str(status) in documented, f"{case.operation.label}: undocumented {status}: {response.text[:300]}"
        if status == 500:
            assert case.operation.path.endswith("/load") and "failed to load" in response.json()["error"]
    if status >= 400:
        body = json.loads(response.content)
        assert isinstance(body, dict) and isinstance(body.get("error"), str), response.text[:300]
    with urllib.request.urlopen(f"{base_url}/v2/health/live", timeout=10) as r:
        assert r.status == 200


def test_api_answers_every_request_in_its_own_shape(server_url):
    # schemathesis's pytest plugin does not load under this pytest; its strategies are driven
    # through hypothesis directly, one operation at a time
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert any(op.path.endswith("/infer") for op in operations)
    for op in operations:
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(op.as_strategy())
        def run(case):
            _check(case, server_url)

        run()
