"""Replays: a subscription that starts in a retained topic's history, read
from its RabbitMQ stream, and goes on with the live messages from the same
stream consumer, so history and live are one sequence with no gap and no
duplicate.

Rule 1 (the end): a stream says neither its length nor its last offset over
AMQP 0-9-1, so a replay finds the end of the history itself: it attaches a
probe at ``last``, then publishes a marker (AMQP ``type``
``pigeon.replay-marker``, a fresh id) straight into the stream, confirmed;
the probe reads on to it. The marker's offset ``end`` splits history
(before) from live (after). Every pigeon reader skips markers.
Rule 2 (the start): ``from_seq`` and ``last_per_subject`` read from the
stream's first message; ``last=N`` from offset ``end - N`` (stream offsets
grow by one per message at most, so at most N messages are there), and if
fewer than N of them match the pattern, once more from the first;
``from_time`` from the stream's chunk at that second (AMQP timestamps are
whole seconds, less ``SKEW`` for clocks apart), keeping only messages
created at or after ``from_time``.
Rule 3 (selecting): ``from_time`` is decided message by message, so its
history flows at once. The others need the whole history first: it is read
to the marker (each delivery acked at once, to keep the stream flowing; so
it is held in memory), then selected: ``from_seq`` keeps, per publisher
and topic, numbers from ``from_seq`` on; ``last`` the last N; and
``last_per_subject`` the last of each topic. ``subscribe`` returns once
that is done (or raises what it found).
Rule 4 (numbers): ``seq`` is the publisher's number (``headers.SEQ`` per
``headers.SOURCE`` and topic), never a stream offset, so a subscriber whose
pattern is narrower than the stream's sees no false gap. ``from_seq`` asks
for that number on each (source, topic) in the history. If the stream was
trimmed (its first offset is not 0) and a (source, topic)'s first retained
number is above ``from_seq``, that is ReplayTrimmed naming it (even if
those numbers were published before ``retain``: a trimmed stream cannot
tell them apart).
Rule 5 (live): after the marker every message matching the pattern is
handed over, and acked on the broker only when settled, so the stream
waits for a slow subscriber (its retention bounds how far behind it may
fall: what is trimmed before it is read shows as a gap). After a
reconnect the consumer resumes after the last offset seen; an offset at or
below it is a repeat, skipped and counted.
Rule 6 (faults): a history that makes no progress for ``STALL`` seconds is
a TransportError, never a hang. A stream whose member on the broker's node
is (re)starting refuses a consume (PRECONDITION_FAILED, "does not have a
replica on the local node"): the start is tried again for up to
``NOT_READY_WAIT`` seconds, counted in ``replay_restarts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)

from ..._core import headers
from ..._core.backoff import TryWindow
from ..._core.topics import StartAt, matches, numbered
from ...errors import PigeonError, ReplayTrimmed, TransportError
from ...message import Message, new_id
from ..base import DeliverySink, SubscribeOptions
from .envelope import from_amqp
from .errors import QueueNotReady, map_exceptions
from .leases import ClientLeases
from .publisher import Publisher
from .subscribers import topic_of, with_topic
from .topics import MARKER_TYPE
from .topology import Topology

STALL = 10.0  # seconds a history read may go without a message
SKEW = 2  # seconds before from_time the stream is read from
OFFSET = "x-stream-offset"
NOT_READY_WAIT = 5.0  # seconds a stream not ready on the broker's node is tried for
NOT_READY_PAUSE = 0.25  # seconds between those tries


def offset_of(incoming: AbstractIncomingMessage) -> int | None:
    value = (incoming.headers or {}).get(OFFSET)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_marker(incoming: AbstractIncomingMessage) -> bool:
    return incoming.type == MARKER_TYPE


def select(entries: list[tuple[int, Message]], start: StartAt, trimmed: bool) -> list[Message]:
    """The history a replay hands over, oldest first (Rules 3 and 4).

    Raises:
        ReplayTrimmed: ``from_seq`` is below a retained (source, topic)'s
            first number in a trimmed stream.
    """
    messages = [m for _, m in entries]
    if start.from_seq is not None:
        first: dict[tuple[str, str], int] = {}
        kept: list[Message] = []
        for message in messages:
            mark = numbered(message)
            if mark is None:
                continue  # no number to start from
            source, topic, seq = mark
            low = first.setdefault((source, topic), seq)
            if trimmed and start.from_seq < low:
                raise ReplayTrimmed(topic, start.from_seq, low)
            if seq >= start.from_seq:
                kept.append(message)
        return kept
    if start.last is not None:
        return messages[-start.last :]
    if start.last_per_subject:
        last: dict[str, Message] = {}
        for message in messages:
            topic = message.headers.get(headers.TOPIC, "")
            last.pop(topic, None)
            last[topic] = message  # re-inserted: dict order is the last one's
        return list(last.values())
    return messages


class ReplaySubscription(ClientLeases):
    """An ephemeral subscription that starts in the history of a stream.

    Args:
        connection: returns the connection (raises once closed).
        topology, publisher, counts, address: as for other subscriptions.
        stream: the retained stream whose pattern covers ``pattern``.
        pattern: the subscription's pattern.
        sink: where deliveries are handed over.
        options: the subscription's options (``start`` replays).
    """

    def __init__(
        self,
        connection: Callable[[], AbstractRobustConnection],
        topology: Topology,
        publisher: Publisher,
        counts: Counter[str],
        *,
        address: str,
        stream: str,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
    ) -> None:
        super().__init__(
            label=stream,
            sink=sink,
            options=options.consume,
            counts=counts,
            publisher=publisher,
            topology=topology,
            address=address,
        )
        self.connection = connection
        self.stream = stream
        self.pattern = pattern
        self.start_at = options.start
        self.channel: AbstractRobustChannel | None = None
        self._queue: AbstractRobustQueue | None = None
        self._end = -1  # the marker's offset: history up to it, live after
        self._generation = 0  # which consumer's deliveries count
        self._tag: str | None = None
        self._arguments: dict[str, Any] = {}
        self._last_offset = -1
        self._first_offset: int | None = None
        self._window = 0  # last=N: the offset read from (0: the first)
        self._collecting = False
        self._collected: list[tuple[int, Message]] = []
        self._history: asyncio.Future[None] | None = None
        self._progress = 0
        self._cancelled = False

    # -- starting ------------------------------------------------------------

    async def start(self) -> None:
        """Find the end of the history, start reading, and (but for
        ``from_time``) wait until the history is selected and handed over.

        Raises:
            ReplayTrimmed: see Rule 4.
            TransportError: the broker cannot be reached, or the history
                stalled (Rule 6).
        """
        start = self.start_at
        window = TryWindow(NOT_READY_WAIT, NOT_READY_PAUSE)
        while True:
            try:
                await self._open_and_find_end()
                break
            except QueueNotReady:
                # The stream's member on the broker's node is (re)starting.
                if not window.again(time.monotonic()):
                    raise
            self.counts["replay_restarts"] += 1
            await self._drop_channel()
            await asyncio.sleep(window.pause)
        if start.last is not None:
            self._window = max(0, self._end - start.last)
        loop = asyncio.get_running_loop()
        buffered = start.from_time is None
        if buffered:
            self._history = loop.create_future()
        await self._consume(self._first_argument(), collect=buffered)
        if self._history is not None:
            await self._await_progress(self._history, "read the retained history")

    async def _open_and_find_end(self) -> None:
        with map_exceptions(f"replay {self.pattern!r}", address=self.address):
            self.channel = channel = await self.connection().channel(publisher_confirms=False)
            # A stream consumer needs a prefetch; it is also the credit.
            await channel.set_qos(prefetch_count=self.options.prefetch)
            self._queue = await channel.declare_queue(self.stream, passive=True)
        self._end = await self._find_end()

    async def _drop_channel(self) -> None:
        channel, self.channel = self.channel, None
        self._queue = None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):  # noqa: BLE001  (it is being dropped)
                await channel.close()

    def _first_argument(self) -> Any:
        start = self.start_at
        if start.from_time is not None:
            second = math.floor(start.from_time) - SKEW
            return datetime.datetime.fromtimestamp(max(0, second), datetime.UTC)
        if self._window > 0:
            return self._window
        return "first"

    async def _find_end(self) -> int:
        """Rule 1: the offset of a marker written now."""
        queue = self._queue
        assert queue is not None
        token = new_id()
        found: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._progress = 0

        async def probe(incoming: AbstractIncomingMessage) -> None:
            self._progress += 1
            offset = offset_of(incoming)
            if is_marker(incoming) and incoming.message_id == token and offset is not None:
                if not found.done():
                    found.set_result(offset)
            with contextlib.suppress(Exception):
                await incoming.ack()

        stream = self.stream
        with map_exceptions(f"replay {self.pattern!r}", address=self.address):
            tag = await queue.consume(probe, arguments={OFFSET: "last"}, robust=False)
        try:
            marker = aio_pika.Message(b"", type=MARKER_TYPE, message_id=token)
            await self.publisher.publish(stream, lambda resend: marker, renew=False)
            end: int = await self._await_progress(found, "find the end of the retained history")
            return end
        finally:
            with contextlib.suppress(PigeonError):
                with map_exceptions(f"replay {self.pattern!r}", address=self.address):
                    await queue.cancel(tag)

    async def _await_progress(self, future: asyncio.Future[Any], what: str) -> Any:
        """``future``'s result, waiting as long as deliveries keep coming (Rule 6)."""
        while True:
            seen = self._progress
            try:
                return await asyncio.wait_for(asyncio.shield(future), STALL)
            except TimeoutError:
                if self._progress == seen:
                    raise TransportError(
                        f"{what} of {self.stream!r}: the stream sent nothing for {STALL:.0f} s",
                        address=self.address,
                    ) from None

    async def _consume(self, offset: Any, *, collect: bool) -> None:
        queue = self._queue
        assert queue is not None
        self._generation += 1
        generation = self._generation
        self._collecting = collect
        self._collected = []
        self._first_offset = None
        self._last_offset = -1
        # aio-pika keeps this dict to restore the consumer after a reconnect;
        # moving the offset on as messages come makes it resume after the
        # last one seen instead of reading the history again (Rule 5).
        self._arguments = {OFFSET: offset}

        async def deliver(incoming: AbstractIncomingMessage) -> None:
            self._on_message(generation, incoming)

        with map_exceptions(f"replay {self.pattern!r}", address=self.address):
            self._tag = await queue.consume(deliver, arguments=self._arguments)

    # -- deliveries ----------------------------------------------------------

    def _on_message(self, generation: int, incoming: AbstractIncomingMessage) -> None:
        # Runs in delivery order, and hands over without awaiting.
        if self._cancelled or generation != self._generation:
            self._spawn(self._ack(incoming))
            return
        self._progress += 1
        offset = offset_of(incoming)
        if offset is not None:
            if offset <= self._last_offset:
                self.counts["repeats_skipped"] += 1
                self._spawn(self._ack(incoming))
                return
            self._last_offset = offset
            self._arguments[OFFSET] = offset + 1
            if self._first_offset is None:
                self._first_offset = offset
        history = offset is None or offset < self._end
        if self._collecting and not history:
            self._collected_all()  # the marker (or a message past it) is here
            if self._cancelled or generation != self._generation:
                self._spawn(self._ack(incoming))  # failed, or a new read starts over
                return
        if is_marker(incoming):
            if incoming.message_id is None or offset != self._end:
                self.counts["markers_skipped"] += 1
            self._spawn(self._ack(incoming))
            return
        topic = topic_of(incoming)
        if not matches(self.pattern, topic):
            self.counts["filtered"] += 1
            self._spawn(self._ack(incoming))
            return
        message = with_topic(from_amqp(incoming), topic)
        # A stream delivers each message once per reader: its first delivery.
        message.attempt, message.redelivered = 1, False
        if self._collecting:
            assert offset is not None
            self._collected.append((offset, message))
            self._spawn(self._ack(incoming))  # keep the stream flowing to the end
            return
        if history and self._too_early(message):
            self.counts["before_start"] += 1
            self._spawn(self._ack(incoming))
            return
        if history:
            self.counts["replayed"] += 1
        self.offer(message, incoming)

    def _too_early(self, message: Message) -> bool:
        when = self.start_at.from_time
        return when is not None and message.created_at < when

    def _collected_all(self) -> None:
        """The history is read: select it and hand it over (Rule 3)."""
        history = self._history
        collected = self._collected
        start = self.start_at
        if start.last is not None and self._window > 0 and len(collected) < start.last:
            # Fewer than N matched after end - N: read from the first.
            self._window = 0
            self._spawn(self._restart())
            self._generation += 1  # the current consumer's deliveries are void
            return
        self._collecting = False
        self._collected = []
        trimmed = (self._first_offset or 0) > 0
        try:
            chosen = select(collected, start, trimmed)
        except ReplayTrimmed as exc:
            self._cancelled = True
            if history is not None and not history.done():
                history.set_exception(exc)
            return
        self.counts["replayed"] += len(chosen)
        for message in chosen:
            self.offer(message, None)
        if history is not None and not history.done():
            history.set_result(None)

    async def _restart(self) -> None:
        queue, tag = self._queue, self._tag
        try:
            if queue is not None and tag is not None:
                with map_exceptions(f"replay {self.pattern!r}", address=self.address):
                    await queue.cancel(tag)
            await self._consume("first", collect=True)
        except PigeonError as exc:
            history = self._history
            if history is not None and not history.done():
                history.set_exception(exc)

    # -- stopping -------------------------------------------------------------

    async def cancel(self) -> None:
        """Stop reading; the stream keeps everything."""
        if self._cancelled and self.channel is None:
            return
        self._cancelled = True
        await self.end_leases()
        channel, self.channel = self.channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(PigeonError):
                with map_exceptions(f"stop replaying {self.pattern!r}", address=self.address):
                    await channel.close()
