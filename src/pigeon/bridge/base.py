"""What every bridge shares: its plain socket, its counters, its bound on
messages in flight, and how it stops."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import zmq
import zmq.asyncio

from .._core.bridging import BridgeSpec, Endpoint, Malformed
from ..errors import ConfigurationError, TransportError

DEFAULT_MAX_IN_FLIGHT = 64
ERROR_PREFIX = b"pigeon.error "


class PlainBridge:
    """Base of the four bridges: ``start``, ``close``, ``stats``, ``async with``.

    Every bridge counts ``received`` (messages read from the side that feeds
    it), ``passed`` (handed on: stored, sent or answered), ``malformed``
    (plain messages that were not one non-empty frame: dropped, or answered
    with an error) and ``dropped`` (anything else not passed on), and keeps
    at most ``max_in_flight`` messages between its two sides.
    """

    def __init__(
        self,
        conn: Any,
        spec: BridgeSpec,
        *,
        context: zmq.asyncio.Context | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        if max_in_flight < 1:
            raise ConfigurationError(f"max_in_flight must be >= 1, not {max_in_flight}")
        self.conn = conn
        self.spec = spec
        self.max_in_flight = max_in_flight
        self._own_context = context is None
        self.context = context or zmq.asyncio.Context()
        self.counts: dict[str, int] = {"received": 0, "passed": 0, "malformed": 0, "dropped": 0}
        self._room = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sockets: list[zmq.asyncio.Socket] = []
        self.closed = False

    def _open(self, kind: int, endpoint: Endpoint, **options: int) -> zmq.asyncio.Socket:
        sock = self.context.socket(kind)
        # Closing must never wait on a peer that is gone (pyzmq's own advice).
        sock.setsockopt(zmq.LINGER, 0)
        for name, value in options.items():
            sock.setsockopt(getattr(zmq, name), value)
        try:
            if endpoint.bind:
                sock.bind(endpoint.url)
            else:
                sock.connect(endpoint.url)
        except zmq.ZMQError as exc:
            sock.close()
            verb = "bind" if endpoint.bind else "connect"
            raise TransportError(
                f"{self.spec.kind.value} bridge cannot {verb} {endpoint.url}: {exc}",
                address=endpoint.url,
            ) from exc
        self._sockets.append(sock)
        return sock

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _receive(self, sock: zmq.asyncio.Socket) -> list[bytes]:
        """The next plain message, once there is room for one more in
        flight (the caller gives the room back when it is done with it)."""
        await self._room.acquire()
        try:
            frames: list[bytes] = await sock.recv_multipart()
        except BaseException:
            self._room.release()
            raise
        self.counts["received"] += 1
        return frames

    def _count_malformed(self, why: Malformed) -> None:
        self.counts["malformed"] += 1
        key = f"malformed_{why.value}"
        self.counts[key] = self.counts.get(key, 0) + 1

    @property
    def in_flight(self) -> int:
        return self.max_in_flight - self._room._value

    def stats(self) -> dict[str, Any]:
        """The counters, and what this bridge is (its spec as text)."""
        return {
            "bridge": str(self.spec),
            "kind": self.spec.kind.value,
            "name": self.spec.name,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            **self.counts,
        }

    async def start(self) -> PlainBridge:
        raise NotImplementedError

    async def _stop(self, timeout: float) -> None:
        """Stop taking work and settle what is in flight within ``timeout``."""

    async def close(self, timeout: float = 5.0) -> None:
        """Stop taking new messages, let those in flight finish within
        ``timeout`` (what does not is counted), then close the plain sockets."""
        if self.closed:
            return
        self.closed = True
        try:
            await self._stop(timeout)
        finally:
            for sock in self._sockets:
                sock.close(linger=0)
            if self._own_context:
                self.context.term()

    async def _wait_tasks(self, timeout: float) -> int:
        """Wait for the running tasks; cancel what is left; how many were cut."""
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(pending)

    async def __aenter__(self) -> PlainBridge:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def ready(sock: zmq.asyncio.Socket, timeout: float, flags: int) -> bool:
    """Whether ``sock`` can do ``flags`` (POLLIN, POLLOUT) within ``timeout`` seconds."""
    # pyzmq's stub for the async poll lacks the flags its code takes.
    events: int = await sock.poll(int(timeout * 1000), flags)  # type: ignore[call-arg, assignment]
    return bool(events & flags)


def error_body(exc: BaseException) -> bytes:
    """The one-frame answer a plain REQ client gets instead of a reply."""
    return ERROR_PREFIX + f"{type(exc).__name__}: {exc}".encode()
