"""Deliveries settled on the client, for subscriptions that end with their
subscriber (ephemeral topic subscriptions and replays from a stream).

Their queue (or stream position) dies with the subscriber, so what a
durable work queue does on the broker is done here instead, leaving nothing
behind on the broker:

Rule 1: at most ``prefetch`` deliveries are in the subscriber's hands
(handed to the sink, not settled); the rest wait here, in order.
Rule 2: ``ack`` acks the broker's delivery, if it still holds one (a
stream's history is acked as it is read, to reach its end).
Rule 3: ``nack(delay)`` hands the message over again after ``delay``
seconds, ahead of the waiting ones, flagged redelivered, with ``attempt``
one higher and the reason in ``headers.LAST_ERROR``; the broker's delivery
stays unacked meanwhile (it keeps the broker's prefetch honest). An
unsettled delivery past ``lease_ttl`` (not extended) is handed over again
the same way, and a late settle of it is stale (counted).
Rule 4: ``reject(reason)`` publishes a dead-letter copy to
``pigeon.topics.dead`` (confirmed) and only then acks; if that fails the
message is handed over again. A message past ``max_attempts`` is
dead-lettered instead of handed over.
Rule 5: what is waiting or held when the subscription ends is given up
(the broker deletes an ephemeral queue with it; a stream still has it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from collections.abc import Coroutine
from typing import Any

import aio_pika
import msgspec
from aio_pika.abc import AbstractIncomingMessage

from ..._core import headers, policy
from ...errors import PigeonError, TransportError
from ...message import Message
from ..base import ConsumeOptions, Delivery, DeliverySink
from .envelope import to_amqp
from .errors import map_exceptions
from .publisher import Publisher
from .topics import EPHEMERAL_DEAD
from .topology import Topology


class _Held:
    """One message on its way to the subscriber or in its hands."""

    __slots__ = ("message", "incoming", "timer", "done")

    def __init__(self, message: Message, incoming: AbstractIncomingMessage | None) -> None:
        self.message = message
        self.incoming = incoming  # the broker's delivery still to ack, if any
        self.timer: asyncio.TimerHandle | None = None
        self.done = False


def again(message: Message, reason: str = "") -> Message:
    """The copy of ``message`` handed over once more (Rule 3)."""
    extra = {headers.LAST_ERROR: reason} if reason else {}
    return msgspec.structs.replace(
        message,
        attempt=message.attempt + 1,
        redelivered=True,
        headers={**message.headers, **extra},
    )


class ClientLeases:
    """The Settler of client-settled deliveries (see the module docstring).

    Args:
        label: the queue name deliveries carry (and dead letters name).
        sink: where deliveries are handed to the subscriber.
        options: prefetch, lease and attempt limit.
        counts: the topic counters to add to.
        publisher: publishes dead-letter copies.
        topology: declares the dead-letter queue.
        address: the broker's address, for errors.
    """

    def __init__(
        self,
        *,
        label: str,
        sink: DeliverySink,
        options: ConsumeOptions,
        counts: Counter[str],
        publisher: Publisher,
        topology: Topology,
        address: str,
    ) -> None:
        self.label = label
        self.sink = sink
        self.options = options
        self.counts = counts
        self.publisher = publisher
        self.topology = topology
        self.address = address
        self._waiting: deque[_Held] = deque()
        self._held: set[_Held] = set()  # handed over, not settled
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump_scheduled = False
        self._ended = False

    # -- handing over (Rule 1) -------------------------------------------

    def offer(
        self, message: Message, incoming: AbstractIncomingMessage | None, *, first: bool = False
    ) -> None:
        """Hand ``message`` over when there is room (``first``: before the
        waiting ones)."""
        if self._ended:
            return
        held = _Held(message, incoming)
        if first:
            self._waiting.appendleft(held)
        else:
            self._waiting.append(held)
        self._pump()

    def _pump(self) -> None:
        self._pump_scheduled = False
        batch: list[Delivery] = []
        while self._waiting and len(self._held) < self.options.prefetch and not self._ended:
            held = self._waiting.popleft()
            message = held.message
            if policy.over_attempt_limit(message.attempt, self.options.max_attempts):
                reason = policy.attempt_limit_reason(self.label, message.attempt - 1)
                held.message = msgspec.structs.replace(message, attempt=message.attempt - 1)
                self._spawn(self._bury(held, reason))
                continue
            self._held.add(held)
            self._arm(held)
            self.counts["delivered"] += 1
            if message.redelivered:
                self.counts["redelivered"] += 1
            batch.append(Delivery(self.label, message, self, tag=held))
        if batch:
            self.sink(batch)

    def _schedule_pump(self) -> None:
        # Settles run inside the subscriber's code: hand the next ones over
        # from the loop, not from inside its ack.
        if not self._pump_scheduled and self._waiting:
            self._pump_scheduled = True
            asyncio.get_running_loop().call_soon(self._pump)

    # -- leases (Rule 3) ---------------------------------------------------

    def _arm(self, held: _Held) -> None:
        if held.timer is not None:
            held.timer.cancel()
        held.timer = asyncio.get_running_loop().call_later(
            self.options.lease_ttl, self._expire, held
        )

    def _expire(self, held: _Held) -> None:
        if not self._release(held, stale_count=False):
            return
        self.counts["lease_expired"] += 1
        self.offer(again(held.message), held.incoming, first=True)

    def _release(self, held: _Held, stale_count: bool = True) -> bool:
        """Take ``held`` back from the subscriber; False (counted stale) if
        it was settled or expired already."""
        if held.done or self._ended:
            if stale_count:
                self.counts["stale_settles"] += 1
            return False
        held.done = True
        self._held.discard(held)
        if held.timer is not None:
            held.timer.cancel()
        self._schedule_pump()
        return True

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ack(self, incoming: AbstractIncomingMessage | None) -> None:
        if incoming is None:
            return
        try:
            with map_exceptions(f"settle a delivery of {self.label!r}", address=self.address):
                await incoming.ack()
        except TransportError:
            # The channel is gone (a reconnect): the broker forgot the delivery.
            self.counts["stale_settles"] += 1

    async def _bury(self, held: _Held, reason: str) -> None:
        message = held.message
        extra = policy.dead_letter_headers(message.headers, self.label, reason, message.attempt)
        topology = self.topology

        def build(resend: bool) -> aio_pika.Message:
            return to_amqp(message, attempt=0, redelivered=True, extra=extra)

        try:
            await self.publisher.publish(
                EPHEMERAL_DEAD, build, lambda: topology.work_queue(EPHEMERAL_DEAD)
            )
        except PigeonError:
            self.counts["settle_errors"] += 1
            self.offer(again(message), held.incoming, first=True)
            return
        self.counts["dead_lettered"] += 1
        await self._ack(held.incoming)

    # -- Settler -----------------------------------------------------------

    async def ack(self, delivery: Delivery) -> None:
        held: _Held = delivery.tag
        if self._release(held):
            self.counts["acked"] += 1
            await self._ack(held.incoming)

    def nack(self, delivery: Delivery, delay: float, reason: str) -> None:
        held: _Held = delivery.tag
        if not self._release(held):
            return
        self.counts["nacked"] += 1
        copy = again(held.message, reason)
        if delay <= 0:
            self.offer(copy, held.incoming, first=True)
            return
        self.counts["delayed"] += 1
        loop = asyncio.get_running_loop()

        def back() -> None:
            self._timers.discard(timer)
            self.offer(copy, held.incoming, first=True)

        timer = loop.call_later(delay, back)
        self._timers.add(timer)

    async def reject(self, delivery: Delivery, reason: str) -> None:
        held: _Held = delivery.tag
        if self._release(held):
            await self._bury(held, reason)

    def extend(self, delivery: Delivery) -> None:
        held: _Held = delivery.tag
        if held.done or self._ended:
            self.counts["stale_settles"] += 1
            return
        self._arm(held)

    # -- ending (Rule 5) ---------------------------------------------------

    async def end_leases(self) -> None:
        """Hand nothing more over; forget what waits and what is held."""
        self._ended = True
        # Given up with the subscription (Rule 5), counted.
        self.counts["unsettled_at_cancel"] += len(self._held) + len(self._waiting)
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for held in self._held:
            if held.timer is not None:
                held.timer.cancel()
        self._held.clear()
        self._waiting.clear()
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)
