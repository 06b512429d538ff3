"""OpenAPI for the endpoints whose bodies FastAPI cannot see: they read the raw body (never
pydantic, see api/http.py), so their request bodies, headers and answers are described here and
attached to the routes with `openapi_extra`. The description is what schemathesis tests against
(tests/server/test_openapi_fuzz.py)."""

from __future__ import annotations

from torpor.datatypes import NUMPY_DTYPES

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
_PARAMS = {"type": "object", "additionalProperties": {"type": ["string", "number", "integer", "boolean"]}}


def _errors(*codes: int) -> dict:
    what = {400: "the request is malformed or invalid", 403: "a restricted API called without its key",
            404: "unknown model or version", 415: "unsupported Content-Encoding",
            500: "the model failed (or, for a load, 'failed to load ...', as Triton answers)",
            501: "not supported here (Triton's UNSUPPORTED)", 503: "unavailable: exiting, queue full, timeout"}
    return {str(c): {"description": what[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string", "enum": list(NUMPY_DTYPES)},
        "parameters": _PARAMS,
        "data": {"type": "array"},
    },
}
_OUTPUT = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, "parameters": _PARAMS}}

INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMS,
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": _OUTPUT},
    },
}
INFER_RESPONSE = {
    "type": "object",
    "required": ["model_name", "model_version", "outputs"],
    "properties": {
        "id": {"type": "string"},
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "parameters": {"type": "object"},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}

INFER = {
    "summary": "Inference (KServe v2 JSON tensors; Triton's binary tensor extension)",
    "description": "The body is JSON, or with `Inference-Header-Content-Length` a JSON header followed by "
                   "the binary tensors it announces (`binary_data_size`). `Content-Encoding: gzip|deflate` "
                   "is accepted. Answered by the raw ASGI fast path (api/http.py InferFastPath).",
    "parameters": [
        {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
         "schema": {"type": "integer", "minimum": 0}},
    ],
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": INFER_REQUEST},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    "responses": {
        "200": {"description": "the outputs (binary outputs after the JSON header)",
                "content": {"application/json": {"schema": INFER_RESPONSE},
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        **_errors(400, 403, 404, 415, 500, 501, 503),
    },
}

_JSON_BODY = {"required": False, "content": {"application/json": {"schema": {"type": "object"}}}}

REPOSITORY_INDEX = {
    "requestBody": {"required": False, "content": {"application/json": {
        "schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
    "responses": {"200": {"description": "one entry per model version", "content": {"application/json": {
        "schema": {"type": "array", "items": {"type": "object"}}}}}, **_errors(400, 403)},
}
REPOSITORY_LOAD = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"parameters": {"type": "object", "additionalProperties": {"type": "string"},
                                                        "description": "`config` (JSON) and `file:<path>` (base64)"}}}}}},
    "responses": {"200": {"description": "loaded (empty body)"}, **_errors(400, 403, 500, 503)},
}
REPOSITORY_UNLOAD = {
    "requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"parameters": {"type": "object", "properties": {
            "unload_dependents": {"type": "boolean"}}}}}}}},
    "responses": {"200": {"description": "unloaded (empty body)"}, **_errors(400, 403, 503)},
}
SETTINGS = {"requestBody": _JSON_BODY,
            "responses": {"200": {"description": "the settings now", "content": {"application/json": {
                "schema": {"type": "object"}}}}, **_errors(400, 403, 404, 501)}}
SHM_REGISTER = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["key", "byte_size"],
        "properties": {"key": {"type": "string"}, "offset": {"type": "integer"}, "byte_size": {"type": "integer"}}}}}},
    "responses": {"200": {"description": "registered (empty body)"}, **_errors(400, 403, 404, 501)},
}
CUDA_SHM_REGISTER = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["raw_handle", "byte_size"],
        "properties": {"raw_handle": {"type": "object", "properties": {"b64": {"type": "string"}}},
                       "device_id": {"type": "integer"}, "byte_size": {"type": "integer"}}}}}},
    "responses": {"200": {"description": "registered (empty body)"}, **_errors(400, 403, 404, 501)},
}
# every other route: the error shape and the Triton-mandated statuses it may answer with
GENERIC = {"responses": _errors(400, 403, 404, 501, 503)}
