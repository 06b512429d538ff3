"""KServe v2 / Triton HTTP front end (FastAPI on uvicorn).

A thin translation layer: read the raw body (never through pydantic: tritonclient sends no or
misleading Content-Types), decode into the engine's types, call the Engine, encode. Errors are
Triton's `{"error": "..."}` with Triton's status codes.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import time
import zlib
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from torpor.api.access import Restriction

from torpor.dataplane.engine import Engine
from torpor.errors import Status, TorporError, invalid_arg, unsupported
from torpor.tensors import InferRequest

from . import forward, openapi
from .http_codec import decode_infer_request, encode_infer_response

_HTTP_STATUS = {
    Status.INTERNAL: 500,
    Status.NOT_FOUND: 404,
    Status.UNAVAILABLE: 503,
    Status.UNSUPPORTED: 501,
}

JSON = "application/json"

log = logging.getLogger("torpor.http")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type=JSON)


def _error(message: str, status: int) -> Response:
    return _json({"error": message}, status)


def _empty() -> Response:
    return Response(b"", status_code=200)


def _check_version(version: str | None) -> str:
    if version is None:
        return ""
    if not version.isdigit():
        # Triton's routes only match numeric versions
        raise StarletteHTTPException(404)
    return version


async def _json_body(request: Request, allow_empty: bool = True) -> dict:
    raw = await request.body()
    if not raw.strip():
        if allow_empty:
            return {}
        raise invalid_arg("request body must not be empty")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise invalid_arg(f"failed to parse the request JSON buffer: {e}") from None
    if not isinstance(doc, dict):
        raise invalid_arg("request JSON must be an object")
    return doc


def too_large_text(headers, size: int | None, limit: int) -> str:
    """Triton's text for a request over --http-max-input-size (its clients' tests match it): a
    raw binary request's input, else the request JSON. Torpor bounds the whole body (Triton the
    JSON and each input); `size` None: more than `limit` (a body still arriving)."""
    n = f"{size} bytes" if size is not None else f"more than {limit} bytes"
    if headers.get("inference-header-content-length", "").strip() == "0":
        return (f"Raw input has a byte_size ({n}) that exceeds the maximum allowed value of {limit} bytes. "
                "Use --http-max-input-size to increase the limit.")
    return (f"request JSON size of {n} exceeds the maximum allowed input size of {limit} bytes. "
            "Use --http-max-input-size to increase the limit.")


def _decompress(body: bytes, encoding: str, limit: int, headers) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            d = zlib.decompressobj()
        else:
            raise TorporError(Status.UNSUPPORTED, f"unsupported Content-Encoding '{encoding}'")
        out = d.decompress(body, limit + 1)
        if len(out) > limit or d.unconsumed_tail:
            raise invalid_arg(too_large_text(headers, None, limit) + " (the size after decompression)")
        if not d.eof:
            raise invalid_arg(f"failed to decompress the request body: truncated {encoding} data")
        return out
    except zlib.error as e:
        raise invalid_arg(f"failed to decompress the request body ({encoding}): {e}") from None


# Responses shorter than this go uncompressed even where the client accepts gzip or deflate:
# HTTP lets a server choose identity, and compressing a few hundred bytes costs more CPU than
# the whole rest of a small request (a fresh zlib stream each time) and saves nothing on the
# wire. Starlette's GZipMiddleware (MLServer's) draws the line at the same 500 bytes; Triton
# compresses every response the client accepts compressed (README "Compatibility notes").
COMPRESS_MIN_BYTES = 500


def _response_encoding(accept: str | None) -> str | None:
    """Triton's choice: the highest q among identity, gzip and deflate, the first one on ties."""
    if not accept:
        return None
    best, best_q = None, 0.0
    for part in accept.split(","):
        fields = part.strip().split(";")
        name = fields[0].strip().lower()
        if name not in ("identity", "gzip", "deflate"):
            continue
        q = 1.0
        for f in fields[1:]:
            f = f.strip()
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if q > best_q:
            best, best_q = name, q
    return None if best == "identity" else best


