"""The metrics listener: `GET /metrics` (Prometheus text) on its own port, as Triton's :8002.

A small HTTP/1.1 server on asyncio streams, on the same event loop as the other listeners.
Collection (which may query NVML) runs on a worker thread so a scrape never stalls the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from torpor.api.prometheus import CONTENT_TYPE, make_registry, render

from torpor.dataplane.engine import Engine

log = logging.getLogger("torpor.api.prometheus")

_MAX_HEADER = 16 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


class MetricsServer:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry, self.collector = make_registry(engine)
        self.server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self._busy: set[asyncio.Task] = set()  # connections in the middle of answering

    async def scrape(self) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, render, self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    await self._respond(writer, 400, b"request header too large\n", close=True)
                    return
                if task is not None:
                    self._busy.add(task)
                lines = head.decode("latin-1").split("\r\n")
                parts = lines[0].split()
                if len(parts) != 3:
                    await self._respond(writer, 400, b"bad request line\n", close=True)
                    return
                method, target, version = parts
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                length = headers.get("content-length", "0")
                if length.isdigit() and int(length) > 0:
                    await reader.readexactly(int(length))
                conn = headers.get("connection", "").lower()
                close = conn == "close" or (version == "HTTP/1.0" and conn != "keep-alive")
                path = target.split("?", 1)[0]
                if path != "/metrics":
                    await self._respond(writer, 404, b"Not Found\n", close=close)
                elif method not in ("GET", "HEAD"):
                    await self._respond(writer, 405, b"Method Not Allowed\n", close=close)
                else:
                    body = await self.scrape()
                    await self._respond(writer, 200, body, CONTENT_TYPE, close=close, head=method == "HEAD")
                if task is not None:
                    self._busy.discard(task)
                if close or self.server is None:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            if task is not None:
                self._connections.discard(task)
                self._busy.discard(task)
            writer.close()

    @staticmethod
    async def _respond(writer, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                       close: bool = False, head: bool = False) -> None:
        header = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{'Connection: close' + chr(13) + chr(10) if close else ''}"
            "\r\n"
        ).encode("latin-1")
        writer.write(header if head else header + body)
        await writer.drain()

    async def start(self, address: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, address, port, limit=_MAX_HEADER)

    async def stop(self, grace: float = 0.0) -> None:
        if self.server is None:
            return
        server, self.server = self.server, None
        server.close()
        # idle keep-alive connections go now; a scrape being answered may finish (bounded)
        for t in list(self._connections - self._busy):
            t.cancel()
        if self._busy:
            await asyncio.wait(list(self._busy), timeout=max(grace, 0.1))
        for t in list(self._connections):
            t.cancel()


async def start_metrics_server(engine: Engine, address: str, port: int) -> Callable[[float], Awaitable[None]]:
    """Start the metrics listener; returns `async stop(grace)`."""
    server = MetricsServer(engine)
    await server.start(address, port)
    return server.stop
