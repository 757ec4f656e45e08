"""The blocking twin of the async API: same names, same verbs, same arguments.

Every call is forwarded to one event loop running in a background thread
(one per process), so sync objects are safe to share between threads.
Handlers given to the sync API are plain functions; they run in worker
threads, and a :class:`Delivery` here settles with plain calls.

    >>> import pigeon.sync
    >>> with pigeon.sync.connect("memory://doc") as conn:
    ...     conn.send("jobs", "hello")
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from . import connection as _async
from . import transports as _transports
from . import worker as _worker
from ._core.backoff import RetryPolicy
from .message import Message

__all__ = ["Connection", "Delivery", "Server", "Worker", "connect"]

T = TypeVar("T")


class _LoopThread:
    """One event loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_async.Connection] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="pigeon-loop", daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close_all(self) -> None:
        # At exit, give open connections a bounded chance to confirm and close.
        if self._loop is None or self._loop.is_closed():
            return
        for conn in list(self._connections):
            try:
                self.run(conn.close(timeout=2.0), timeout=5.0)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)


_runner = _LoopThread()
atexit.register(_runner.close_all)


class Delivery:
    """A delivery for a sync handler: ``ack``, ``nack``, ``reject``, ``extend``
    are plain calls."""

    def __init__(self, delivery: _transports.Delivery) -> None:
        self._delivery = delivery
        self.message = delivery.message
        self.queue = delivery.queue

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def settled(self) -> bool:
        return self._delivery.settled

    def decode(self, type: Any = None) -> Any:
        return self.message.decode(type)

    def ack(self) -> None:
        _runner.run(self._delivery.ack())

    def nack(self, delay: float = 0.0, reason: str = "") -> None:
        _runner.run(self._delivery.nack(delay, reason))

    def reject(self, reason: str = "rejected by handler") -> None:
        _runner.run(self._delivery.reject(reason))

    def extend(self) -> None:
        _runner.run(self._delivery.extend())


class Worker:
    """Blocking twin of :class:`pigeon.Worker`."""

    def __init__(self, worker: _worker.Worker) -> None:
        self._worker = worker
        self.queue = worker.queue

    @property
    def idle(self) -> bool:
        return self._worker.idle

    def close(self, timeout: float = 5.0) -> None:
        _runner.run(self._worker.close(timeout))

    def stats(self) -> dict[str, Any]:
        return self._worker.stats()


class Server:
    """Blocking twin of :class:`pigeon.Server`."""

    def __init__(self, server: _worker.Server) -> None:
        self._server = server
        self.service = server.service

    def close(self) -> None:
        _runner.run(self._server.close())

    def stats(self) -> dict[str, Any]:
        return self._server.stats()


class Connection:
    """Blocking twin of :class:`pigeon.Connection`."""

    def __init__(self, conn: _async.Connection) -> None:
        self._conn = conn

    def start(self) -> Connection:
        _runner.run(self._conn.start())
        _runner._connections.add(self._conn)
        return self

    def __enter__(self) -> Connection:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send_nowait(
        self,
        queue: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        message_id: str | None = None,
    ) -> concurrent.futures.Future[None]:
        async def queue_it() -> asyncio.Future[None]:
            return self._conn.send_nowait(
                queue, payload, headers=headers, content_type=content_type, message_id=message_id
            )

        inner = _runner.run(queue_it())
        outer: concurrent.futures.Future[None] = concurrent.futures.Future()

        def relay(done: asyncio.Future[None]) -> None:
            if done.cancelled():
                outer.cancel()
            elif done.exception() is not None:
                outer.set_exception(done.exception())
            else:
                outer.set_result(None)

        _runner.loop.call_soon_threadsafe(inner.add_done_callback, relay)
        return outer

    def send(
        self,
        queue: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        message_id: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        _runner.run(
            self._conn.send(
                queue,
                payload,
                headers=headers,
                content_type=content_type,
                message_id=message_id,
                timeout=timeout,
            )
        )

    def flush(self, timeout: float = 30.0) -> None:
        _runner.run(self._conn.flush(timeout))

    def consume(
        self,
        queue: str,
        handler: Callable[[Delivery], Any],
        *,
        prefetch: int = 64,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> Worker:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")

        def run_in_thread(delivery: _transports.Delivery) -> Any:
            return handler(Delivery(delivery))

        worker = _runner.run(
            self._conn.consume(
                queue,
                run_in_thread,
                prefetch=prefetch,
                concurrency=concurrency,
                retry=retry,
                lease_ttl=lease_ttl,
            )
        )
        return Worker(worker)

    def request(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> Message:
        return _runner.run(
            self._conn.request(
                service, payload, timeout=timeout, headers=headers, content_type=content_type
            )
        )

    def serve(self, service: str, handler: Callable[[Message], Any]) -> Server:
        return Server(_runner.run(self._conn.serve(service, handler)))

    def stats(self) -> dict[str, Any]:
        return _runner.run(_stats(self._conn))

    def close(self, timeout: float = 5.0) -> None:
        _runner._connections.discard(self._conn)
        _runner.run(self._conn.close(timeout))


async def _stats(conn: _async.Connection) -> dict[str, Any]:
    return conn.stats()


def connect(
    url: str | list[str] | None = None, *, bind: str | list[str] | None = None, **options: Any
) -> Connection:
    """Blocking twin of :func:`pigeon.connect`; start it with ``with`` or ``.start()``."""
    return Connection(_async.connect(url, bind=bind, **options))
