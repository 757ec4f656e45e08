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
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._core.backoff import RetryPolicy
from .connection import Connection, connect
from .message import Message
from .transports import Delivery


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
    in a thread by the worker), so blocking handlers never block the loop.
    """
    wanted = _first_parameter_type(fn)

    def convert(arg: Delivery | Message) -> Any:
        message = arg.message if isinstance(arg, Delivery) else arg
        if wanted is Delivery:
            if not gets_delivery:
                raise TypeError(f"service handler {fn.__name__} gets a Message, not a Delivery")
            return arg
        if wanted is Message:
            return message
        return message.decode(None if wanted in (None, Any) else wanted)

    if inspect.iscoroutinefunction(fn):

        async def call_async(arg: Any) -> Any:
            return await fn(convert(arg))

        return call_async

    def call(arg: Any) -> Any:
        return fn(convert(arg))

    return call


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
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as a worker of ``queue``."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            handler = adapt_handler(fn, gets_delivery=True)
            self._workers.append(
                _WorkerSpec(queue, handler, prefetch, concurrency, retry, lease_ttl)
            )
            return fn

        return register

    def service(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated function as a server of service ``name``."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
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