async def handle_infer(
    engine: Engine, model: str, version: str, headers, body: bytes, max_input_size: int, trace=None
) -> tuple[int, dict[str, str], bytes]:
    """POST .../infer: (status, headers, body). `headers` is any case-insensitive mapping;
    `trace`: the request's Trace when sampled (Engine.trace_request)."""
    try:
        if len(body) > max_input_size:
            raise invalid_arg(too_large_text(headers, len(body), max_input_size))
        encoding = headers.get("content-encoding")
        if encoding:
            try:
                body = _decompress(body, encoding, max_input_size, headers)
            except TorporError as e:
                if e.status == Status.UNSUPPORTED:
                    # 415 is HTTP's own answer to an unknown Content-Encoding (RFC 9110 §15.5.16)
                    return 415, {"Content-Type": JSON, "Accept-Encoding": "gzip, deflate"}, orjson.dumps({"error": e.message})
                raise
        hlen = headers.get("inference-header-content-length")
        header_length = None
        if hlen is not None:
            try:
                header_length = int(hlen)
            except ValueError:
                raise invalid_arg(f"Unable to parse Inference-Header-Content-Length, got: {hlen}") from None
        if engine.is_decoupled(model, version):
            raise unsupported("HTTP end point doesn't support models with decoupled transaction policy")
        try:
            if header_length == 0 or (header_length is None and not body):
                # Triton's raw binary request: the body is the only input's data (the engine
                # deduces its name, datatype and shape from the model's config). Without the
                # header the JSON is the whole body, so an empty body is one too, as in Triton.
                req = InferRequest(model_name=model, model_version=version, raw_input=body)
            else:
                req = decode_infer_request(body, header_length, model, version)
        except TorporError:
            raise
        except Exception as e:
            log.exception("decoding an infer request failed")
            raise invalid_arg(f"malformed inference request: {type(e).__name__}: {e}") from None
        resp = await engine.infer(req, trace)
        content, json_len = encode_infer_response(resp, req)
    except TorporError as e:
        return _HTTP_STATUS.get(e.status, 400), {"Content-Type": JSON}, orjson.dumps({"error": e.message})
    out_headers = {"Content-Type": JSON}
    if json_len is not None:
        out_headers["Inference-Header-Content-Length"] = str(json_len)
        out_headers["Content-Type"] = "application/octet-stream"
    algo = _response_encoding(headers.get("accept-encoding")) if len(content) >= COMPRESS_MIN_BYTES else None
    if algo == "gzip":
        content = gzip.compress(content, compresslevel=6, mtime=0)
        out_headers["Content-Encoding"] = "gzip"
    elif algo == "deflate":
        content = zlib.compress(content)
        out_headers["Content-Encoding"] = "deflate"
    return 200, out_headers, content


class _Headers(dict):
    """ASGI header pairs as a dict with lower-case keys (ASGI already lower-cases names)."""

    def __init__(self, raw):
        super().__init__((k.decode("latin-1"), v.decode("latin-1")) for k, v in raw)


