"""Testing an :class:`pigeon.App` without a broker or real waiting.

:class:`TestApp` starts the app on a fresh ``memory://`` hub (whatever URL it
was built with), on a loop whose clock moves only when told
(:class:`~pigeon.testing.clock.LoopClock`)::

    async with TestApp(app) as t:
        await t.send("orders", {"id": 1})      # returns once the app is idle
        await t.advance(30)                     # retries, leases, delays fire
        assert t.sent("invoices") and not t.errors

``TestApp(app).sync()`` is the same for a plain ``def test_...``: every verb a
blocking call that runs the loop until the app is idle again.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from .._core import headers, policy
from .._core.ledger import QueueLedger, dead_letter_queue
from ..connection import Connection, connect
from ..errors import ClosedError, ConfigurationError, NotStartedError, Timeout
from ..message import Message, new_id
from ..middleware import Middleware
from ..transports.memory import MemoryTransport
from .clock import DEFAULT_SETTLE_TIMEOUT, LoopClock, check_settle_timeout

if TYPE_CHECKING:
    from ..app import App

__all__ = ["DeadLetter", "Failure", "SyncTestApp", "TestApp"]

T = TypeVar("T")

DEFAULT_MAX_RECORDED = 10_000  # messages and failures kept for inspection
STOP_GRACE = 5.0  # seconds (on the test clock) running handlers get at close


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message its queue gave up on, with why and after how many attempts."""

    message: Message
    reason: str
    attempts: int

    def decode(self, type: Any = None) -> Any:
        """The body, decoded as :meth:`pigeon.Message.decode` does."""
        return self.message.decode(type)


@dataclass(frozen=True, slots=True)
class Failure:
    """A handler that raised: where (``"worker"``, ``"service"``,
    ``"subscriber"`` or ``"schedule"`` and its queue, service, pattern or
    schedule name), on what, and the exception. The app retried, answered
    or counted it as usual; this is the record."""

    kind: str
    name: str
    message: Message | None  # as the handler got it (attempt included)
    error: Exception


