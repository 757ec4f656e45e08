"""A userspace TCP relay that puts network faults between two loopback peers.

Machines without netem (or without the rights to use it) can still test what
a slow, stalling or partitioned network does to pigeon: point a peer at a
:class:`Relay` instead of at its node, and change the link while it runs.

The relay listens on ``127.0.0.1`` and forwards every connection it accepts
to one target, both ways. Faults, each of which may be changed at any time
from any thread:

- **delay** (:meth:`Relay.set_delay`): every chunk read is forwarded
  ``delay ± jitter`` seconds later (uniform), one way: set it for one
  direction or both. Jitter never reorders: a chunk never leaves before the
  one read before it, as TCP would have it.
- **stall** (:meth:`Relay.stall`): stop forwarding, for some seconds or until
  :meth:`Relay.heal`. Nothing is lost: data read meanwhile is held and goes
  on, in order, when the stall ends, like a congested link.
- **cut** (:meth:`Relay.cut`): close every current connection abruptly (a TCP
  reset to both ends; held data is dropped, as a broken connection drops
  it) and, with ``refuse=True``, reset every new one until healed: a
  partition.
- **heal** (:meth:`Relay.heal`): end the stall and the partition. The delay
  is the link's shape, not a fault to heal: ``set_delay(0)`` removes it.

Rules:

1. Bounded: each direction of each connection holds at most
   ``max_held_bytes`` read and not yet forwarded; past it the relay stops
   reading that side, so TCP's own backpressure reaches the sender.
2. Ordered: within a connection, bytes leave in the order they came, whatever
   the delay, jitter or stall.
3. Loopback only: it listens on 127.0.0.1 and refuses a target that is not a
   loopback address.
4. Self-contained: it runs its own asyncio loop in a daemon thread, so it
   works beside blocking and async code alike; :meth:`Relay.close` (or
   leaving its ``with`` block) stops every task, socket and the thread.

Every fault call returns once the relay's loop has applied it (after ``cut()``
returns, the cut connections are closed); called from async code it holds
the caller's loop for that one hop between threads. :meth:`Relay.stats`
counts bytes and connections each way.

With pigeon, put the relay in front of a node's bound address and connect
the other side to ``relay.url``::

    async with pigeon.connect(bind="tcp://127.0.0.1:0") as host:
        with Relay(host.stats()["bound"][0], delay=0.2, jitter=0.1) as relay:
            async with pigeon.connect(relay.url) as worker:
                ...
                relay.cut(refuse=True)  # the worker is partitioned off

Example:

    >>> import socket
    >>> from pigeon.testing.relay import Relay
    >>> server = socket.create_server(("127.0.0.1", 0))
    >>> with Relay(server.getsockname()) as relay:
    ...     relay.set_delay(0.05, jitter=0.01)
    ...     client = socket.create_connection(("127.0.0.1", relay.port))
    ...     peer, _ = server.accept()
    ...     client.sendall(b"ping")
    ...     print(peer.recv(4))  # about 50 ms later
    ...     print(relay.stats().bytes_to_target)
    ...     client.close()
    ...     peer.close()
    b'ping'
    4
    >>> server.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import ipaddress
import logging
import math
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from ..errors import ClosedError, ConfigurationError

__all__ = ["Direction", "Relay", "RelayStats"]

T = TypeVar("T")
log = logging.getLogger("pigeon")

LISTEN_HOST = "127.0.0.1"
CHUNK = 64 * 1024  # bytes read at once from one side
DEFAULT_MAX_HELD_BYTES = 1 << 20
_CALL_TIMEOUT = 30.0  # seconds a fault call waits for the relay's loop (a busy machine)
_EOF = b""  # in a pipe's queue: the sender half-closed its side
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a TCP reset


class Direction(enum.Enum):
    """Which way a fault applies."""

    TO_TARGET = "to target"  # what clients send
    TO_CLIENT = "to client"  # what the target answers
    BOTH = "both"


@dataclass(frozen=True, slots=True)
class RelayStats:
    """Counters of one relay (:meth:`Relay.stats`), taken at one moment."""

    accepted: int  # connections taken from clients, refused ones included
    connected: int  # connections opened to the target
    refused: int  # reset on arrival while partitioned (cut with refuse=True)
    failed: int  # clients reset because the target could not be reached
    cut: int  # connections closed by cut()
    open: int  # connections forwarding now
    bytes_to_target: int  # forwarded (handed to the target's socket)
    bytes_to_client: int  # forwarded (handed to clients' sockets)
    held_to_target: int  # read from clients, not yet forwarded (delay or stall)
    held_to_client: int  # read from the target, not yet forwarded


class _Shape:
    """The faults of one direction, shared by every connection's pipe that way."""

    def __init__(self, rand: random.Random) -> None:
        self.delay = 0.0
        self.jitter = 0.0
        self.flowing = asyncio.Event()  # clear while stalled
        self.flowing.set()
        self._rand = rand
        self._stall_end: asyncio.TimerHandle | None = None

    def sample(self) -> float:
        """Seconds the chunk read now waits before it may leave."""
        if not self.jitter:
            return self.delay
        return max(0.0, self.delay + self._rand.uniform(-self.jitter, self.jitter))

    def stall(self, seconds: float | None) -> None:
        self._cancel_timer()
        self.flowing.clear()
        if seconds is not None:
            self._stall_end = asyncio.get_running_loop().call_later(seconds, self.resume)

    def resume(self) -> None:
        self._cancel_timer()
        self.flowing.set()

    def _cancel_timer(self) -> None:
        if self._stall_end is not None:
            self._stall_end.cancel()
            self._stall_end = None