class InferFastPath:
    """ASGI wrapper answering `POST /v2/models/{m}[/versions/{v}]/infer` directly.

    Why: FastAPI's route scan, dependency solving and middleware stack cost more per request
    than decoding and running a small model; the infer path is the one that carries the
    load, so it skips them. Every other path goes to the FastAPI app unchanged.
    """

    def __init__(self, app: FastAPI, engine: Engine, max_input_size: int,
                 restricted: dict[str, Restriction] | None = None):
        self.app = app
        self.engine = engine
        self.max_input_size = max_input_size
        self.restricted = restricted or {}

    def __getattr__(self, name):  # expose the FastAPI app's attributes (openapi, routes, ...)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if self.restricted and scope["type"] == "http":
            # Checked here, ahead of routing, so no endpoint (infer included) can miss it.
            group = http_group(scope["path"])
            rule = self.restricted.get(group) if group is not None else None
            if rule is not None:
                presented = next((v.decode("latin-1") for k, v in scope["headers"]
                                  if k.decode("latin-1").lower() == rule.header), None)
                if not rule.allows(presented):
                    body = orjson.dumps({"error": f"This API is restricted, expecting header '{rule.header}'"})
                    return await _send_response(send, 403, {"Content-Type": JSON}, body)
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path.endswith("/infer") and path.startswith("/v2/models/"):
                parts = path[len("/v2/models/"):-len("/infer")].split("/")
                if len(parts) == 1 and parts[0]:
                    return await self._infer(scope, receive, send, parts[0], "")
                if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2].isdigit():
                    return await self._infer(scope, receive, send, parts[0], parts[2])
        return await self.app(scope, receive, send)

    async def _infer(self, scope, receive, send, model: str, version: str) -> None:
        headers = _Headers(scope["headers"])
        # a request a peer forwarded (never forwarded again): it is told how long it took here
        from_peer = time.perf_counter() if forward.marked_http(headers) else 0.0
        trace = self.engine.trace_request(model, "HTTP", headers)  # None unless sampled
        limit = self.max_input_size
        declared = headers.get("content-length")
        chunks = []
        size = 0
        too_large = declared is not None and declared.isdigit() and int(declared) > limit
        more = not too_large
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                too_large = True
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        if too_large:
            status, out_headers = 400, {"Content-Type": JSON}
            known = int(declared) if declared is not None and declared.isdigit() else None
            content = orjson.dumps({"error": too_large_text(headers, known, limit)})
        else:
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if trace is not None:
                trace.stamp("HTTP_RECV_END")
            answered = await self._infer_unless_gone(receive, scope, model, version, headers, body, trace)
            if answered is None:
                return  # the client disconnected: the request was cancelled, its resources freed
            status, out_headers, content = answered
        if from_peer:
            name, value = forward.stamp_forwarded(self.engine, "http", from_peer)
            out_headers[name] = value
        if trace is not None:
            trace.stamp("HTTP_SEND_START")
        await _send_response(send, status, out_headers, content)
        if trace is not None:
            trace.end("HTTP_SEND_END")

    async def _infer_unless_gone(self, receive, scope, model, version, headers, body, trace):
        """handle_infer, cancelled if the client disconnects first (uvicorn's receive() returns
        http.disconnect then), so an abandoned request stops waiting for a queue slot or a slow
        model instead of holding its tensors until the model answers."""
        task = asyncio.current_task()
        state = {"running": True, "gone": False}

        def on_message(w: asyncio.Future) -> None:
            if w.cancelled() or w.exception() is not None or w.result().get("type") != "http.disconnect":
                return
            state["gone"] = True
            if state["running"]:
                task.cancel()

        watcher = asyncio.ensure_future(receive())
        watcher.add_done_callback(on_message)
        try:
            result = await self._answer(scope, model, version, headers, body, trace)
        except asyncio.CancelledError:
            if state["gone"]:
                task.uncancel()  # the cancellation was ours and is handled here
                return None
            raise
        finally:
            state["running"] = False
            watcher.cancel()
        return result


    async def _answer(self, scope, model, version, headers, body, trace):
        """The peer's answer where the forward-once rule sends the request to one
        (torpor.api.forward: --peers), else this node's."""
        forwarder = forward.active(self.engine)
        if forwarder is not None:
            answered = await forwarder.http(scope, model, version, headers, body)
            if answered is not None:
                return answered
        return await handle_infer(self.engine, model, version, headers, body, self.max_input_size, trace)


async def _send_response(send, status: int, headers: dict[str, str], content: bytes) -> None:
    raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    raw_headers.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": content})


_MODEL_KIND_GROUP = {
    "": "metadata",
    "ready": "health",
    "infer": "inference",
    "generate": "inference",
    "generate_stream": "inference",
    "config": "model-config",
    "stats": "statistics",
    "trace/setting": "trace",
}


def http_group(path: str) -> str | None:
    """The restricted-API group of a path (Triton's mapping), None for paths outside the API."""
    if path == "/v2":
        return "metadata"
    if path in ("/v2/health/live", "/v2/health/ready"):
        return "health"
    if path == "/v2/models/stats":
        return "statistics"
    if path == "/v2/logging":
        return "logging"
    if path == "/v2/trace/setting":
        return "trace"
    if path.startswith("/v2/repository/"):
        return "model-repository"
    if path.startswith(("/v2/systemsharedmemory", "/v2/cudasharedmemory")):
        return "shared-memory"
    if path.startswith("/v2/torpor/"):
        return "statistics"  # Torpor's own state reports (residency, topology)
    if path.startswith("/v2/models/"):
        parts = path[len("/v2/models/"):].split("/")[1:]
        if len(parts) >= 2 and parts[0] == "versions":
            parts = parts[2:]
        return _MODEL_KIND_GROUP.get("/".join(parts))
    return None


