"""One worker's pull loop on a queue's durable JetStream consumer.

Credit is kept here, not by the server: the loop asks for at most
``prefetch - held - outstanding`` messages, with one pull request at a time,
so a worker never holds more than ``prefetch`` unsettled deliveries. The
durable consumer (and with it JetStream's redelivery bookkeeping) is shared
by every worker of the queue, in every process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ... import _clock
from ..._core import delay, policy
from ...errors import PigeonError
from ...message import Message
from ..base import ConsumeOptions, Delivery, DeliverySink
from . import envelope
from .errors import map_exceptions

log = logging.getLogger("pigeon.nats")

# A pull request the server never answered (lost in a reconnect) is written
# off this long after its expiry, so credit cannot leak.
_GRACE = 1.0
_RETRY_PAUSE = 0.5
_DRAIN_WAIT = 2.0  # seconds to stop listening to an open pull (one round trip)
# Added to a held message's nak delay, so JetStream's timer does not hand it
# back a hair before its time by the worker's clock.
_HOLD_MARGIN = 0.01


class ConsumerSetup(Protocol):
    """Where a pull consumer's durable consumer lives (see ``stream.Stream``)."""

    @property
    def name(self) -> str:
        """The stream's name."""
        ...

    async def ensure_consumer(self, queue: str, subject: str, options: ConsumeOptions) -> None:
        """Create or update the durable consumer of ``queue``."""
        ...


class DeadLetterSink(Protocol):
    """Where dead letters go (see ``deadletter.DeadLetters``)."""

    async def publish(self, queue: str, message: Message, reason: str, attempts: int) -> None:
        """Store a dead letter of ``queue``; raises a PigeonError if not confirmed."""
        ...


