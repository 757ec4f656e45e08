"""The dashboard's HTTP server: asyncio streams around ``http`` (parsing)
and ``routes`` (answers).

A slow or silent client holds one connection slot for at most
``request_timeout`` seconds (reading its request) plus as long again
(taking the answer); past ``max_connections`` open at once, a new one is
answered 503 and closed. Each is counted in ``counts``.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from ..errors import TransportError
from .http import DEFAULT_LIMITS, HttpError, Limits, body_length, json_response, parse_head
from .routes import Routes

LINGER_SECONDS = 1.0
LINGER_BYTES = 1 << 20


class DashboardServer:
    """Serves ``routes`` on ``host:port`` (port 0: any free port)."""

    def __init__(
        self,
        routes: Routes,
        *,
        limits: Limits = DEFAULT_LIMITS,
        request_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.routes = routes
        self.limits = limits
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.counts: Counter[str] = routes.http  # shown on the page
        self._open = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the port bound.

        Raises:
            TransportError: the address cannot be bound (in use, not ours).
        """
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, limit=self.limits.head_bytes + 4
            )
        except OSError as exc:
            raise TransportError(
                f"cannot serve on {host}:{port}: {exc.strerror or exc}", address=f"{host}:{port}"
            ) from exc
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > self.max_connections:
                self.counts["busy"] += 1
                reply = json_response(503, {"error": "too many connections"})
            else:
                reply = await self._reply(reader)
            if reply:
                writer.write(reply)
                async with asyncio.timeout(self.request_timeout):
                    await writer.drain()
                await self._linger(reader, writer)
        except (TimeoutError, ConnectionError):
            self.counts["slow_or_lost"] += 1
        finally:
            self._open -= 1
            writer.close()

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, and read what the client still sends for a moment.

        Closing a socket with unread bytes in it makes the kernel send a
        reset, which may destroy the answer before the client reads it (a
        refused request is answered before it is read whole). So the answer
        is followed by our end of the stream, and the rest of the request is
        read and dropped until the client closes: at most ``LINGER_BYTES``
        and ``LINGER_SECONDS``.
        """
        if not writer.can_write_eof():
            return
        writer.write_eof()
        dropped = 0
        try:
            async with asyncio.timeout(LINGER_SECONDS):
                while dropped < LINGER_BYTES and (chunk := await reader.read(1 << 16)):
                    dropped += len(chunk)
        except TimeoutError:
            pass  # the answer is sent; the client keeps its socket open: close it

    async def _reply(self, reader: asyncio.StreamReader) -> bytes:
        """The response to the one request read from ``reader``; b"" when
        the client went away before it finished asking."""
        self.counts["requests"] += 1
        try:
            async with asyncio.timeout(self.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                request = parse_head(head[:-4], self.limits)
                request.body = await reader.readexactly(body_length(request, self.limits))
            return await self.routes.answer(request)
        except HttpError as exc:
            self.counts[f"http_{exc.status}"] += 1
            return json_response(exc.status, {"error": exc.detail})
        except asyncio.LimitOverrunError:
            self.counts["http_431"] += 1
            return json_response(431, {"error": "the request head is too large"})
        except TimeoutError:
            self.counts["http_408"] += 1
            return json_response(408, {"error": "the request took too long to arrive"})
        except asyncio.IncompleteReadError:
            self.counts["incomplete"] += 1
            return b""
