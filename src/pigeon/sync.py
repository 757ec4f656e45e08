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
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from . import connection as _async
from . import subscriber as _subscriber
from . import transports as _transports
from . import worker as _worker
from ._core import topics
from ._core.backoff import RetryPolicy
from .errors import SubscriberDisconnected
from .message import Message
from .middleware import Middleware
from .sync_admin import Admin, open_admin
from .transports.tasks import start_task

__all__ = [
    "Admin",
    "Connection",
    "Delivery",
    "Event",
    "EventStream",
    "Server",
    "Subscriber",
    "Worker",
    "connect",
    "open_admin",
]

T = TypeVar("T")
P = ParamSpec("P")


class _LoopThread:
    """One event loop in a daemon thread, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_async.Connection] = set()
        self._admins: set[Any] = set()  # pigeon.admin sessions of sync_admin.Admin

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            return loop  # the usual case: no lock for every call
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="pigeon-loop", daemon=True)
                thread.start()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop thread and wait for its result."""
        return _run_on(self.loop, coro, timeout)

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Call the plain function ``fn`` on the loop thread and return its result."""

        async def invoke() -> T:
            return fn(*args, **kwargs)

        return self.run(invoke())

    def submit(
        self, fn: Callable[P, asyncio.Future[T]], *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[T]:
        """Call ``fn`` on the loop thread (raising what it raises) and return a
        thread-safe future that resolves with the asyncio future it returned.

        Cancelling the returned future does not cancel the asyncio one.
        """
        outer: concurrent.futures.Future[T] = concurrent.futures.Future()

        def relay(inner: asyncio.Future[T]) -> None:
            if not outer.set_running_or_notify_cancel():
                return  # cancelled by its owner: nobody wants the outcome
            if inner.cancelled():
                outer.set_exception(concurrent.futures.CancelledError())
            elif (error := inner.exception()) is not None:
                outer.set_exception(error)
            else:
                outer.set_result(inner.result())

        def start() -> None:
            fn(*args, **kwargs).add_done_callback(relay)

        self.call(start)
        return outer

    def close_all(self) -> None:
        # At exit, give open connections a bounded chance to confirm and close,
        # and close the admin sessions left open.
        if self._loop is None or self._loop.is_closed():
            return
        for conn in list(self._connections):
            try:
                self.run(conn.close(timeout=2.0), timeout=5.0)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        for admin in list(self._admins):
            try:
                self.run(admin.close(), timeout=5.0)
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)


class _Call(Generic[T]):
    """One blocking call handed to a loop running in another thread.

    The calling thread schedules :meth:`start` with one
    ``call_soon_threadsafe`` (the only wake-up of the loop), which starts the
    coroutine as a real task (on Python 3.12+ its first step runs right
    there). The task itself hands the outcome back as it finishes, by
    releasing a lock the calling thread is blocked on: no done-callback (a
    loop iteration of its own) and no ``concurrent.futures.Future``.
    """

    __slots__ = ("_coro", "_done", "_error", "_gave_up", "_loop", "_result", "_started", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> None:
        self._loop = loop
        self._coro = coro
        self._done = threading.Lock()
        self._done.acquire()  # released by the task once the outcome is in
        self._result: T | None = None
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._gave_up = False

    def start(self) -> None:
        """On the loop thread: run the coroutine as a task, unless the caller
        already gave up."""
        if self._gave_up:
            self._coro.close()
            return
        run = self._run()
        try:
            # On 3.12+ the first step runs now, inside this callback, as a
            # real task; before, in the loop's next iteration.
            self._task = start_task(run, self._loop)
        except BaseException as error:  # the caller must not wait for nothing
            run.close()
            self._coro.close()
            self._error = error
            self._done.release()

    async def _run(self) -> None:
        self._started = True
        try:
            self._result = await self._coro
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled (or the loop went away): the caller sees what a
            # cancelled concurrent.futures.Future raises.
            self._error = concurrent.futures.CancelledError()
            raise
        except BaseException as error:  # handed, whatever it is, to the caller
            self._error = error
        finally:
            self._done.release()

    def _cancel(self) -> None:
        # On the loop thread, after start() if that was scheduled (callbacks
        # run in order). A coroutine that never ran is closed here, so it
        # does not warn that it was never awaited.
        if self._task is None:
            self._coro.close()  # start() closed it already, or never came
            return
        self._task.cancel()
        if not self._started:
            self._coro.close()  # the task will never run it

    def _give_up(self) -> None:
        # In the calling thread, once it stops waiting (timeout, interrupt).
        self._gave_up = True
        try:
            self._loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:
            pass  # the loop is closed: nothing more will run there

    def run(self, timeout: float | None) -> T:
        """Hand the coroutine to the loop, block until its outcome is in and
        return it (or raise it here).

        Raises:
            TimeoutError: not done after ``timeout`` seconds (None: no
                limit; zero or less: only if already done). The
                coroutine is then cancelled, as it is when the wait is
                interrupted (KeyboardInterrupt).
            RuntimeError: the loop is closed.
        """
        try:
            self._loop.call_soon_threadsafe(self.start)
        except RuntimeError:  # the loop is closed: nothing was scheduled
            self._coro.close()
            raise
        except BaseException:  # interrupted: start() may be scheduled or not
            self._give_up()
            raise
        try:
            if timeout is None:
                done = self._done.acquire()
            elif timeout > 0:
                done = self._done.acquire(True, timeout)
            else:
                done = self._done.acquire(False)
        except BaseException:
            self._give_up()
            raise
        if not done:
            self._give_up()
            raise TimeoutError(f"the call did not finish within {timeout} s")
        error = self._error
        if error is not None:
            self._error = None  # no cycle through the traceback
            try:
                raise error
            finally:
                del error
        return cast(T, self._result)


def _run_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float | None = None
) -> T:
    """Run ``coro`` on ``loop`` (running in another thread) and wait for it.

    Raises what ``coro`` raises, KeyboardInterrupt and SystemExit too (the
    loop runs on), or ``concurrent.futures.CancelledError`` if it was
    cancelled; ``TimeoutError`` after ``timeout`` seconds, having cancelled
    it (a coroutine that had not started by then never runs); RuntimeError
    if called on ``loop``'s own thread or when ``loop`` is closed.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError(
            "a blocking pigeon.sync call was made on the event loop it waits for; "
            "use the async API (await ...) there"
        )
    return _Call(loop, coro).run(timeout)


