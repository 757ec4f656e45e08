"""Decorators that turn functions into workers and services.

    app = pigeon.App("tcp://127.0.0.1:6700")

    @app.worker("words")
    async def process(word: str) -> None: ...

    @app.service("case")
    def upper(word: str) -> str:
        return word.upper()

    app.retain("prices.>", max_count=100)   # history, declared at start

    @app.subscriber("prices.>", last_per_subject=True)
    def show(event: pigeon.sync.Event) -> None:
        print(event.topic, event.seq, event.decode())

    app.run()   # until Ctrl-C or SIGTERM, then drains and stops

A handler's first parameter says what it gets: annotated ``Delivery`` (settle
by hand), ``Message`` (the envelope), a type (the body decoded into it), or
nothing (the body decoded by its content type). A subscriber's handler may
also ask for an ``Event`` (a delivery with ``topic``, ``seq`` and ``missed``);
annotated ``Delivery``, it gets one too.

An ``async def`` handler runs on the event loop and gets a
:class:`pigeon.Delivery`, whose settle methods are awaited. A plain ``def``
handler runs in a thread and gets a :class:`pigeon.sync.Delivery` (annotate it
as either; a subscriber's gets a :class:`pigeon.sync.Event`), whose ``ack``,
``nack``, ``reject`` and ``extend`` are blocking calls that settle on the
app's loop before they return.

The decorators return the function they are given, unchanged and with its
type, so it can still be called and type-checked directly.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from . import sync
from ._core import schedule as schedules
from ._core import topics
from ._core.backoff import RetryPolicy
from .connection import Connection, connect
from .errors import ConfigurationError
from .message import Message
from .middleware import Middleware, check_middleware
from .scheduler import Scheduler, check_schedule_handler, mode_for
from .subscriber import Event
from .transports import Delivery
from .worker import call_handler

__all__ = ["App", "adapt_handler"]

F = TypeVar("F", bound=Callable[..., Any])

_DELIVERY_TYPES = (Delivery, sync.Delivery, Event, sync.Event)
_EVENT_TYPES = (Event, sync.Event)
_BLOCKING_TYPES = (sync.Delivery, sync.Event)


def _first_parameter_type(fn: Callable[..., Any]) -> Any:
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise TypeError(f"handler {fn.__name__} must take one argument (the message)")
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        hints = {}
    return hints.get(params[0].name, None)


def adapt_handler(
    fn: Callable[..., Any], *, gets_delivery: bool, gets_event: bool = False
) -> Callable[[Any], Any]:
    """Wrap ``fn`` so it receives what its first parameter's annotation asks for.

    The wrapper is a coroutine function if ``fn`` is one, else a plain one (run
    in a thread by the worker), so blocking handlers never block the loop. A
    plain handler that asks for a delivery gets a :class:`pigeon.sync.Delivery`
    bound to the loop, so settling from its thread really settles (a
    :class:`pigeon.sync.Event` when it is given an event).

    ``gets_event``: ``fn`` is a subscriber's handler, given events,
    so it may ask for one.

    Raises:
        TypeError: ``fn`` takes no argument, a service handler asks for a
            delivery, a handler that gets no events asks for one, or an
            async handler asks for a blocking one.
    """
    wanted = _first_parameter_type(fn)
    is_async = inspect.iscoroutinefunction(fn)
    if wanted in _DELIVERY_TYPES:
        if not gets_delivery:
            raise TypeError(f"service handler {fn.__name__} gets a Message, not a Delivery")
        if wanted in _EVENT_TYPES and not gets_event:
            raise TypeError(
                f"handler {fn.__name__} gets a Delivery, not an Event "
                "(events are for subscribers: @app.subscriber)"
            )
        if is_async and wanted in _BLOCKING_TYPES:
            async_name = "pigeon.Event" if wanted is sync.Event else "pigeon.Delivery"
            raise TypeError(
                f"async handler {fn.__name__} gets a {async_name} (awaitable settles); "
                f"pigeon.sync.{wanted.__name__} is for plain (def) handlers"
            )
        if is_async:
            return fn
        return _plain_with_delivery(fn)

    def convert(arg: Delivery | Message) -> Any:
        message = arg.message if isinstance(arg, Delivery) else arg
        if wanted is Message:
            return message
        return message.decode(None if wanted in (None, Any) else wanted)

    if is_async:

        async def call_async(arg: Any) -> Any:
            return await fn(convert(arg))

        return call_async

    def call(arg: Any) -> Any:
        return fn(convert(arg))

    return call


def _plain_with_delivery(fn: Callable[..., Any]) -> Callable[[Delivery], Any]:
    async def call_in_thread(delivery: Delivery) -> Any:
        # Bound to this loop: the handler's settles are run here, from its thread.
        loop = asyncio.get_running_loop()
        blocking = (
            sync.Event(delivery, loop)
            if isinstance(delivery, Event)
            else sync.Delivery(delivery, loop)
        )
        return await call_handler(fn, blocking)

    return call_in_thread


@dataclass
class _WorkerSpec:
    queue: str
    handler: Callable[[Any], Any]
    prefetch: int
    concurrency: int | None  # None: the app's default (App.configure)
    retry: RetryPolicy | None
    lease_ttl: float


@dataclass
class _SubscriberSpec:
    pattern: str
    handler: Callable[[Any], Any]
    options: dict[str, Any]  # for Connection.subscribe


@dataclass
class _RetainSpec:
    pattern: str
    max_count: int | None
    max_bytes: int | None
    max_age: float | None


class App:
    """A set of workers, services and subscribers on one connection (see
    module docstring)."""

    def __init__(
        self,
        url: str | list[str] | None = None,
        *,
        bind: str | list[str] | None = None,
        middleware: Sequence[Middleware] = (),
        **options: Any,
    ) -> None:
        self._connect_args = (url, bind, options)
        self._middleware = list(check_middleware(middleware))
        self._workers: list[_WorkerSpec] = []
        self._services: list[tuple[str, Callable[[Any], Any]]] = []
        self._subscribers: list[_SubscriberSpec] = []
        self._retained: list[_RetainSpec] = []
        self._schedules: list[tuple[schedules.Schedule, Callable[..., Any]]] = []
        self._scheduler: Scheduler | None = None
        self._concurrency = 1  # for handlers that do not set their own
        self.connection: Connection | None = None

    def configure(
        self,
        *,
        url: str | list[str] | None = None,
        concurrency: int | None = None,
        **options: Any,
    ) -> None:
        """Change how the app will run, before it starts (``pigeon run``
        calls this with its options).

        Args:
            url: connect here instead of the URL the app was built with
                (a node it binds, if any, is kept).
            concurrency: how many handlers each worker and subscriber runs at
                once, for those that did not set ``concurrency=`` themselves
                (1 unless set here).
            options: connect options (e.g. ``key``, ``server_key``), merged
                over those the app was built with.

        Raises:
            ConfigurationError: ``concurrency`` is not a positive int.
        """
        old_url, bind, old_options = self._connect_args
        if concurrency is not None:
            if not isinstance(concurrency, int) or isinstance(concurrency, bool):
                raise ConfigurationError(f"concurrency must be an int, not {concurrency!r}")
            if concurrency < 1:
                raise ConfigurationError(f"concurrency must be at least 1, not {concurrency}")
            self._concurrency = concurrency
        self._connect_args = (old_url if url is None else url, bind, {**old_options, **options})

    @property
    def binds(self) -> list[str]:
        """The addresses the app binds to serve a node (``bind=``), empty
        when it only connects: one process at a time can run it."""
        bind = self._connect_args[1]
        return [bind] if isinstance(bind, str) else list(bind or [])

    def use(self, *middleware: Middleware) -> None:
        """Add middleware (``pigeon.Middleware``) before the app starts, as
        ``App(..., middleware=[...])`` does (``pigeon run --metrics-port``
        adds ``pigeon.metrics.PrometheusMetrics`` this way).

        Raises:
            TypeError: one is not a ``pigeon.Middleware``.
        """
        self._middleware.extend(check_middleware(list(middleware)))

    def worker(
        self,
        queue: str,
        *,
        prefetch: int = 64,
        concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> Callable[[F], F]:
        """Register the decorated function as a worker of ``queue``
        (``concurrency``: handlers run at once; unset, the app's default,
        see :meth:`configure`).

        Raises:
            TypeError: the function cannot take what it asks for (see
                :func:`adapt_handler`).
        """

        def register(fn: F) -> F:
            handler = adapt_handler(fn, gets_delivery=True)
            self._workers.append(
                _WorkerSpec(queue, handler, prefetch, concurrency, retry, lease_ttl)
            )
            return fn

        return register

    def service(self, name: str) -> Callable[[F], F]:
        """Register the decorated function as a server of service ``name``.

        Raises:
            TypeError: the function takes no argument or asks for a delivery.
        """

        def register(fn: F) -> F:
            self._services.append((name, adapt_handler(fn, gets_delivery=False)))
            return fn

        return register

    def subscriber(
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
        concurrency: int | None = None,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> Callable[[F], F]:
        """Register the decorated function as a subscriber of the topics
        matching ``pattern`` (options as for
        :meth:`pigeon.Connection.subscribe`). It may ask for the
        :class:`~pigeon.Event` (``pigeon.sync.Event`` in a plain ``def``),
        or for anything a worker's handler may.

        Raises:
            TypeError: the function cannot take what it asks for (see
                :func:`adapt_handler`).
        """

        def register(fn: F) -> F:
            handler = adapt_handler(fn, gets_delivery=True, gets_event=True)
            options = {
                "name": name,
                "policy": policy,
                "buffer": buffer,
                "from_seq": from_seq,
                "from_time": from_time,
                "last": last,
                "last_per_subject": last_per_subject,
                "prefetch": prefetch,
                "concurrency": concurrency,
                "retry": retry,
                "lease_ttl": lease_ttl,
            }
            self._subscribers.append(_SubscriberSpec(pattern, handler, options))
            return fn

        return register

    def every(self, seconds: float, *, name: str | None = None) -> Callable[[F], F]:
        """Run the decorated function once every ``seconds`` across all the
        running copies of this app (periods start at multiples of
        ``seconds`` since the epoch). It takes no argument, or one: the
        period's scheduled start as an aware UTC ``datetime``. ``name``
        (default: the function's name) must be the same in every copy; its
        ticks go to the queue ``pigeon.schedule.<name>``. See docs/apps.md.

        Raises:
            ConfigurationError: ``seconds`` is not 0.01 to 1e9, or a bad name.
            TypeError: the function takes more than one argument.
        """
        return self._schedule(lambda n: schedules.check_every(n, seconds), name)

    def cron(self, expression: str, *, name: str | None = None) -> Callable[[F], F]:
        """Run the decorated function at the times of a five-field cron
        ``expression`` (UTC, e.g. ``"*/5 * * * *"``), once per time across
        all the running copies of this app; otherwise as :meth:`every`.

        Raises:
            ConfigurationError: the expression does not parse (the reason
                says why), or a bad name.
            TypeError: the function takes more than one argument.
        """
        return self._schedule(lambda n: schedules.check_cron(n, expression), name)

    def _schedule(
        self, make: Callable[[str], schedules.Schedule], name: str | None
    ) -> Callable[[F], F]:
        def register(fn: F) -> F:
            schedule_name = fn.__name__ if name is None else name
            try:
                schedule = make(schedule_name)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(str(exc)) from None
            if any(s.name == schedule.name for s, _ in self._schedules):
                raise ConfigurationError(f"schedule {schedule.name!r} is declared twice")
            check_schedule_handler(fn)
            self._schedules.append((schedule, fn))
            return fn

        return register

    def schedule_stats(self) -> dict[str, dict[str, int]]:
        """Per schedule, what this copy did: ticks ``sent``, periods
        ``ran``, ``failures``, ``repeats`` (RabbitMQ) and ``late_sends``."""
        return {} if self._scheduler is None else self._scheduler.stats()

    def retain(
        self,
        pattern: str,
        *,
        max_count: int | None = None,
        max_bytes: int | None = None,
        max_age: float | None = None,
    ) -> None:
        """Keep history of the topics matching ``pattern`` (see
        :meth:`pigeon.Connection.retain`), declared when the app starts,
        before any subscriber."""
        self._retained.append(_RetainSpec(pattern, max_count, max_bytes, max_age))

    async def start(self) -> Connection:
        """Connect, declare what is retained, then start every service,
        worker and subscriber."""
        url, bind, options = self._connect_args
        conn = await connect(url, bind=bind, middleware=self._middleware, **options)
        self.connection = conn
        for retained in self._retained:
            await conn.retain(
                retained.pattern,
                max_count=retained.max_count,
                max_bytes=retained.max_bytes,
                max_age=retained.max_age,
            )
        for name, handler in self._services:
            await conn.serve(name, handler)
        for spec in self._workers:
            await conn.consume(
                spec.queue,
                spec.handler,
                prefetch=spec.prefetch,
                concurrency=self._concurrency if spec.concurrency is None else spec.concurrency,
                retry=spec.retry,
                lease_ttl=spec.lease_ttl,
            )
        for subscriber in self._subscribers:
            subscribe_options = subscriber.options
            if subscribe_options["concurrency"] is None:
                subscribe_options = {**subscribe_options, "concurrency": self._concurrency}
            await conn.subscribe(subscriber.pattern, subscriber.handler, **subscribe_options)
        if self._schedules:
            self._scheduler = Scheduler(conn, self._schedules, mode_for(conn.transport.url))
            await self._scheduler.start()
        return conn

    async def stop(self, timeout: float = 5.0) -> None:
        """Let running handlers finish, then close the connection."""
        if self._scheduler is not None:
            await self._scheduler.stop()
        if self.connection is not None:
            await self.connection.close(timeout)

    async def run_async(self, stop: asyncio.Event | None = None, *, grace: float = 5.0) -> None:
        """Run until ``stop`` is set (or forever), then stop cleanly, letting
        running handlers finish for up to ``grace`` seconds. A start that
        fails half-way closes what it opened."""
        try:
            await self.start()
            await (stop or asyncio.Event()).wait()
        finally:
            await self.stop(grace)

    def run(self, *, grace: float = 5.0) -> None:
        """Run until Ctrl-C or SIGTERM, then drain (for up to ``grace``
        seconds) and stop."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.run_async(stop, grace=grace)

        asyncio.run(main())