def check_max_input_size(max_input_size: int) -> None:
    """--http-max-input-size must be positive (tritonserver refuses to start otherwise)."""
    if isinstance(max_input_size, bool) or not isinstance(max_input_size, int) or max_input_size <= 0:
        raise ValueError("Error: --http-max-input-size must be greater than 0.")


def create_app(engine: Engine, max_input_size: int = 64 * 1024 * 1024,
               restricted: dict[str, Restriction] | None = None) -> InferFastPath:
    """The FastAPI app with every route of the protocol (registered in this order: FastAPI
    matches /v2/models/stats before /v2/models/{model}), behind the raw ASGI fast path for infer.
    ValueError for a max_input_size that is not positive."""
    check_max_input_size(max_input_size)
    app = FastAPI(title="Torpor", version="0.1.0", docs_url=None, redoc_url=None)
    _error_handlers(app)
    _health_model_and_infer_routes(app, engine, max_input_size)
    _repository_settings_and_torpor_routes(app, engine)
    _shared_memory_routes(app, engine)
    _describe_accurately(app)
    return InferFastPath(app, engine, max_input_size, restricted)


def _error_handlers(app: FastAPI) -> None:
    """Every error in Triton's shape: {"error": "..."} with Triton's status codes."""
    @app.exception_handler(TorporError)
    async def _torpor_error(request: Request, exc: TorporError):
        return _error(exc.message, _HTTP_STATUS.get(exc.status, 400))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: "Not Found", 405: "Method Not Allowed"}.get(exc.status_code, str(exc.detail))
        return _error(msg, exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(f"invalid request: {exc.errors()}", 400)


def _health_model_and_infer_routes(app: FastAPI, engine: Engine, max_input_size: int) -> None:
    # -- health and metadata -------------------------------------------------------------
    # Triton answers health with an empty body; KServe's own client reads {"live": ...}.
    # A JSON body with the same status code serves both.
    @app.get("/v2/health/live")
    async def live():
        ok = engine.is_live()
        return _json({"live": ok}, 200 if ok else 400)

    @app.get("/v2/health/ready")
    async def ready():
        if engine.is_exiting():
            return _json({"ready": False, "error": "Server exiting"}, 503)
        ok = engine.is_ready()
        return _json({"ready": ok}, 200 if ok else 400)

    @app.get("/v2")
    async def server_metadata():
        return _json(engine.server_metadata())

    # -- statistics (matched before /v2/models/{m}) ---------------------------------------
    @app.get("/v2/models/stats")
    async def all_stats():
        return _json({"model_stats": engine.statistics()})

    @app.get("/v2/models/{model}/stats")
    @app.get("/v2/models/{model}/versions/{version}/stats")
    async def model_stats(model: str, version: str | None = None):
        return _json({"model_stats": engine.statistics(model, _check_version(version))})

    # -- models --------------------------------------------------------------------------
    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None):
        ok = engine.model_ready(model, _check_version(version))
        if ok:
            return _json({"name": model, "ready": True})
        return _json({"error": "Model version not ready", "name": model, "ready": False}, 400)

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None):
        return _json(engine.model_metadata(model, _check_version(version)))

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str | None = None):
        return _json(engine.model_config_dict(model, _check_version(version)))

    # -- infer ---------------------------------------------------------------------------
    @app.post("/v2/models/{model}/infer", openapi_extra=openapi.INFER)
    @app.post("/v2/models/{model}/versions/{version}/infer", openapi_extra=openapi.INFER)
    async def infer(model: str, request: Request, version: str | None = None):
        # Normally answered by InferFastPath before FastAPI routing; kept as a route so the
        # OpenAPI description lists it and so the app works without the wrapper.
        status, headers, content = await handle_infer(
            engine, model, _check_version(version), request.headers, await request.body(), max_input_size
        )
        return Response(content, status_code=status, headers=headers)


