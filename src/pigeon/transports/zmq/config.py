"""What every part of a ZeroMQ node shares: its settings, the socket options
every pigeon socket gets, the process's zmq context, and a tiny wake-up list
for waits that must not poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

_context: zmq.Context[zmq.Socket[bytes]] | None = None


def shared_context() -> zmq.Context[zmq.Socket[bytes]]:
    """One zmq context per process, so ``inproc://`` works between nodes."""
    global _context
    if _context is None or _context.closed:
        _context = zmq.Context()
    return _context


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The settings of one node, handed to its parts (see ``ZmqTransport``)."""

    node_id: str
    heartbeat: float = 1.0
    heartbeat_misses: int = 3
    max_message_size: int = 4 << 20
    outbox_limit: int = 100_000
    connect_grace: float = 0.5
    ipv6: bool = False  # for a socket that binds or connects an IPv6 address

    def tune(self, sock: zmq.Socket[bytes]) -> None:
        """Socket options every pigeon socket gets."""
        if self.ipv6:
            # libzmq reaches an IPv6 address only on a socket with this
            # option; it stays off elsewhere, where it would let a name
            # like localhost resolve to ::1 ahead of 127.0.0.1.
            sock.setsockopt(zmq.IPV6, 1)
        sock.setsockopt(zmq.LINGER, 0)  # delivery is ours to ensure, never linger's
        # Credit and outbox limits bound every flow; socket HWMs would only drop.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_size * 2 + (1 << 16))
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)


class Waiters:
    """Futures to wake when something changed, so a wait is an event, not a poll.

    A waiter re-checks its own condition when woken; ``wake`` says only that
    it may have become true.
    """

    __slots__ = ("_futures",)

    def __init__(self) -> None:
        self._futures: list[asyncio.Future[None]] = []

    def wait(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(future)
        return future

    def wake(self) -> None:
        if self._futures:
            futures, self._futures = self._futures, []
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def wait_until(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``condition()`` holds or ``time.monotonic()`` reaches
        ``deadline``; returns the condition's last value."""
        loop = asyncio.get_running_loop()
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            waiter = self.wait()
            handle = loop.call_later(remaining, _settle, waiter)
            try:
                await waiter
            finally:
                handle.cancel()
        return True


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