class PullConsumer:
    """Fetches ``queue`` for one worker and settles its deliveries (a Settler).

    Args:
        nc: the connection the pull requests and deliveries travel on.
        stream: the stream and its durable consumers.
        dead_letters: where rejected and over-limit messages go.
        counts: the counters to add to (``delivered``, ``acked``...).
        queue: the queue consumed, on ``subject``.
        sink: where deliveries are handed to the worker.
        options: the worker's prefetch, lease and attempt limit.
        pull_expires: seconds a pull request waits on an empty queue.
        on_cancel: told once the consumer has stopped.
    """

    def __init__(
        self,
        nc: Client,
        stream: ConsumerSetup,
        dead_letters: DeadLetterSink,
        counts: Counter[str],
        *,
        queue: str,
        subject: str,
        sink: DeliverySink,
        options: ConsumeOptions,
        pull_expires: float,
        on_cancel: Callable[[PullConsumer], None],
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.dead_letters = dead_letters
        self.counts = counts
        self.queue = queue
        self.subject = subject
        self.durable = envelope.durable_name(queue)
        self.sink = sink
        self.options = options
        self.pull_expires = pull_expires
        self.on_cancel = on_cancel
        self.held = 0  # deliveries handed to the sink and not settled yet
        self.outstanding = 0  # messages asked for by the pull request in flight
        self.backlog: deque[Delivery] = deque()  # arrived beyond credit (see _on_msg)
        self.closed = False
        self.draining = False  # asks for nothing more (drain)
        self._request_deadline = 0.0
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sub: Subscription | None = None
        self._inbox = ""

    async def start(self) -> None:
        """Create or update the durable consumer and start pulling.

        Raises:
            TransportError: the consumer cannot be created.
            ConfigurationError: JetStream refused its configuration.
        """
        await self.stream.ensure_consumer(self.queue, self.subject, self.options)
        self._inbox = self.nc.new_inbox()
        with map_exceptions(f"consume {self.queue!r}"):
            self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- pulling ---------------------------------------------------------

    def wake(self, *, reconnected: bool = False) -> None:
        if reconnected:
            self.outstanding = 0  # the server forgot our pull request with the old connection
        self._wake.set()

    async def _run(self) -> None:
        nms = f"$JS.API.CONSUMER.MSG.NEXT.{self.stream.name}.{self.durable}"
        expires = self.pull_expires
        nc = self.nc
        while not self.closed:
            now = time.monotonic()
            if self.outstanding and now > self._request_deadline:
                self.outstanding = 0
                if nc.is_connected:
                    # Neither its messages nor a timeout status came: JetStream
                    # drops a pull for a consumer that no longer exists (one
                    # deleted while the pull waited may not say so).
                    self.counts["unanswered_pulls"] += 1
                    await self._recreate()
                    now = time.monotonic()
            credit = self.options.prefetch - self.held - len(self.backlog) - self.outstanding
            if self.draining:
                credit = 0
            if credit > 0 and not self.outstanding and now >= self._retry_at and nc.is_connected:
                request = {"batch": credit, "expires": int(expires * 1e9)}
                try:
                    with map_exceptions(f"pull {self.queue!r}"):
                        await nc.publish(nms, json.dumps(request).encode(), reply=self._inbox)
                except PigeonError as exc:
                    log.debug("pull request for %r failed: %s", self.queue, exc)
                    self._retry_at = now + _RETRY_PAUSE
                else:
                    self.outstanding = credit
                    self._request_deadline = now + expires + _GRACE
            self._wake.clear()
            wait = None
            if self.outstanding:
                wait = self._request_deadline - now
            elif credit > 0:  # disconnected or pausing after an error: look again soon
                wait = max(0.05, self._retry_at - now) if now < self._retry_at else 0.1
            try:
                async with asyncio.timeout(wait):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:  # a status for our pull request, not a message
            status = (msg.headers or {}).get("Status", "")
            if status == "100":  # idle heartbeat / flow control
                return
            self.outstanding = 0  # 404/408: the request is over; 409: refused
            if status in ("409", "503"):
                # 503: nobody answered the pull, so the consumer is gone (it
                # was deleted while no pull waited); 409 says so when one did.
                self.counts["pull_refusals"] += 1
                log.warning("pull for %r refused: %s", self.queue, (msg.headers or {}))
                self._retry_at = time.monotonic() + _RETRY_PAUSE
                if status == "503" or "Deleted" in str((msg.headers or {}).get("Description", "")):
                    await self._recreate()
            self._wake.set()
            return
        if self.outstanding:
            self.outstanding -= 1
        if self.closed:
            # Pulled while we were leaving: hand it back at once rather than
            # letting it wait out its ack wait.
            await self._quietly(msg.nak(), "nak")
            return
        try:
            meta = msg.metadata
        except Exception:  # not a JetStream message: nothing to settle
            self.counts["malformed"] += 1
            return
        attempt = meta.num_delivered
        message = envelope.from_headers(
            msg.data,
            msg.headers,
            fallback_id=f"{meta.stream}-{meta.sequence.stream}",
            attempt=attempt,
            redelivered=attempt > 1,
        )
        if message.headers and delay.not_before(message.headers) > 0:
            # Sent for later: its first delivery always goes back to
            # JetStream for the time left (a nak delay is the only timer a
            # 2.9 server has), even when already due, so the hold is always
            # exactly one of JetStream's deliveries and is taken off the count.
            if attempt == 1:
                wait = delay.read(message.headers, _clock.wall(), delay.DEFAULT_MAX_DELAY)[1]
                self.counts["held"] += 1
                await self._quietly(msg.nak(delay=wait + _HOLD_MARGIN), "nak")
                self._wake.set()
                return
            attempt -= 1
            message.attempt = attempt
            message.redelivered = (
                attempt > 1 or (msg.headers or {}).get(envelope.REDELIVERED) == "1"
            )
        delivery = Delivery(self.queue, message, self, tag=msg)
        if not await self._admit(delivery, meta):
            return
        self.counts["delivered"] += 1
        if attempt > 1:
            self.counts["redelivered"] += 1
        if policy.over_attempt_limit(attempt, self.options.max_attempts):
            # Workers kept dying on it without settling: dead-letter it like
            # the other transports' hosts do, without running it again.
            reason = policy.attempt_limit_reason(self.queue, attempt - 1)
            await self._bury(delivery, reason, attempts=attempt - 1)
            return
        if self.held < self.options.prefetch:
            self.held += 1
            self.sink([delivery])
        else:  # a late answer to a pull request we had written off
            self.backlog.append(delivery)

    async def _admit(self, delivery: Delivery, meta: Msg.Metadata) -> bool:
        """Whether ``delivery`` goes on to the worker (a subclass may settle
        it here instead, or change what it carries)."""
        return True

    async def _recreate(self) -> None:
        try:
            await self.stream.ensure_consumer(self.queue, self.subject, self.options)
        except PigeonError as exc:
            log.warning("cannot recreate the consumer of %r: %s", self.queue, exc)

    # -- settling (the Settler protocol) ---------------------------------

    def _release(self) -> None:
        self.held -= 1
        if self.backlog and not self.closed:
            self.held += 1
            self.sink([self.backlog.popleft()])
        self._wake.set()

    async def _quietly(self, call: Awaitable[None], what: str) -> None:
        # A settle that cannot reach the server is not the handler's failure:
        # JetStream redelivers the message when its ack wait runs out.
        try:
            with map_exceptions(f"{what} on {self.queue!r}"):
                await call
        except PigeonError as exc:
            self.counts["settle_failures"] += 1
            log.warning("%s", exc)

    def ack(self, delivery: Delivery) -> Awaitable[None]:
        self._release()
        self.counts["acked"] += 1
        return self._quietly(delivery.tag.ack(), "ack")

    def nack(self, delivery: Delivery, delay: float, reason: str) -> Awaitable[None]:
        # nak keeps the stored message as it is; the reason is only counted.
        self._release()
        self.counts["nacked"] += 1
        return self._quietly(delivery.tag.nak(delay=delay or None), "nak")

    def reject(self, delivery: Delivery, reason: str) -> Awaitable[None]:
        self._release()
        return self._bury(delivery, reason, attempts=delivery.message.attempt)

    def extend(self, delivery: Delivery) -> Awaitable[None]:
        return self._quietly(delivery.tag.in_progress(), "extend")

    async def _bury(self, delivery: Delivery, reason: str, *, attempts: int) -> None:
        """Publish the dead letter, then terminate the original.

        If the dead letter is not confirmed the original is nak'd instead,
        so the message is never dropped.
        """
        msg = delivery.tag
        try:
            await self.dead_letters.publish(self.queue, delivery.message, reason, attempts)
        except PigeonError as exc:
            self.counts["dead_letter_failures"] += 1
            log.warning("dead-lettering a message of %r failed, it comes back: %s", self.queue, exc)
            await self._quietly(msg.nak(delay=_RETRY_PAUSE), "nak")
            return
        self.counts["dead_lettered"] += 1
        await self._quietly(msg.term(), "term")

    # -- stopping --------------------------------------------------------

    async def drain(self) -> None:
        """Pull nothing more; what the worker holds stays its to settle, and
        what arrives for a pull already asked is handed over as usual."""
        self.draining = True
        self._wake.set()

    async def cancel(self) -> None:
        """Stop pulling; deliveries that never reached the worker go back at once."""
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        backlog, self.backlog = list(self.backlog), deque()
        for delivery in backlog:
            await self._quietly(delivery.tag.nak(), "nak")
        if self._sub is not None:
            await self._stop_listening(self._sub)
        self.on_cancel(self)

    async def _stop_listening(self, sub: Subscription) -> None:
        # A pull still open may have messages on the wire that the server
        # sent before it saw our unsubscribe. Draining (unsubscribe, one
        # round trip, then the callback runs on what came) hands each back
        # with a nak in _on_msg; a plain unsubscribe would drop them here and
        # leave them to wait out their ack wait before anyone else got them.
        try:
            with map_exceptions(f"stop consuming {self.queue!r}"):
                if self.outstanding and self.nc.is_connected:
                    async with asyncio.timeout(_DRAIN_WAIT):
                        await sub.drain()  # type: ignore[no-untyped-call]
                else:
                    await sub.unsubscribe()
        except (PigeonError, TimeoutError):
            self.counts["unsubscribe_failures"] += 1
