"""Decorators that turn functions into workers and services.

    app = pigeon.App("tcp://127.0.0.1:6700")

    @app.worker("words")
    async def process(word: str) -> None: ...

    @app.service("case")
    def upper(word: str) -> str:
        return word.upper()

    app.run()   # until Ctrl-C or SIGTERM, then drains and stops

A handler's first parameter says what it gets: annotated ``Delivery`` (settle
by hand), ``Message`` (the envelope), a type (the body decoded into it), or
nothing (the body decoded by its content type).

An ``async def`` handler runs on the event loop and gets a
:class:`pigeon.Delivery`, whose settle methods are awaited. A plain ``def``
handler runs in a thread and gets a :class:`pigeon.sync.Delivery` (annotate it
as either), whose ``ack``, ``nack``, ``reject`` and ``extend`` are blocking
calls that settle on the app's loop before they return.

The decorators return the function they are given, unchanged and with its
type, so it can still be called and type-checked directly.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from . import sync
from ._core.backoff import RetryPolicy
from .connection import Connection, connect
from .message import Message
from .transports import Delivery
from .worker import call_handler

__all__ = ["App", "adapt_handler"]

F = TypeVar("F", bound=Callable[..., Any])

_DELIVERY_TYPES = (Delivery, sync.Delivery)


def _first_parameter_type(fn: Callable[..., Any]) -> Any:
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise TypeError(f"handler {fn.__name__} must take one argument (the message)")
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        hints = {}
    return hints.get(params[0].name, None)


def adapt_handler(fn: Callable[..., Any], *, gets_delivery: bool) -> Callable[[Any], Any]:
    """Wrap ``fn`` so it receives what its first parameter's annotation asks for.

    The wrapper is a coroutine function if ``fn`` is one, else a plain one (run
    in a thread by the worker), so blocking handlers never block the loop. A
    plain handler that asks for a delivery gets a :class:`pigeon.sync.Delivery`
    bound to the loop, so settling from its thread really settles.

    Raises:
        TypeError: ``fn`` takes no argument, a service handler asks for a
            delivery, or an async handler asks for a blocking one.
    """
    wanted = _first_parameter_type(fn)
    is_async = inspect.iscoroutinefunction(fn)
    if wanted in _DELIVERY_TYPES:
        if not gets_delivery:
            raise TypeError(f"service handler {fn.__name__} gets a Message, not a Delivery")
        if is_async and wanted is sync.Delivery:
            raise TypeError(
                f"async handler {fn.__name__} gets a pigeon.Delivery (awaitable settles); "
                "pigeon.sync.Delivery is for plain (def) handlers"
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
        blocking = sync.Delivery(delivery, asyncio.get_running_loop())
        return await call_handler(fn, blocking)

    return call_in_thread


@dataclass
class _WorkerSpec:
    queue: str
    handler: Callable[[Any], Any]
    prefetch: int
    concurrency: int
    retry: RetryPolicy | None
    lease_ttl: float


class App:
    """A set of workers and services on one connection (see module docstring)."""

    def __init__(
        self,
        url: str | list[str] | None = None,
        *,
        bind: str | list[str] | None = None,
        **options: Any,
    ) -> None:
        self._connect_args = (url, bind, options)
        self._workers: list[_WorkerSpec] = []
        self._services: list[tuple[str, Callable[[Any], Any]]] = []
        self.connection: Connection | None = None

    def worker(
        self,
        queue: str,
        *,
        prefetch: int = 64,
        concurrency: int = 1,
        retry: RetryPolicy | None = None,
        lease_ttl: float = 30.0,
    ) -> Callable[[F], F]:
        """Register the decorated function as a worker of ``queue``.

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

    async def start(self) -> Connection:
        """Connect, then start every service and worker."""
        url, bind, options = self._connect_args
        conn = await connect(url, bind=bind, **options)
        self.connection = conn
        for name, handler in self._services:
            await conn.serve(name, handler)
        for spec in self._workers:
            await conn.consume(
                spec.queue,
                spec.handler,
                prefetch=spec.prefetch,
                concurrency=spec.concurrency,
                retry=spec.retry,
                lease_ttl=spec.lease_ttl,
            )
        return conn

    async def stop(self, timeout: float = 5.0) -> None:
        """Let running handlers finish, then close the connection."""
        if self.connection is not None:
            await self.connection.close(timeout)

    async def run_async(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or forever), then stop cleanly."""
        await self.start()
        try:
            await (stop or asyncio.Event()).wait()
        finally:
            await self.stop()

    def run(self) -> None:
        """Run until Ctrl-C or SIGTERM, then drain and stop."""

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.run_async(stop)

        asyncio.run(main())
