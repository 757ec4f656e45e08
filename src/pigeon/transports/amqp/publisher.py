"""Confirmed, pipelined publishing that survives reconnects.

Every publish runs as its own task awaiting the broker's confirm, so many are
in flight at once (tasks start in creation order, so one producer's messages
keep their order). A publish that fails because the connection broke waits
for the robust connection to come back and is published again, marked
``headers.REDELIVERED`` because the broker may have stored the first copy
before the link broke: nothing confirmed is lost, nothing unconfirmed is
silently dropped, and duplicates are flagged.

A publish the broker refuses (``basic.nack``) moves the next publishes to a
new channel and is sent once more there (counted ``refusals_retried``);
refused again, it fails with DeliveryError (or TransportError if it was a
resend: the first copy may be stored). The new channel is needed because
RabbitMQ 3.10 keeps refusing every publish to a quorum queue on a channel
opened while that queue had no quorum, even once it has one again, and a
new channel is served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection

from ...errors import Backpressure, DeliveryError, PigeonError, Timeout, TransportError
from .errors import map_exceptions

# Seconds between two new channels after refusals: while a queue has no
# quorum a new channel is refused too, and one refusal per publish would
# otherwise open a channel per publish.
RENEW_EVERY = 1.0

# build(resend) -> the AMQP message; resend is True from the second try on.
Builder = Callable[[bool], aio_pika.Message]
Prepare = Callable[[], Awaitable[Any]]


class Publisher:
    """Publishes with confirms, to queues through the default exchange or to
    a named exchange.

    Args:
        connection: the robust connection.
        address: broker address (no credentials), for errors.
        outbox_limit: unconfirmed publishes allowed before ``publish``
            raises :class:`~pigeon.errors.Backpressure`.
        retry_pause: seconds between tries while the broker is unreachable.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        address: str,
        outbox_limit: int,
        retry_pause: float,
    ) -> None:
        self.connection = connection
        self.address = address
        self.outbox_limit = outbox_limit
        self.retry_pause = retry_pause
        self.channel: AbstractRobustChannel | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -RENEW_EVERY
        self.counts = {
            "published": 0,
            "confirmed": 0,
            "resent": 0,
            "failed": 0,
            "unconfirmed_at_close": 0,
            "channels_renewed": 0,
            # Publishes refused once (basic.nack) and sent again on a new channel.
            "refusals_retried": 0,
        }

    async def open(self) -> None:
        """Open the confirming channel.

        Raises:
            TransportError: the broker cannot be reached.
        """
        with map_exceptions("open the publishing channel", address=self.address):
            self.channel = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )

    @property
    def unconfirmed(self) -> int:
        return len(self._tasks)

    def publish(
        self,
        routing_key: str,
        build: Builder,
        prepare: Prepare | None = None,
        *,
        exchange: str = "",
        mandatory: bool = True,
        renew: bool = True,
    ) -> asyncio.Future[None]:
        """Start publishing; the future resolves on the broker's confirm.

        Args:
            routing_key: the queue (default exchange) or the routing key.
            build: makes the AMQP message (``build(resend)``).
            prepare: awaited before each try (declares what it goes to).
            exchange: the exchange ("" is the default exchange).
            mandatory: an unroutable message fails (DeliveryError) instead of
                being dropped by the broker.
            renew: a refusal moves the next publishes to a new channel.

        Raises:
            Backpressure: ``outbox_limit`` publishes are already unconfirmed.
        """
        if len(self._tasks) >= self.outbox_limit:
            raise Backpressure(f"the outbox to {self.address}", self.outbox_limit)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        target = _Target(exchange, routing_key, mandatory, renew)
        task = loop.create_task(self._run(target, build, prepare, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.counts["published"] += 1
        return future

    async def _run(
        self,
        target: _Target,
        build: Builder,
        prepare: Prepare | None,
        future: asyncio.Future[None],
    ) -> None:
        resend = tried = refused = False
        try:
            while True:
                try:
                    if prepare is not None:
                        await prepare()
                    channel = self.channel
                    if channel is not None and channel.is_closed:
                        # Nothing written yet: wait for the reconnect; not a resend.
                        await self._wait_ready()
                        continue
                    tried = True
                    await self._publish_once(target, build(resend))
                    break
                except DeliveryError as exc:
                    if resend or refused or not target.renew or not _refusal(exc):
                        raise
                    # Refused (basic.nack), so not stored: once more, on the
                    # new channel the refusal asked for. A queue declared a
                    # moment ago by another connection is refused on a
                    # channel opened before it had its quorum (RabbitMQ 3.10).
                    refused = True
                    self.counts["refusals_retried"] += 1
                    renewing = self._renewing
                    if renewing is not None:
                        await asyncio.wait({renewing}, timeout=RENEW_EVERY)
                except TransportError:
                    if self._closing:
                        raise
                    # The broker may have stored it before the link broke.
                    resend = resend or tried
                    self.counts["resent"] += tried
                    await self._wait_ready()
        except asyncio.CancelledError:
            _fail(
                future,
                TransportError(
                    f"closed before the broker confirmed a publish to {target.routing_key!r}",
                    address=self.address,
                ),
            )
            raise
        except PigeonError as exc:
            self.counts["failed"] += 1
            if resend and isinstance(exc, DeliveryError):
                # Refused when published again: the first copy, whose confirm
                # the lost link took, may be stored. Not a refusal then, an
                # unknown outcome.
                unknown = TransportError(
                    f"a publish to {target.routing_key!r} was not confirmed: the link broke, and "
                    "the broker refused it when published again (the first copy may be stored)",
                    address=self.address,
                )
                unknown.__cause__ = exc
                exc = unknown
            _fail(future, exc)
            return
        self.counts["confirmed"] += 1
        if not future.done():
            future.set_result(None)

    async def _publish_once(self, target: _Target, message: aio_pika.Message) -> None:
        channel = self.channel
        if channel is None:
            raise TransportError("the publishing channel is not open", address=self.address)
        task = asyncio.current_task()
        routing_key = target.routing_key
        try:
            with map_exceptions(f"publish to {routing_key!r}", address=self.address):
                exchange = (
                    await channel.get_exchange(target.exchange, ensure=False)
                    if target.exchange
                    else channel.default_exchange
                )
                await exchange.publish(message, routing_key, mandatory=target.mandatory)
        except DeliveryError as exc:
            if target.renew and _refusal(exc):
                self._renew(channel)
            raise
        except asyncio.CancelledError:
            if task is not None and task.cancelling():
                raise
            # aiormq cancels pending confirms when the connection drops.
            raise TransportError(
                f"the connection broke while publishing to {routing_key!r}", address=self.address
            ) from None

    def _renew(self, refusing: AbstractRobustChannel) -> None:
        """Publish on a new channel from now on (at most every RENEW_EVERY s).

        The refusing channel is closed once the new one is open: what it
        still holds unconfirmed fails there and is published again on the
        new one, flagged as a resend.
        """
        now = time.monotonic()
        if (
            self._closing
            or refusing is not self.channel
            or self._renewing is not None
            or now - self._renewed_at < RENEW_EVERY
        ):
            return
        self._renewed_at = now
        self._renewing = asyncio.get_running_loop().create_task(self._replace(refusing))

    async def _replace(self, old: AbstractRobustChannel) -> None:
        try:
            with map_exceptions("renew the publishing channel", address=self.address):
                new = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
                if self._closing:
                    await new.close()
                    return
                self.channel = new
                self.counts["channels_renewed"] += 1
                await old.close()
        except PigeonError:
            pass  # the link is down: its reconnect restores the channel in use
        finally:
            self._renewing = None

    async def _wait_ready(self) -> None:
        await asyncio.sleep(self.retry_pause)
        channel = self.channel
        if channel is not None:
            await channel.ready()

    async def flush(self, timeout: float) -> None:
        """Wait until every publish so far is confirmed (or failed).

        Raises:
            Timeout: some are unconfirmed after ``timeout`` seconds.
        """
        pending = set(self._tasks)
        if not pending:
            return
        _done, still = await asyncio.wait(pending, timeout=timeout)
        if still:
            raise Timeout(f"{len(still)} sends still unconfirmed after {timeout} s")

    async def close(self, timeout: float) -> None:
        """Give unconfirmed publishes ``timeout`` seconds, fail the rest with
        TransportError (counted in ``unconfirmed_at_close``), close the channel."""
        try:
            await self.flush(timeout)
        except Timeout:
            pass
        self._closing = True
        if self._renewing is not None:
            await asyncio.gather(self._renewing, return_exceptions=True)
        still = list(self._tasks)
        self.counts["unconfirmed_at_close"] += len(still)
        for task in still:
            task.cancel()
        if still:
            await asyncio.gather(*still, return_exceptions=True)
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            try:
                with map_exceptions("close the publishing channel", address=self.address):
                    await channel.close()
            except TransportError:
                pass  # already gone with the connection


@dataclass(frozen=True, slots=True)
class _Target:
    """Where one publish goes, and how a refusal is handled."""

    exchange: str
    routing_key: str
    mandatory: bool
    renew: bool


def _fail(future: asyncio.Future[None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _refusal(exc: DeliveryError) -> bool:
    """Whether the broker refused the publish (basic.nack), as opposed to
    returning it as unroutable (basic.return)."""
    cause = exc.__cause__
    return isinstance(cause, aiormq.exceptions.DeliveryError) and not isinstance(
        cause, aiormq.exceptions.PublishError
    )