class _Pipe:
    """One direction of one connection: reads a side, holds what it read for
    its delay (or a stall), writes it to the other side in order."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        shape: _Shape,
        max_held_bytes: int,
        on_forwarded: Callable[[int], None],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.shape = shape
        self.max_held_bytes = max_held_bytes
        self.held = 0
        self._on_forwarded = on_forwarded
        self._queue: deque[tuple[float, bytes]] = deque()
        self._last_due = 0.0
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()

    async def read_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.held >= self.max_held_bytes:
                # Rule 1: stop reading; TCP backs the sender off.
                self._has_room.clear()
                await self._has_room.wait()
            data = await self.reader.read(min(CHUNK, self.max_held_bytes - self.held))
            # Rule 2: never before the chunk read before this one.
            due = max(loop.time() + self.shape.sample(), self._last_due)
            self._last_due = due
            self._queue.append((due, data))
            self.held += len(data)
            self._has_data.set()
            if data == _EOF:
                return

    async def write_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._has_data.clear()
                await self._has_data.wait()
            due, data = self._queue[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue  # a stall may have begun meanwhile
            if not self.shape.flowing.is_set():
                await self.shape.flowing.wait()
                continue
            self._queue.popleft()
            if data == _EOF:
                if self.writer.can_write_eof():
                    self.writer.write_eof()
                return
            self._on_forwarded(len(data))
            self.writer.write(data)
            await self.writer.drain()
            self.held -= len(data)
            self._has_room.set()


class _Connection:
    """One client's connection and the relay's own connection to the target."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.target: asyncio.StreamWriter | None = None
        self.pipes: list[_Pipe] = []
        self.tasks: list[asyncio.Task[None]] = []

    def held(self, index: int) -> int:
        return self.pipes[index].held if len(self.pipes) > index else 0

    def abort(self) -> None:
        """Reset both ends at once; what was held is dropped."""
        for task in self.tasks:
            task.cancel()
        for writer in (self.client, self.target):
            if writer is not None:
                _reset(writer)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass  # already closed: nothing left to reset
    writer.transport.abort()


def _loopback_target(target: str | tuple[str, int]) -> tuple[str, int]:
    """``(host, port)`` of a target given as ``tcp://HOST:PORT`` or a pair.

    Raises:
        ConfigurationError: not a TCP address, or not a loopback one.
    """
    if isinstance(target, str):
        parts = urlsplit(target)
        if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
            raise ConfigurationError(f"a relay target is tcp://HOST:PORT, not {target!r}")
        host, port = parts.hostname, parts.port
    else:
        host, port = str(target[0]), int(target[1])
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigurationError(f"a relay forwards only to loopback addresses, not {host!r}")
    if not 0 < port < 65536:
        raise ConfigurationError(f"a relay target needs a port from 1 to 65535, not {port}")
    return host, port


