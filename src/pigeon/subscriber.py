"""Running subscribers: a :class:`Subscriber` runs a handler on every message
of the topics matching its pattern, and :class:`EventStream` yields them to an
``async for`` loop. Both are Workers underneath, so acks, retries with
backoff and dead letters behave as they do for queues; on top, every event
is checked against its topic's numbering (``pigeon._core.topics`` Rule 3)
and carries what was missed right before it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from ._core import headers
from ._core.backoff import RetryPolicy
from ._core.topics import GapTracker
from .errors import SubscriberDisconnected
from .transports import Delivery, SubscribeOptions, Transport
from .worker import Handler, Worker

log = logging.getLogger("pigeon.subscriber")


class Event(Delivery):
    """One published message handed to a subscriber: a :class:`Delivery`
    (settle it the same way) with its topic, its number in that topic, and
    how many numbers were missed right before it (0: none)."""

    __slots__ = ("topic", "seq", "missed")

    def __init__(self, delivery: Delivery, missed: int) -> None:
        super().__init__(delivery.queue, delivery.message, delivery._settler, delivery.tag)
        found = delivery.message.headers
        self.topic = found.get(headers.TOPIC, "")
        seq = found.get(headers.SEQ, "")
        self.seq = int(seq) if seq.isascii() and seq.isdigit() and len(seq) <= 19 else 0
        self.missed = missed


EventHandler = Callable[[Event], Awaitable[Any] | Any]


class Subscriber(Worker):
    """Runs ``handler(event)`` for every message on topics matching ``pattern``."""

    def __init__(
        self,
        pattern: str,
        handler: EventHandler,
        policy: RetryPolicy,
        concurrency: int,
        options: SubscribeOptions,
    ) -> None:
        # A Worker's deliveries to it are all Events (see _sink).
        super().__init__(pattern, cast(Handler, handler), policy, concurrency)
        self.pattern = pattern
        self.options = options
        self.gaps = GapTracker()
        self.disconnected: SubscriberDisconnected | None = None
        self._cut = asyncio.Event()

    async def _start(self, transport: Transport, options: Any = None) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()) for _ in range(self.concurrency)]
        try:
            self._subscription = await transport.subscribe(
                self.pattern, self._sink, self.options, self._on_disconnect
            )
        except BaseException:
            for task in self._tasks:
                task.cancel()
            raise

    def _sink(self, deliveries: list[Delivery]) -> None:
        observe = self.gaps.observe
        super()._sink([Event(d, observe(d.message)) for d in deliveries])

    def _on_disconnect(self, reason: str) -> None:
        if self.disconnected is None:
            self.disconnected = SubscriberDisconnected(self.pattern, reason)
            log.warning("%s", self.disconnected)
            self._cut.set()

    async def wait_disconnected(self) -> SubscriberDisconnected:
        """Wait until the host cuts this subscriber off; the error it gave."""
        await self._cut.wait()
        assert self.disconnected is not None
        return self.disconnected

    def stats(self) -> dict[str, Any]:
        return {
            **super().stats(),
            "pattern": self.pattern,
            "name": self.options.name,
            **self.gaps.counts(),
            "disconnected": self.disconnected is not None,
        }


class EventStream:
    """``async with conn.subscription(pattern) as events: async for event in
    events:``, the events of a subscription, one at a time.

    An event is acked when the loop asks for the next one or leaves, unless
    it was settled by hand; if the loop's body raises, the retry policy
    takes that event as failed. Leaving the ``async with`` ends the
    subscription (without it, the connection's close does). A subscription
    cut off by its host raises
    :class:`~pigeon.errors.SubscriberDisconnected` from the loop."""

    def __init__(self, start: Any) -> None:
        self._start = start  # async (handler) -> Subscriber
        self._subscriber: Subscriber | None = None
        self._ended: Subscriber | None = None
        self._handed: asyncio.Queue[tuple[Event, asyncio.Future[None]]] = asyncio.Queue(1)
        self._current: asyncio.Future[None] | None = None

    async def _handle(self, event: Event) -> None:
        done = asyncio.get_running_loop().create_future()
        await self._handed.put((event, done))
        await done  # until the loop moves on: then the Worker acks it

    @property
    def subscriber(self) -> Subscriber:
        """The Subscriber underneath (once started; still there once ended,
        for its stats)."""
        subscriber = self._subscriber or self._ended
        if subscriber is None:
            raise RuntimeError("the subscription has not started; iterate it or use async with")
        return subscriber

    async def __aenter__(self) -> EventStream:
        if self._subscriber is None:
            self._subscriber = await self._start(self._handle)
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if isinstance(exc, Exception) and self._current is not None and not self._current.done():
            # The loop's body failed on this event: the retry policy decides.
            self._current.set_exception(exc)
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        subscriber = self._subscriber
        if subscriber is None:
            subscriber = self._subscriber = await self._start(self._handle)
        if self._current is not None and not self._current.done():
            self._current.set_result(None)
        self._current = None
        get = asyncio.ensure_future(self._handed.get())
        cut = asyncio.ensure_future(subscriber._cut.wait())
        try:
            await asyncio.wait({get, cut}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cut.cancel()
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():
            assert subscriber.disconnected is not None
            raise subscriber.disconnected
        event, self._current = get.result()
        return event

    async def aclose(self) -> None:
        subscriber, self._subscriber = self._subscriber, None
        self._ended = subscriber or self._ended
        if self._current is not None and not self._current.done():
            self._current.set_result(None)  # the loop left after it: done with it
        self._current = None
        if subscriber is not None:
            await subscriber.close()

    def stats(self) -> dict[str, Any]:
        return self.subscriber.stats()
