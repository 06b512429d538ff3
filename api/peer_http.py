"""A small HTTP/1.1 client for one peer Torpor node: keep-alive connections, responses parsed by
httptools (the parser uvicorn already serves with, so no new dependency).

Why not an HTTP client library: the forward-once path adds a whole extra request to the
latency of every request it forwards, and a general client's per-request machinery (URL and
header models, pools with their own tasks) costs more than the few hundred bytes of protocol a
Torpor peer needs; the peers are Torpor nodes, whose answers are plain HTTP/1.1 with a
Content-Length (chunked ones are parsed too).

    client = PeerHttp("http://10.0.0.3:8000")
    status, headers, body = await client.request("GET", "/v2/torpor/residency", [], b"", timeout=1.0)
    await client.close()
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

import httptools

# uvicorn closes a connection idle for 5 s; one idle for longer than this may be closing as we
# write to it, so it is dropped rather than reused
_IDLE_S = 2.0
# a peer that does not accept a connection within this is taken as gone, whatever the request's
# own timeout: the request is then served where it is, not held for the whole timeout
CONNECT_TIMEOUT_S = 1.0


class PeerConnectionError(ConnectionError):
    """The peer closed the connection or sent what is not HTTP before its answer was complete."""


class _Connection(asyncio.Protocol):
    """One connection; one request at a time (HTTP/1.1 without pipelining)."""

    def __init__(self):
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.closed = False
        self.keep_alive = True
        self.idle_since = 0.0

    # asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(PeerConnectionError(f"malformed HTTP answer: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(PeerConnectionError(f"connection closed by the peer{f': {exc}' if exc else ''}"))

    # httptools callbacks --------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.headers, self.chunks = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result((self.parser.get_status_code(), self.headers, b"".join(self.chunks)))

    # ---------------------------------------------------------------------------------------
    def _fail(self, error: Exception) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(error)

    def send(self, data: bytes) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class PeerHttp:
    """Requests to one peer's HTTP listener (`base_url`: http://host:port)."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"expected http://HOST:PORT, got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        netloc = f"[{self.host}]" if ":" in self.host else self.host
        self._host_header = f"{netloc}:{self.port}".encode("latin-1")
        self._idle: list[_Connection] = []
        self._closed = False

    async def _connection(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < _IDLE_S:
                return conn
            conn.close()
        _, conn = await asyncio.get_running_loop().create_connection(_Connection, self.host, self.port)
        return conn

    async def request(self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                      timeout: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """(status, headers with lower-case names, body). `headers` go as given, with Host and
        Content-Length added. OSError (connect), PeerConnectionError or TimeoutError on failure;
        the connection is then closed, never reused."""
        lines = [f"{method} {path} HTTP/1.1".encode("latin-1"), b"host: " + self._host_header,
                 b"content-length: " + str(len(body)).encode()]
        lines += [k + b": " + v for k, v in headers]
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        async with asyncio.timeout(timeout):
            conn = await asyncio.wait_for(self._connection(), min(timeout, CONNECT_TIMEOUT_S))
            try:
                status, out_headers, out_body = await conn.send(data)
            except BaseException:
                conn.close()  # a half-read answer would be read as the next request's
                raise
        if conn.keep_alive and not conn.closed and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        return status, out_headers, out_body

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.close()
        self._idle.clear()