class TestApp:
    """Runs an app on ``memory://`` under a test clock (see module docstring).

    Args:
        app: the app to test; it is started here and stopped at close.
        settle_timeout: real seconds the app may stay busy before a verb
            gives up with :class:`~pigeon.errors.Timeout` (a handler that
            never ends, or spins).
        max_recorded: messages sent and failures kept for inspection; past
            it more are counted in ``stats()["unrecorded"]``, not kept.
    """

    __test__ = False  # a class named Test*, but not a pytest test class

    def __init__(
        self,
        app: App,
        *,
        settle_timeout: float = DEFAULT_SETTLE_TIMEOUT,
        max_recorded: int = DEFAULT_MAX_RECORDED,
    ) -> None:
        if isinstance(max_recorded, bool) or not isinstance(max_recorded, int) or max_recorded < 0:
            raise ConfigurationError(f"max_recorded must be an int >= 0, not {max_recorded!r}")
        self.app = app
        self.url = f"memory://pigeon-test-{new_id()}"
        self.settle_timeout = check_settle_timeout(settle_timeout)
        self.max_recorded = max_recorded
        self.errors: list[Failure] = []
        self._sent: dict[str, list[Message]] = {}
        self._published: dict[str, list[Message]] = {}
        self._recorded = 0
        self._unrecorded = 0
        self._clock: LoopClock | None = None
        self._conn: Connection | None = None
        self._client: Connection | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------

    async def __aenter__(self) -> TestApp:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def sync(self) -> SyncTestApp:
        """The blocking form, for a plain ``def`` test:
        ``with TestApp(app).sync() as t:``."""
        return SyncTestApp(self)

    async def start(self) -> None:
        """Install the test clock on the running loop, start the app on a
        fresh memory hub, and let it settle.

        Raises:
            ClosedError: it was closed (make a new one).
            ConfigurationError: it was started already, or the loop cannot
                take a test clock.
        """
        if self._closed:
            raise ClosedError("this TestApp is closed; make a new one")
        if self._clock is not None:
            raise ConfigurationError("this TestApp is started already")
        clock = LoopClock(settle_timeout=self.settle_timeout)
        clock.install()
        self._clock = clock
        try:
            conn = await self._start_app()
            self._conn = conn
            self._watch(conn)
            self._client = await connect(self.url)
            await clock.settle()
        except BaseException:
            await self.close()
            raise

    async def _start_app(self) -> Connection:
        # The app connects where it was told; here, for this run only, to a
        # memory hub of its own (its transport options are for that URL),
        # with a middleware that records what it sends, and its scheduled
        # functions watched (the scheduler counts their failures, no more).
        app = self.app
        saved = app._connect_args, list(app._middleware), app._schedules
        app._connect_args = (self.url, None, {})
        app._middleware.append(_Recorder(self))
        app._schedules = [
            (schedule, self._watched("schedule", schedule.name, fn))
            for schedule, fn in app._schedules
        ]
        try:
            return await app.start()
        finally:
            app._connect_args, app._middleware, app._schedules = saved

    async def close(self) -> None:
        """Stop the app (running handlers get ``STOP_GRACE`` seconds of the
        test clock), then give the loop its own clock back. Closing twice
        does nothing."""
        if self._closed:
            return
        self._closed = True
        clock = self._clock
        try:
            if clock is not None and self._app_on_hub():
                await self._drive(clock, self.app.stop(STOP_GRACE), STOP_GRACE + 2.0)
            if self._client is not None:
                await self._client.close()
        finally:
            if clock is not None:
                clock.uninstall()

    def _app_on_hub(self) -> bool:
        # Also after a start that failed half way: the app may have connected.
        conn = self.app.connection
        return conn is not None and conn.transport.url == self.url

    # -- verbs ---------------------------------------------------------------

    async def send(self, queue: str, payload: Any, **options: Any) -> None:
        """Send as a producer outside the app would (options as for
        :meth:`pigeon.Connection.send`), then settle."""
        client, clock = self._live()
        await client.send(queue, payload, **options)
        await clock.settle()

    async def publish(self, topic: str, payload: Any, **options: Any) -> None:
        """Publish as :meth:`pigeon.Connection.publish` does, then settle."""
        client, clock = self._live()
        await client.publish(topic, payload, **options)
        await clock.settle()

    async def request(
        self, service: str, payload: Any, *, timeout: float = 10.0, **options: Any
    ) -> Message:
        """Call a service of the app and return its reply. While the handler
        waits on the clock (``asyncio.sleep``, timeouts), the clock moves as
        a caller's would, up to ``timeout``.

        Raises:
            as :meth:`pigeon.Connection.request` (``Rejected`` when the
            handler raised, ``Timeout``, ``NoResponders``).
        """
        client, clock = self._live()
        call = client.request(service, payload, timeout=timeout, **options)
        reply = await self._drive(clock, call, timeout)
        await clock.settle()
        return reply

    async def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward: every retry, lease expiry,
        delayed message and timer due on the way fires at its time, and the
        app settles after each.

        Raises:
            ConfigurationError: ``seconds`` is negative or not a finite number.
            Timeout: the app stayed busy ``settle_timeout`` real seconds.
        """
        _client, clock = self._live()
        await clock.advance(seconds)

    async def settle(self) -> None:
        """Return once the app is idle: nothing ready to run, nothing due
        now, no handler running in a thread.

        Raises:
            Timeout: still busy after ``settle_timeout`` real seconds.
        """
        _client, clock = self._live()
        await clock.settle()

    # -- inspection ----------------------------------------------------------

    @property
    def clock(self) -> LoopClock:
        """The test clock (``time()``, ``wall()``, ``offset``)."""
        return self._live()[1]

    @property
    def connection(self) -> Connection:
        """The app's own connection (on this test's memory hub)."""
        self._live()
        assert self._conn is not None  # set by start, with the client
        return self._conn

    def sent(self, queue: str) -> list[Message]:
        """Messages the app itself sent to ``queue`` (not the test's), oldest
        first, as they left it (a send that waited for room in a full queue
        is seen once per try)."""
        return list(self._sent.get(queue, ()))

    def published(self, topic: str) -> list[Message]:
        """Messages the app itself published on ``topic``, oldest first."""
        return list(self._published.get(topic, ()))

    def queue(self, queue: str) -> dict[str, int]:
        """Counts of ``queue`` now (``ready``, ``delayed``, ``in_flight``,
        ``consumers``, ``acked``, …) and ``dead``: its dead letters."""
        ledger = self._ledger(queue)
        counts = (ledger or QueueLedger(queue)).snapshot()
        dead = self._ledger(dead_letter_queue(queue))
        counts["dead"] = dead.ready_count if dead is not None else 0
        return counts

    def dead(self, queue: str) -> list[DeadLetter]:
        """The dead letters of ``queue``, oldest first, with their reasons."""
        ledger = self._ledger(dead_letter_queue(queue))
        if ledger is None:
            return []
        letters = []
        for message in ledger.peek_ready(ledger.ready_count):
            attempts = message.headers.get(headers.ATTEMPTS, "0")
            letters.append(
                DeadLetter(
                    message,
                    policy.dead_reason(message.headers),
                    int(attempts) if attempts.isdigit() else 0,
                )
            )
        return letters

    def stats(self) -> dict[str, Any]:
        """The app's connection stats, and what this kit recorded."""
        stats = self.connection.stats()
        stats["test"] = {
            "recorded": self._recorded,
            "unrecorded": self._unrecorded,
            "failures": len(self.errors),
            "clock_offset": self.clock.offset,
        }
        return stats

    # -- inside --------------------------------------------------------------

    def _live(self) -> tuple[Connection, LoopClock]:
        if self._closed:
            raise ClosedError("this TestApp is closed")
        if self._client is None or self._clock is None:
            raise NotStartedError(
                "this TestApp is not started: use 'async with TestApp(app) as t:' "
                "or 'with TestApp(app).sync() as t:'"
            )
        return self._client, self._clock

    def _ledger(self, queue: str) -> QueueLedger | None:
        transport = self.connection.transport
        assert isinstance(transport, MemoryTransport)  # started on self.url
        # The hub's host is the memory transport's own; read, never changed here.
        return transport._live_hub().host.queues.get(queue)

    async def _drive(self, clock: LoopClock, work: Coroutine[Any, Any, T], within: float) -> T:
        """Await ``work``, moving the clock from timer to timer while it
        waits on one, at most ``within`` seconds ahead."""
        task = asyncio.ensure_future(work)
        # A second more: the work's own timer for ``within`` is set a moment
        # after this reading, and must be reached on the clock, not waited for.
        limit = clock.time() + within + 1.0
        try:
            while True:
                await clock.settle()
                if task.done():
                    return task.result()
                due = clock.next_timer()
                if due is None or due > limit:
                    break
                clock.move_to(due)
            # Waiting on nothing the clock moves: give it real time, bounded.
            done, _ = await asyncio.wait({task}, timeout=clock.settle_timeout)
            if not done:
                raise Timeout(f"still waiting after {clock.settle_timeout} s")
            return task.result()
        finally:
            if not task.done():
                task.cancel()

    def _record(self, book: dict[str, list[Message]], name: str, message: Message) -> None:
        if self._recorded >= self.max_recorded:
            self._unrecorded += 1
            return
        self._recorded += 1
        # A copy: a host changes the message it holds (attempt, headers).
        book.setdefault(name, []).append(msgspec.structs.replace(message))

    def _failed(self, kind: str, name: str, argument: Any, error: Exception) -> None:
        if len(self.errors) >= self.max_recorded:
            self._unrecorded += 1
            return
        message = argument if isinstance(argument, Message) else getattr(argument, "message", None)
        if message is not None:
            message = msgspec.structs.replace(message)  # as it was, not as it ends
        self.errors.append(Failure(kind, name, message, error))

    def _watch(self, conn: Connection) -> None:
        """Record what the app's handlers raise: the exceptions themselves,
        which middleware sees only as text."""
        for worker in conn._workers:
            pattern = getattr(worker, "pattern", None)
            kind, name = ("subscriber", pattern) if pattern else ("worker", worker.queue)
            worker.handler = self._watched(kind, name, worker.handler)
        for server in conn._servers:
            server.handler = self._watched("service", server.service, server.handler)

    def _watched(self, kind: str, name: str, handler: Callable[..., Any]) -> Any:
        # The same kind of callable as the handler, with its signature
        # (functools.wraps): a worker runs a plain one in a thread and awaits
        # an async one, and a scheduler passes the time to one that takes it.
        failed = self._failed
        if inspect.iscoroutinefunction(handler):

            @functools.wraps(handler)
            async def watched_async(*arguments: Any) -> Any:
                try:
                    return await handler(*arguments)
                except Exception as exc:
                    failed(kind, name, arguments[0] if arguments else None, exc)
                    raise

            return watched_async

        @functools.wraps(handler)
        def watched(*arguments: Any) -> Any:
            try:
                return handler(*arguments)
            except Exception as exc:  # recorded from the handler's thread
                failed(kind, name, arguments[0] if arguments else None, exc)
                raise

        return watched


class _Recorder(Middleware):
    """Records what the app under test sends and publishes."""

    def __init__(self, test_app: TestApp) -> None:
        self.test_app = test_app

    def on_send(self, queue: str, message: Message) -> None:
        self.test_app._record(self.test_app._sent, queue, message)

    def on_publish(self, topic: str, message: Message) -> None:
        self.test_app._record(self.test_app._published, topic, message)


class SyncTestApp:
    """:class:`TestApp` for plain ``def`` tests: the same verbs, blocking.

    It owns an event loop that runs only inside its calls; each call returns
    once the app is idle, so nothing is left half done between them.
    """

    __test__ = False

    def __init__(self, test_app: TestApp) -> None:
        self.test_app = test_app
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> SyncTestApp:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            work.close()
            if self.test_app._closed:
                raise ClosedError("this TestApp is closed")
            raise NotStartedError(
                "this TestApp is not started: use 'with TestApp(app).sync() as t:'"
            )
        return loop.run_until_complete(work)

    def start(self) -> None:
        """Open its loop and start the app there.

        Raises:
            ConfigurationError: called from async code (use ``async with
                TestApp(app)`` there), or started already.
            ClosedError: it was closed.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise ConfigurationError(
                "TestApp(app).sync() blocks, so not inside async code: "
                "use 'async with TestApp(app) as t:' there"
            )
        if self._loop is not None:
            raise ConfigurationError("this TestApp is started already")
        if self.test_app._closed:
            raise ClosedError("this TestApp is closed; make a new one")
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.test_app.start())
        except BaseException:
            self._close_loop()
            raise

    def close(self) -> None:
        """Stop the app and close its loop; closing twice does nothing."""
        if self._loop is None:
            return
        try:
            self._loop.run_until_complete(self.test_app.close())
        finally:
            self._close_loop()

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()

    # Verbs: one-line forwards (a test checks they match TestApp's).

    def send(self, queue: str, payload: Any, **options: Any) -> None:
        """See :meth:`TestApp.send`."""
        self._run(self.test_app.send(queue, payload, **options))

    def publish(self, topic: str, payload: Any, **options: Any) -> None:
        """See :meth:`TestApp.publish`."""
        self._run(self.test_app.publish(topic, payload, **options))

    def request(
        self, service: str, payload: Any, *, timeout: float = 10.0, **options: Any
    ) -> Message:
        """See :meth:`TestApp.request`."""
        return self._run(self.test_app.request(service, payload, timeout=timeout, **options))

    def advance(self, seconds: float) -> None:
        """See :meth:`TestApp.advance`."""
        self._run(self.test_app.advance(seconds))

    def settle(self) -> None:
        """See :meth:`TestApp.settle`."""
        self._run(self.test_app.settle())

    # Inspection: the TestApp's own.

    @property
    def app(self) -> App:
        return self.test_app.app

    @property
    def errors(self) -> list[Failure]:
        return self.test_app.errors

    @property
    def clock(self) -> LoopClock:
        return self.test_app.clock

    @property
    def connection(self) -> Connection:
        return self.test_app.connection

    def sent(self, queue: str) -> list[Message]:
        return self.test_app.sent(queue)

    def published(self, topic: str) -> list[Message]:
        return self.test_app.published(topic)

    def queue(self, queue: str) -> dict[str, int]:
        return self.test_app.queue(queue)

    def dead(self, queue: str) -> list[DeadLetter]:
        return self.test_app.dead(queue)

    def stats(self) -> dict[str, Any]:
        return self.test_app.stats()
