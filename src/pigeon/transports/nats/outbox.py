"""Publishing on topics: who numbers a message, and how it goes out.

Rule 1: which stream holds a topic is known from a listing of the topic
streams (history.py Rule 3): a topic's first publishes here wait, in
order, for a listing made after the first of them; later ones use the
latest listing. A message is numbered when its way is known, in publish
order.
Rule 2: a retained topic is numbered by its stream, the topic's host (the
core's Rule 2): SEQ continues the topic's last number in the stream and
SOURCE is the stream's name, whichever connection publishes, so its
numbers are one sequence per topic from 1, as on pigeon's own hosts, and
``from_seq`` counts them (storing.py).
Rule 3: any other topic is numbered by the publisher: one
:class:`Renumbering` per transport, SOURCE its session id. A number whose
publish never went out (refused, too large, closed) is given back when no
later one was handed out since, so subscribers see no gap for it.
Rule 4: a topic no stream holds goes out on core NATS, in publish order,
from one writer task; its future resolves once a flush (PING/PONG) after it
came back: the server has taken it and handed it to the subscribers it had.
A topic a stream holds goes through JetStream and resolves on the pub ack
(storing.py).
Rule 5: ``outbox_limit`` publishes awaiting confirmation make
``publish_nowait`` raise Backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque

from nats.aio.client import Client
from nats.js import JetStreamContext

from ..._core import headers as pigeon_headers
from ..._core import topics
from ...errors import (
    Backpressure,
    ClosedError,
    ConfigurationError,
    MessageTooLarge,
    PigeonError,
    Timeout,
    TransportError,
)
from ...message import Message
from . import envelope
from .errors import map_exceptions
from .history import TopicStreams
from .options import NatsOptions
from .publisher import _fail
from .storing import EXPECTED_LAST, Pending, StoredSends

log = logging.getLogger("pigeon.nats")

_MAX_UNUSED = 10_000  # numbers given back and waiting for the ones after them
_MAX_DECIDED = 100_000  # topics whose first listing is remembered


class Renumbering(topics.Numbering):
    """The core's Numbering, able to take back numbers never published."""

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self._unused: dict[str, set[int]] = {}

    def give_back(self, topic: str, seq: int) -> None:
        """``seq`` of ``topic`` was never published: reuse it (and the ones
        given back right below it) if nothing after it was handed out."""
        unused = self._unused.setdefault(topic, set())
        unused.add(seq)
        last = self.last(topic)
        while last in unused:
            unused.discard(last)
            last -= 1
        if last < self.last(topic):
            self._last[topic] = last
        if not unused or len(unused) > _MAX_UNUSED:
            del self._unused[topic]