def _repository_settings_and_torpor_routes(app: FastAPI, engine: Engine) -> None:
    # -- repository ----------------------------------------------------------------------
    @app.post("/v2/repository/index", openapi_extra=openapi.REPOSITORY_INDEX)
    async def repository_index(request: Request):
        body = await _json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise invalid_arg("'ready' must be a boolean")
        return _json(engine.repository_index(ready_only=ready))

    @app.post("/v2/repository/models/{model}/load", openapi_extra=openapi.REPOSITORY_LOAD)
    async def load(model: str, request: Request):
        body = await _json_body(request)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise invalid_arg("'parameters' must be a JSON object")
        config = params.get("config")
        if config is not None and not isinstance(config, str):
            config = orjson.dumps(config).decode()
        files = {}
        for key, value in params.items():
            if key.startswith("file:"):
                if not isinstance(value, str):
                    raise invalid_arg(f"load parameter '{key}' must be a base64 string")
                try:
                    files[key[5:]] = base64.b64decode(value, validate=True)
                except ValueError:
                    raise invalid_arg(f"load parameter '{key}' is not valid base64") from None
        await engine.load(model, config, files)
        return _empty()

    @app.post("/v2/repository/models/{model}/unload", openapi_extra=openapi.REPOSITORY_UNLOAD)
    async def unload(model: str, request: Request):
        body = await _json_body(request)
        params = body.get("parameters") or {}
        dependents = bool(params.get("unload_dependents", False)) if isinstance(params, dict) else False
        await engine.unload(model, dependents)
        return _empty()

    @app.post("/v2/repository/{repo}/models/{model}/load", openapi_extra=openapi.GENERIC)
    @app.post("/v2/repository/{repo}/models/{model}/unload", openapi_extra=openapi.GENERIC)
    async def repo_named(repo: str, model: str):
        raise unsupported("'repository_name' specification is not supported")

    # -- trace and logging ---------------------------------------------------------------
    @app.get("/v2/trace/setting")
    async def get_trace():
        return _json(engine.trace_settings())

    @app.post("/v2/trace/setting", openapi_extra=openapi.SETTINGS)
    async def set_trace(request: Request):
        return _json(engine.trace_settings(changes=await _json_body(request)))

    @app.get("/v2/models/{model}/trace/setting")
    async def get_model_trace(model: str):
        _require_model(engine, model)
        return _json(engine.trace_settings(model))

    @app.post("/v2/models/{model}/trace/setting", openapi_extra=openapi.SETTINGS)
    async def set_model_trace(model: str, request: Request):
        _require_model(engine, model)
        return _json(engine.trace_settings(model, await _json_body(request)))

    @app.get("/v2/logging")
    async def get_logging():
        return _json(engine.log_settings())

    @app.post("/v2/logging", openapi_extra=openapi.SETTINGS)
    async def set_logging(request: Request):
        return _json(engine.log_settings(await _json_body(request)))

    # -- Torpor's own: where models are resident ------------------------------------------
    @app.get("/v2/torpor/residency")
    async def residency():
        return _json(engine.residency())

    @app.get("/v2/torpor/topology")
    async def topology():
        return _json(engine.topology())