def _seconds(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(f"{what} must be a number of seconds, not {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigurationError(f"{what} must be finite and at least 0 seconds, not {value!r}")
    return float(value)


class Relay:
    """A TCP relay from ``127.0.0.1:port`` to ``target``; see the module docstring.

    It is listening once constructed; close it (or use it as a context
    manager) to stop it.

    Args:
        target: where connections go: ``tcp://HOST:PORT`` or ``(host, port)``,
            a loopback address.
        port: where to listen (0: a free port; read it back from ``port``).
        delay, jitter: the initial one-way delay of both directions, seconds.
        max_held_bytes: bytes each direction of each connection holds at
            most before it stops reading (Rule 1).
        seed: seeds the jitter, for a run that can be repeated.

    Raises:
        ConfigurationError: a target that is not a loopback TCP address, or a
            bad delay.
        OSError: the port cannot be bound (taken, say).
    """

    def __init__(
        self,
        target: str | tuple[str, int],
        *,
        port: int = 0,
        delay: float = 0.0,
        jitter: float = 0.0,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        seed: int | None = None,
    ) -> None:
        self.target = _loopback_target(target)
        if isinstance(max_held_bytes, bool) or not isinstance(max_held_bytes, int):
            raise ConfigurationError(f"max_held_bytes must be an int, not {max_held_bytes!r}")
        if max_held_bytes < 1:
            raise ConfigurationError(f"max_held_bytes must be at least 1, not {max_held_bytes}")
        delay, jitter = _seconds(delay, "delay"), _seconds(jitter, "jitter")
        self.max_held_bytes = max_held_bytes
        self._rand = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._shapes: dict[Direction, _Shape] = {}
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._refusing = False
        self._closed = False
        self._counts = dict.fromkeys(
            ("accepted", "connected", "refused", "failed", "cut", "to_target", "to_client"), 0
        )
        self._server: asyncio.Server | None = None
        started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run_loop, args=(port, started), name=f"pigeon-relay-{port}", daemon=True
        )
        self._thread.start()
        try:
            self.port = started.result(_CALL_TIMEOUT)
        except BaseException:
            self._thread.join(_CALL_TIMEOUT)
            raise
        self.set_delay(delay, jitter=jitter)

    # -- where it listens ------------------------------------------------

    @property
    def url(self) -> str:
        """Where peers connect instead of the target: ``tcp://127.0.0.1:PORT``."""
        return f"tcp://{LISTEN_HOST}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        return (LISTEN_HOST, self.port)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- faults (any thread) ---------------------------------------------

    def set_delay(
        self, delay: float, *, jitter: float = 0.0, direction: Direction = Direction.BOTH
    ) -> None:
        """Forward what is read from now on ``delay ± jitter`` seconds later.

        Raises:
            ConfigurationError: a negative or infinite duration.
            ClosedError: the relay is closed.
        """
        delay, jitter = _seconds(delay, "delay"), _seconds(jitter, "jitter")

        def apply() -> None:
            for shape in self._shapes_of(direction):
                shape.delay, shape.jitter = delay, jitter

        self._call(apply)

    def stall(self, seconds: float | None = None, *, direction: Direction = Direction.BOTH) -> None:
        """Stop forwarding for ``seconds`` (None: until :meth:`heal`); what is
        read meanwhile is held (up to ``max_held_bytes``), not lost. A new
        stall replaces one under way.

        Raises:
            ConfigurationError: a negative or infinite duration.
            ClosedError: the relay is closed.
        """
        length = None if seconds is None else _seconds(seconds, "seconds")

        def apply() -> None:
            for shape in self._shapes_of(direction):
                shape.stall(length)

        self._call(apply)

    def cut(self, *, refuse: bool = False) -> int:
        """Reset every current connection, both ends; with ``refuse``, also
        reset every new one until :meth:`heal`. Returns how many were cut.

        Raises:
            ClosedError: the relay is closed.
        """

        async def apply() -> int:
            self._refusing = self._refusing or refuse
            return await self._cut_all()

        return self._call_async(apply)

    def heal(self) -> None:
        """End a stall and a partition: held data flows, new connections are
        forwarded again. The delay stays (see :meth:`set_delay`).

        Raises:
            ClosedError: the relay is closed.
        """

        def apply() -> None:
            self._refusing = False
            for shape in self._shapes.values():
                shape.resume()

        self._call(apply)

    def stats(self) -> RelayStats:
        """What the relay has counted so far (see :class:`RelayStats`).

        Raises:
            ClosedError: the relay is closed.
        """

        def take() -> RelayStats:
            counts = self._counts
            return RelayStats(
                accepted=counts["accepted"],
                connected=counts["connected"],
                refused=counts["refused"],
                failed=counts["failed"],
                cut=counts["cut"],
                open=len(self._connections),
                bytes_to_target=counts["to_target"],
                bytes_to_client=counts["to_client"],
                held_to_target=sum(c.held(0) for c in self._connections),
                held_to_client=sum(c.held(1) for c in self._connections),
            )

        return self._call(take)

    # -- closing ---------------------------------------------------------

    def close(self) -> None:
        """Stop listening, reset every connection, stop the loop and its thread."""
        if self._closed:
            return
        if self._thread.is_alive():
            try:
                self._call_async(self._shutdown)
            finally:
                self._closed = True
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(_CALL_TIMEOUT)
        self._closed = True

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Relay {self.url} -> {self.target[0]}:{self.target[1]} {state}>"

    # -- the relay's own thread ------------------------------------------

    def _run_loop(self, port: int, started: concurrent.futures.Future[int]) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            self._shapes = {
                Direction.TO_TARGET: _Shape(self._rand),
                Direction.TO_CLIENT: _Shape(self._rand),
            }
            server = loop.run_until_complete(
                asyncio.start_server(self._accept, LISTEN_HOST, port, limit=CHUNK)
            )
        except OSError as exc:
            started.set_exception(exc)
            loop.close()
            return
        self._server = server
        started.set_result(int(server.sockets[0].getsockname()[1]))
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _shapes_of(self, direction: Direction) -> list[_Shape]:
        if direction is Direction.BOTH:
            return list(self._shapes.values())
        return [self._shapes[direction]]

    def _accept(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        # A plain callback, so the task is ours: asyncio's streams would
        # report a handler task cancelled at close as an error.
        task = self._loop.create_task(self._handle(reader, client))
        self._handlers.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("relay %s: a connection failed", self.url, exc_info=task.exception())

    async def _handle(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self._counts["accepted"] += 1
        connection = _Connection(client)
        try:
            if self._refusing or self._closed:
                self._counts["refused"] += 1
                _reset(client)
                return
            self._connections.add(connection)
            try:
                target_reader, target = await asyncio.open_connection(*self.target, limit=CHUNK)
            except OSError:
                self._counts["failed"] += 1
                connection.abort()
                return
            connection.target = target
            if connection not in self._connections:  # cut while connecting
                connection.abort()
                return
            self._counts["connected"] += 1
            await self._forward(connection, reader, target_reader)
        finally:
            self._connections.discard(connection)

    async def _forward(
        self,
        connection: _Connection,
        client_reader: asyncio.StreamReader,
        target_reader: asyncio.StreamReader,
    ) -> None:
        assert connection.target is not None
        counts = self._counts

        def to_target(n: int) -> None:
            counts["to_target"] += n

        def to_client(n: int) -> None:
            counts["to_client"] += n

        up = _Pipe(
            client_reader,
            connection.target,
            self._shapes[Direction.TO_TARGET],
            self.max_held_bytes,
            to_target,
        )
        down = _Pipe(
            target_reader,
            connection.client,
            self._shapes[Direction.TO_CLIENT],
            self.max_held_bytes,
            to_client,
        )
        connection.pipes = [up, down]
        connection.tasks = [
            asyncio.create_task(side())
            for side in (up.read_side, up.write_side, down.read_side, down.write_side)
        ]
        try:
            done, _ = await asyncio.wait(connection.tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            connection.abort()
            raise
        if any(t.cancelled() or t.exception() is not None for t in done):
            # A side broke (reset, or cut): pass the reset on to the other.
            connection.abort()
        else:
            for writer in (connection.client, connection.target):
                writer.close()
        await asyncio.gather(*connection.tasks, return_exceptions=True)

    async def _cut_all(self) -> int:
        cut = list(self._connections)
        self._connections.clear()
        for connection in cut:
            connection.abort()
        self._counts["cut"] += len(cut)
        # abort() closes each socket from a callback it schedules: let those
        # run, so the connections are closed when cut() returns.
        await asyncio.sleep(0)
        return len(cut)

    async def _shutdown(self) -> None:
        self._refusing = True
        if self._server is not None:
            self._server.close()
        await self._cut_all()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    # -- calls from other threads ----------------------------------------

    def _call(self, apply: Callable[[], T]) -> T:
        async def run() -> T:
            return apply()

        return self._call_async(run)

    def _call_async(self, apply: Callable[[], Awaitable[T]]) -> T:
        if self._closed:
            raise ClosedError(f"relay {self.url} is closed")
        if threading.current_thread() is self._thread:
            raise ConfigurationError("call a relay from outside its own thread")

        async def run() -> T:
            return await apply()

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(_CALL_TIMEOUT)