_runner = _LoopThread()
atexit.register(_runner.close_all)


class Delivery:
    """A delivery for a plain (non-async) handler running in a thread:
    ``ack``, ``nack``, ``reject`` and ``extend`` are blocking calls that
    settle on the delivery's event loop and return once it has settled
    (raising what the async :class:`pigeon.Delivery` would raise).
    """

    __slots__ = ("_delivery", "_loop", "message", "queue")

    def __init__(
        self, delivery: _transports.Delivery, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._delivery = delivery
        self._loop = loop
        self.message = delivery.message
        self.queue = delivery.queue

    @property
    def body(self) -> bytes:
        return self.message.body

    @property
    def settled(self) -> bool:
        """True once the delivery was acked, nacked or rejected."""
        return self._delivery.settled

    @property
    def tag(self) -> Any:
        """The transport's own handle on the delivery (see :class:`pigeon.Delivery`)."""
        return self._delivery.tag

    @overload
    def decode(self) -> Any: ...
    @overload
    def decode(self, type: type[T]) -> T: ...
    @overload
    def decode(self, type: Any) -> Any: ...
    def decode(self, type: Any = None) -> Any:
        """Decode the body (see :meth:`pigeon.Message.decode`)."""
        return self.message.decode(type)

    def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        _run_on(self._loop or _runner.loop, coro)

    def ack(self) -> None:
        """Settle as done: the queue forgets the message."""
        self._run(self._delivery.ack())

    def nack(self, delay: float = 0.0, reason: str = "") -> None:
        """Settle as not done: deliver it again, after ``delay`` seconds."""
        self._run(self._delivery.nack(delay, reason))

    def reject(self, reason: str = "rejected by handler") -> None:
        """Settle as failed for good: dead-letter it with ``reason``."""
        self._run(self._delivery.reject(reason))

    def extend(self) -> None:
        """Ask for more time: the lease is renewed for another ``lease_ttl``."""
        self._run(self._delivery.extend())


class Event(Delivery):
    """Blocking twin of :class:`pigeon.Event`: a :class:`Delivery` (settled
    with plain calls) with the event's ``topic``, its ``seq`` in that topic
    and how many numbers were ``missed`` right before it (0: none)."""

    __slots__ = ("missed", "seq", "topic")

    def __init__(
        self, event: _subscriber.Event, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        super().__init__(event, loop)
        self.topic = event.topic
        self.seq = event.seq
        self.missed = event.missed


class Worker:
    """Blocking twin of :class:`pigeon.Worker`."""

    def __init__(self, worker: _worker.Worker) -> None:
        self._worker = worker
        self.queue = worker.queue

    @property
    def closed(self) -> bool:
        """True once it stopped (drained or closed) and its runners ended."""
        return _runner.call(lambda: self._worker.closed)

    @property
    def idle(self) -> bool:
        """True when no delivery is waiting or being handled here."""
        return _runner.call(lambda: self._worker.idle)

    def drain(self, grace: float = 30.0) -> None:
        _runner.run(self._worker.drain(grace))

    def close(self, timeout: float = 5.0) -> None:
        _runner.run(self._worker.close(timeout))

    def stats(self) -> dict[str, Any]:
        return _runner.call(self._worker.stats)


class Server:
    """Blocking twin of :class:`pigeon.Server`."""

    def __init__(self, server: _worker.Server) -> None:
        self._server = server
        self.service = server.service

    def drain(self, grace: float = 30.0) -> None:
        _runner.run(self._server.drain(grace))

    def close(self, timeout: float = 5.0) -> None:
        _runner.run(self._server.close(timeout))

    def stats(self) -> dict[str, Any]:
        return _runner.call(self._server.stats)


class Subscriber(Worker):
    """Blocking twin of :class:`pigeon.Subscriber`: a :class:`Worker` for the
    topics matching ``pattern``."""

    def __init__(self, subscriber: _subscriber.Subscriber) -> None:
        super().__init__(subscriber)
        self._subscriber = subscriber
        self.pattern = subscriber.pattern

    @property
    def disconnected(self) -> SubscriberDisconnected | None:
        """The error the host cut this subscriber off with; None while it runs."""
        return self._subscriber.disconnected

    def wait_disconnected(self) -> SubscriberDisconnected:
        """Block until the host cuts this subscriber off; the error it gave
        (poll :attr:`disconnected` to wait with a limit)."""
        return _runner.run(self._subscriber.wait_disconnected())

    def stats(self) -> dict[str, Any]:
        return _runner.call(self._subscriber.stats)


class EventStream:
    """Blocking twin of :class:`pigeon.EventStream`: the events of a
    subscription, one at a time, as :class:`Event`::

        with conn.subscription("prices.>", last=10) as events:
            for event in events:
                print(event.topic, event.seq, event.decode())

    An event is acked when the loop asks for the next one or leaves, unless
    it was settled by hand; if the loop's body raises, the retry policy
    takes that event as failed. Leaving the ``with`` ends the subscription
    (without it, :meth:`close` or the connection's close does). A
    subscription cut off by its host raises
    :class:`~pigeon.errors.SubscriberDisconnected` from the loop.
    """

    def __init__(self, stream: _subscriber.EventStream) -> None:
        self._stream = stream
        self._subscriber: Subscriber | None = None

    @property
    def subscriber(self) -> Subscriber:
        running = _runner.call(lambda: self._stream.subscriber)
        if self._subscriber is None or self._subscriber._subscriber is not running:
            self._subscriber = Subscriber(running)
        return self._subscriber

    def __enter__(self) -> EventStream:
        _runner.run(self._stream.__aenter__())
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        _runner.run(self._stream.__aexit__(exc_type, exc, tb))

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        event = _runner.run(self._stream.__anext__())
        return Event(event)

    def close(self) -> None:
        """End the subscription (the current event, if any, is acked)."""
        _runner.run(self._stream.aclose())

    aclose = close  # the async name, so the twin has every verb

    def stats(self) -> dict[str, Any]:
        return _runner.call(self._stream.stats)


class Connection:
    """Blocking twin of :class:`pigeon.Connection`: the same verbs with the
    same arguments; each call runs on the shared loop thread and blocks until
    it is done. Futures returned here are :class:`concurrent.futures.Future`."""

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
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
    ) -> concurrent.futures.Future[None]:
        return _runner.submit(
            self._conn.send_nowait,
            queue,
            payload,
            headers=headers,
            content_type=content_type,
            message_id=message_id,
            ttl=ttl,
            delay=delay,
            not_before=not_before,
        )

    def send_many(
        self,
        queue: str,
        payloads: Iterable[Any],
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
    ) -> concurrent.futures.Future[None]:
        return _runner.submit(
            self._conn.send_many,
            queue,
            payloads,
            headers=headers,
            content_type=content_type,
            ttl=ttl,
            delay=delay,
            not_before=not_before,
        )

    def send(
        self,
        queue: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        message_id: str | None = None,
        timeout: float = 30.0,
        ttl: float | None = None,
        delay: float | None = None,
        not_before: float | None = None,
    ) -> None:
        _runner.run(
            self._conn.send(
                queue,
                payload,
                headers=headers,
                content_type=content_type,
                message_id=message_id,
                timeout=timeout,
                ttl=ttl,
                delay=delay,
                not_before=not_before,
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
        abandon_on_host_loss: bool = True,
    ) -> Worker:
        """Run the plain function ``handler(delivery)`` in a thread for every
        message of ``queue`` (see :meth:`pigeon.Connection.consume`)."""
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
                abandon_on_host_loss=abandon_on_host_loss,
            )
        )
        return Worker(worker)

    def publish_nowait(
        self,
        topic: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> concurrent.futures.Future[None]:
        return _runner.submit(
            self._conn.publish_nowait, topic, payload, headers=headers, content_type=content_type
        )

    def publish(
        self,
        topic: str,
        payload: Any,
        *,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        _runner.run(
            self._conn.publish(
                topic, payload, headers=headers, content_type=content_type, timeout=timeout
            )
        )

    def subscribe(
        self,
        pattern: str,
        handler: Callable[[Event], Any],
        *,
        name: str | None = None,
        policy: str = "drop-oldest",
        buffer: int = topics.DEFAULT_BUFFER,
        from_seq: int | None = None,
        from_time: float | None = None,
        last: int | None = None,
        last_per_subject: bool = False,
        prefetch: int = 64,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> Subscriber:
        """Run the plain function ``handler(event)`` in a thread for every
        message published on a topic matching ``pattern``; it gets an
        :class:`Event` (see :meth:`pigeon.Connection.subscribe`)."""
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")

        def run_in_thread(delivery: _transports.Delivery) -> Any:
            return handler(Event(cast(_subscriber.Event, delivery)))

        subscriber = _runner.run(
            self._conn.subscribe(
                pattern,
                run_in_thread,
                name=name,
                policy=policy,
                buffer=buffer,
                from_seq=from_seq,
                from_time=from_time,
                last=last,
                last_per_subject=last_per_subject,
                prefetch=prefetch,
                concurrency=concurrency,
                retry=retry,
                lease_ttl=lease_ttl,
            )
        )
        return Subscriber(subscriber)

    def subscription(
        self,
        pattern: str,
        *,
        name: str | None = None,
        policy: str = "drop-oldest",
        buffer: int = topics.DEFAULT_BUFFER,
        from_seq: int | None = None,
        from_time: float | None = None,
        last: int | None = None,
        last_per_subject: bool = False,
        prefetch: int = 64,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> EventStream:
        """The events of a subscription as a blocking iterator (options as
        for :meth:`subscribe`; see :class:`EventStream`)."""
        stream = _runner.call(
            self._conn.subscription,
            pattern,
            name=name,
            policy=policy,
            buffer=buffer,
            from_seq=from_seq,
            from_time=from_time,
            last=last,
            last_per_subject=last_per_subject,
            prefetch=prefetch,
            retry=retry,
            lease_ttl=lease_ttl,
        )
        return EventStream(stream)

    def retain(
        self,
        pattern: str,
        *,
        max_count: int | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
    ) -> None:
        _runner.run(
            self._conn.retain(pattern, max_count=max_count, max_bytes=max_bytes, max_age=max_age)
        )

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

    def request_all(
        self,
        service: str,
        payload: Any,
        *,
        timeout: float = 1.0,
        min_replies: int = 1,
        headers: dict[str, str] | None = None,
        content_type: str | None = None,
    ) -> list[Message]:
        return _runner.run(
            self._conn.request_all(
                service,
                payload,
                timeout=timeout,
                min_replies=min_replies,
                headers=headers,
                content_type=content_type,
            )
        )

    def serve(self, service: str, handler: Callable[[Message], Any]) -> Server:
        return Server(_runner.run(self._conn.serve(service, handler)))

    def reload_acl(self) -> int:
        return _runner.call(self._conn.reload_acl)

    def stats(self) -> dict[str, Any]:
        return _runner.call(self._conn.stats)

    def close(self, timeout: float = 5.0) -> None:
        _runner._connections.discard(self._conn)
        _runner.run(self._conn.close(timeout))


def connect(
    url: str | list[str] | None = None,
    *,
    bind: str | list[str] | None = None,
    middleware: Sequence[Middleware] = (),
    **options: Any,
) -> Connection:
    """Blocking twin of :func:`pigeon.connect`; start it with ``with`` or ``.start()``.
    Middleware hooks run on the loop thread (see ``pigeon.Middleware``)."""
    return Connection(_async.connect(url, bind=bind, middleware=middleware, **options))