def _shared_memory_routes(app: FastAPI, engine: Engine) -> None:
    # -- shared memory -------------------------------------------------------------------
    @app.get("/v2/systemsharedmemory/status")
    @app.get("/v2/systemsharedmemory/region/{region}/status")
    async def sys_shm_status(region: str = ""):
        return _json(engine.shm_status("system", region))

    @app.post("/v2/systemsharedmemory/region/{region}/register", openapi_extra=openapi.SHM_REGISTER)
    async def sys_shm_register(region: str, request: Request):
        body = await _json_body(request)
        key, offset, size = body.get("key"), body.get("offset", 0), body.get("byte_size")
        if not isinstance(key, str) or not isinstance(offset, int) or not isinstance(size, int):
            raise invalid_arg("system shared memory registration needs 'key' (string), 'offset' and 'byte_size' (integers)")
        engine.shm_register_system(region, key, offset, size)
        return _empty()

    @app.post("/v2/systemsharedmemory/unregister")
    @app.post("/v2/systemsharedmemory/region/{region}/unregister")
    async def sys_shm_unregister(region: str = ""):
        engine.shm_unregister("system", region)
        return _empty()

    @app.get("/v2/cudasharedmemory/status", openapi_extra=openapi.GENERIC)
    @app.get("/v2/cudasharedmemory/region/{region}/status", openapi_extra=openapi.GENERIC)
    async def cuda_shm_status(region: str = ""):
        return _json(engine.shm_status("cuda", region))

    @app.post("/v2/cudasharedmemory/region/{region}/register", openapi_extra=openapi.CUDA_SHM_REGISTER)
    async def cuda_shm_register(region: str, request: Request):
        body = await _json_body(request)
        handle = body.get("raw_handle")
        device_id, size = body.get("device_id", 0), body.get("byte_size")
        b64 = handle.get("b64") if isinstance(handle, dict) else None
        if not isinstance(b64, str) or not isinstance(device_id, int) or not isinstance(size, int):
            raise invalid_arg("CUDA shared memory registration needs 'raw_handle': {'b64': ...}, 'device_id' and 'byte_size'")
        try:
            raw = base64.b64decode(b64, validate=True)
        except ValueError:
            raise invalid_arg("'raw_handle.b64' is not valid base64") from None
        engine.shm_register_cuda(region, raw, device_id, size)
        return _empty()

    @app.post("/v2/cudasharedmemory/unregister")
    @app.post("/v2/cudasharedmemory/region/{region}/unregister")
    async def cuda_shm_unregister(region: str = ""):
        engine.shm_unregister("cuda", region)
        return _empty()


def _describe_accurately(app: FastAPI) -> None:
    describe = app.openapi

    def accurate_openapi() -> dict:
        # Routes with and without /versions/{version} (or /region/{region}) share one function
        # whose parameter defaults to None; FastAPI would list it as a query parameter on the
        # short path, which the server ignores. The description shows only what is read.
        if app.openapi_schema is None:
            schema = describe()
            for ops in schema["paths"].values():
                for op in ops.values():
                    op["parameters"] = [q for q in op.get("parameters", []) if not (
                        q["in"] == "query" and q["name"] in ("version", "region"))]
                    if not op["parameters"]:
                        del op["parameters"]
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)  # validation errors are answered 400
                    for code, spec in openapi.GENERIC["responses"].items():
                        responses.setdefault(code, spec)  # every route answers errors in Triton's shape
        return app.openapi_schema

    app.openapi = accurate_openapi


def _require_model(engine: Engine, model: str) -> None:
    if not engine.has_model(model):
        raise TorporError(Status.NOT_FOUND, f"Request for unknown model: '{model}' is not found")


async def start_http_server(engine: Engine, address: str, port: int, max_input_size: int,
                            restricted: dict[str, Restriction] | None, exit_timeout_secs: float):
    """Serve the app with uvicorn on the running loop: (the serving task, async stop(grace)).
    The task fails with one line if the port cannot be bound, or at once if the options are
    invalid (a non-positive max_input_size), so the server stops with that line."""
    import contextlib

    import uvicorn

    try:
        check_max_input_size(max_input_size)
    except ValueError as e:
        reason = str(e)

        async def refuse() -> None:
            raise RuntimeError(reason)

        async def nothing(grace: float) -> None:
            pass

        return asyncio.create_task(refuse()), nothing

    class _Server(uvicorn.Server):
        # The composition root owns signal handling: uvicorn's would re-raise the signal after
        # shutdown and turn a clean drain into a non-zero exit.
        def install_signal_handlers(self) -> None:
            pass

        def capture_signals(self):  # uvicorn >= 0.29
            return contextlib.nullcontext()

    config = uvicorn.Config(
        create_app(engine, max_input_size, restricted),
        host=address,
        port=port,
        loop="none",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=int(exit_timeout_secs) or None,
    )
    server = _Server(config)

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind; shut down cleanly instead
            raise RuntimeError(f"HTTP listener could not start on {address}:{port}") from None

    async def stop(grace: float) -> None:
        server.should_exit = True

    return asyncio.create_task(serve()), stop