class TopicOutbox:
    """The topic publishes of one connection.

    Args:
        nc: the connection.
        js: its JetStream context.
        options: the transport's options (timeouts, outbox limit).
        counts: the topic counters (``published``, ``confirmed``...).
        streams: which topics a stream holds.
        source: the session id numbering this connection's publishes.
        max_message_size: the largest body allowed.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        options: NatsOptions,
        counts: Counter[str],
        streams: TopicStreams,
        source: str,
        max_message_size: int,
    ) -> None:
        self.nc = nc
        self.options = options
        self.counts = counts
        self.streams = streams
        self.numbering = Renumbering(source)
        self.max_message_size = max_message_size
        self.stored = StoredSends(nc, js, options, counts, streams, self._failed)
        self._gated: dict[str, list[Pending]] = {}  # waiting for a listing (Rule 1)
        self._decided: set[str] = set()  # topics past their first listing
        self._gates: set[asyncio.Task[None]] = set()
        self._core: deque[Pending] = deque()  # waiting for the writer
        self._unflushed: list[Pending] = []  # written, waiting for the flush
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def unconfirmed(self) -> int:
        gated = sum(len(waiting) for waiting in self._gated.values())
        return gated + len(self._core) + len(self._unflushed) + self.stored.unconfirmed

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        """Start publishing ``message`` on ``topic`` (numbered on its way, Rule 1).

        Raises:
            ConfigurationError: a bad topic, or a header NATS cannot carry.
            MessageTooLarge: the body (or the whole message) is too large.
            Backpressure: ``outbox_limit`` publishes await confirmation.
            ClosedError: the outbox is closed.
        """
        if self._closed:
            raise ClosedError("the NATS connection is closed")
        try:
            topics.check_topic(topic)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(str(exc)) from None
        if len(message.body) > self.max_message_size:
            raise MessageTooLarge(len(message.body), self.max_message_size)
        if self.unconfirmed >= self.options.outbox_limit:
            raise Backpressure("the NATS topic outbox", self.options.outbox_limit)
        headers = envelope.to_headers(message)  # refuses headers NATS cannot carry
        # max_payload counts the headers too, with the numbering still to come.
        wire = len(message.body) + sum(len(k) + len(v) + 4 for k, v in headers.items())
        wire += _numbering_size(topic, message.id, self.numbering.source)
        if wire > self.nc.max_payload:
            raise MessageTooLarge(wire, self.nc.max_payload)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        subject = self.streams.subject(topic)
        pending = Pending(topic, message.id, subject, message.body, headers, future)
        self.counts["published"] += 1
        if topic in self._decided:
            self.streams.maybe_refresh()
            self._dispatch(pending)
        elif topic in self._gated:
            self._gated[topic].append(pending)
        else:
            self._gated[topic] = [pending]
            gate = asyncio.get_running_loop().create_task(self._first_listing(topic))
            self._gates.add(gate)
            gate.add_done_callback(self._gates.discard)
        return future

    async def _first_listing(self, topic: str) -> None:
        try:
            await self.streams.listed_since(time.monotonic())
        except PigeonError as exc:
            # Without a listing the topic goes out on core NATS (a stream
            # holding it still stores it); the next listing may say more.
            self.counts["stream_listing_failures"] += 1
            log.warning("publishing on %r without knowing its stream: %s", topic, exc)
        waiting = self._gated.pop(topic, [])
        if len(self._decided) >= _MAX_DECIDED:
            self._decided.clear()
        self._decided.add(topic)
        for pending in waiting:  # in publish order, with no await in between
            self._dispatch(pending)

    def _dispatch(self, pending: Pending) -> None:
        if pending.future.done():  # failed at close
            return
        stream = self.streams.stream_for(pending.topic)
        if stream is not None and stream.retained:
            self.stored.send_numbered(stream, pending)  # Rule 2
            return
        pending.seq = self.numbering.next(pending.topic)  # Rule 3
        pending.headers.update(
            {
                pigeon_headers.TOPIC: pending.topic,
                pigeon_headers.SEQ: str(pending.seq),
                pigeon_headers.SOURCE: self.numbering.source,
            }
        )
        if stream is not None:
            self.stored.send(stream, pending)
            return
        self._core.append(pending)
        self._start_writer()
        self._wake.set()

    def _failed(self, item: Pending, exc: BaseException, give_back: bool) -> None:
        if give_back and item.seq:
            self.numbering.give_back(item.topic, item.seq)
        if _fail(item.future, exc):
            self.counts["publish_failures"] += 1

    # -- core NATS (Rule 4) ----------------------------------------------

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while self._core:
                item = self._core.popleft()
                try:
                    with map_exceptions(
                        f"publish on {item.topic!r}", size=len(item.body), limit=self.nc.max_payload
                    ):
                        await self.nc.publish(item.subject, item.body, headers=item.headers)
                except PigeonError as exc:
                    self._failed(item, exc, True)
                else:
                    self._unflushed.append(item)
            if not self._unflushed:
                continue
            written, self._unflushed = self._unflushed, []
            try:
                timeout = self.options.ack_timeout
                with map_exceptions("flush the topic publishes", timeout=timeout):
                    # nats-py annotates the timeout as int; it takes seconds.
                    await self.nc.flush(timeout=timeout)  # type: ignore[arg-type]
            except PigeonError as exc:
                for item in written:
                    self._failed(item, exc, False)  # it may have gone out
            else:
                for item in written:
                    if not item.future.done():
                        item.future.set_result(None)
                self.counts["confirmed"] += len(written)

    # -- flushing and closing --------------------------------------------

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until every publish so far is confirmed (or has failed).

        Raises:
            Timeout: some are still unconfirmed after ``timeout`` seconds.
        """
        futures = [
            *(p.future for waiting in self._gated.values() for p in waiting),
            *(p.future for p in self._core),
            *(p.future for p in self._unflushed),
            *self.stored.futures(),
        ]
        if not futures:
            return
        _done, pending = await asyncio.wait(futures, timeout=timeout)
        if pending:
            raise Timeout(f"{len(pending)} topic publishes still unconfirmed after {timeout} s")

    async def close(self, url: str) -> None:
        """Stop, failing every publish still unconfirmed (counted in
        ``unconfirmed_at_close``)."""
        self._closed = True
        self._wake.set()
        error = TransportError(f"closed before {url} confirmed a topic publish")
        items = [*(p for w in self._gated.values() for p in w), *self._core, *self._unflushed]
        self._gated.clear()
        self._core.clear()
        self._unflushed = []
        for item in items:
            if _fail(item.future, error):
                self.counts["unconfirmed_at_close"] += 1
        tasks = [*self._gates, *([self._writer] if self._writer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.stored.close(error)


def _numbering_size(topic: str, message_id: str, source: str) -> int:
    """The most the numbering and JetStream headers add to a message."""
    added = {
        pigeon_headers.TOPIC: topic,
        pigeon_headers.SEQ: "9" * 19,
        pigeon_headers.SOURCE: "x" * max(len(source), 256),  # a stream's name, or ours
        envelope.MSG_ID: envelope.dedupe_id(topic, message_id),
        EXPECTED_LAST: "9" * 19,
    }
    # A retained stream's republish adds Nats-Stream, -Subject, -Sequence
    # and -Last-Sequence.
    republished = 4 * 24 + 256 + len(topic) + 64 + 2 * 19
    return sum(len(k) + len(v) + 4 for k, v in added.items()) + 16 + republished
