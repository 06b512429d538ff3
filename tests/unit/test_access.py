"""Control-plane restrictions, the pure parts: `--http-restricted-api` / `--grpc-restricted-protocol`
parsing and the API group of every HTTP route and gRPC method. (Through a server:
tests/server/test_control_plane.py.)"""

from __future__ import annotations

import pytest
from torpor.api.access import GROUPS, parse_restrictions
from torpor.api.grpc import METHOD_GROUP
from torpor.api.http import http_group
from tritonclient.grpc import service_pb2 as pb


def test_parse_restrictions():
    r = parse_restrictions(["model-repository,trace:Admin-Key=v:with=colon"], "--http-restricted-api")
    assert set(r) == {"model-repository", "trace"}
    assert r["trace"].header == "admin-key" and r["trace"].value == "v:with=colon"
    g = parse_restrictions(["inference:k=v"], "--grpc-restricted-protocol", "triton-grpc-protocol-")
    assert g["inference"].header == "triton-grpc-protocol-k"
    assert g["inference"].allows("v") and not g["inference"].allows("w") and not g["inference"].allows(None)
    for bad, fragment in [("nope:k=v", "unknown restricted api 'nope'"), ("trace", "expected"), ("trace:k", "expected"),
                          ("trace:=v", "expected"), (":k=v", "expected")]:
        with pytest.raises(ValueError, match=fragment):
            parse_restrictions([bad], "--http-restricted-api")
    with pytest.raises(ValueError, match="multiple config groups"):
        parse_restrictions(["trace:a=1", "trace,logging:b=2"], "--http-restricted-api")


@pytest.mark.parametrize("path,group", [
    ("/v2", "metadata"), ("/v2/health/live", "health"), ("/v2/health/ready", "health"),
    ("/v2/models/m", "metadata"), ("/v2/models/m/versions/1", "metadata"),
    ("/v2/models/m/ready", "health"), ("/v2/models/m/versions/2/ready", "health"),
    ("/v2/models/m/infer", "inference"), ("/v2/models/m/versions/1/infer", "inference"),
    ("/v2/models/m/generate", "inference"), ("/v2/models/m/config", "model-config"),
    ("/v2/models/stats", "statistics"), ("/v2/models/m/stats", "statistics"),
    ("/v2/repository/index", "model-repository"), ("/v2/repository/models/m/load", "model-repository"),
    ("/v2/systemsharedmemory/status", "shared-memory"), ("/v2/cudasharedmemory/region/r/register", "shared-memory"),
    ("/v2/trace/setting", "trace"), ("/v2/models/m/trace/setting", "trace"), ("/v2/logging", "logging"),
    ("/v2/torpor/residency", "statistics"), ("/nope", None), ("/v2/models/m/bogus", None),
])
def test_http_groups(path, group):
    assert http_group(path) == group


def test_every_grpc_method_has_a_group():
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}
    assert set(METHOD_GROUP) == rpcs
    assert set(METHOD_GROUP.values()) == set(GROUPS)
