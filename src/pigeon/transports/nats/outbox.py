"""Publishing on topics: numbered here, sent over core NATS or, for a
retained topic, through JetStream.

Rule 1: NATS hosts no topic, so the publisher numbers (the core's Rule 2):
one :class:`Renumbering` per transport, its source the transport's session
id; every message carries TOPIC, SEQ and SOURCE. A number whose publish
never went out (refused, too large, closed) is given back when no later one
was handed out since, so subscribers see no gap for it.
Rule 2: which stream holds a topic is known from a listing of the topic
streams (history.py Rule 3): a topic's first publishes here wait, in
order, for a listing made after the first of them; later ones use the
latest listing.
Rule 3: a topic no stream holds goes out on core NATS, in publish order,
from one writer task; its future resolves once a flush (PING/PONG) after it
came back: the server has taken it and handed it to the subscribers it had.
Rule 4: a topic a stream holds (retained, or for durable subscriptions)
goes through JetStream (``Nats-Msg-Id`` is ``<topic>:<id>``), so it is
stored; its future resolves on the pub ack.
One not acknowledged (a timeout, a reconnect) is published again with the
same id until ``send_timeout``; JetStream drops the duplicate. A stream at
its limits that discards new messages refuses it: Backpressure at once.
The message has then still reached the plain subscribers (core NATS hands
a publish to them before the stream looks at it).
Rule 5: ``outbox_limit`` publishes awaiting confirmation make
``publish_nowait`` raise Backpressure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

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
from .history import TopicStream, TopicStreams
from .options import NatsOptions
from .publisher import _fail

log = logging.getLogger("pigeon.nats")

FULL = 10077  # JetStream's error code for "maximum messages (per subject, bytes) exceeded"
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


@dataclass(slots=True)
class _Pending:
    topic: str
    id: str
    seq: int
    subject: str
    body: bytes
    headers: dict[str, str]
    future: asyncio.Future[None]


class TopicOutbox:
    """The topic publishes of one connection.

    Args:
        nc: the connection.
        js: its JetStream context.
        options: the transport's options (timeouts, outbox limit).
        counts: the topic counters (``published``, ``confirmed``...).
        streams: which topics are retained, and where.
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
        self.js = js
        self.options = options
        self.counts = counts
        self.streams = streams
        self.numbering = Renumbering(source)
        self.max_message_size = max_message_size
        self._gated: dict[str, list[_Pending]] = {}  # waiting for a listing (Rule 2)
        self._decided: set[str] = set()  # topics past their first listing
        self._gates: set[asyncio.Task[None]] = set()
        self._core: deque[_Pending] = deque()  # waiting for the writer
        self._unflushed: list[_Pending] = []  # written, waiting for the flush
        self._retained: dict[asyncio.Task[None], asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def unconfirmed(self) -> int:
        gated = sum(len(waiting) for waiting in self._gated.values())
        return gated + len(self._core) + len(self._unflushed) + len(self._retained)

    def publish_nowait(self, topic: str, message: Message) -> asyncio.Future[None]:
        """Number ``message`` and start publishing it on ``topic``.

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
        envelope.to_headers(message)  # refuses headers NATS cannot carry, before numbering
        seq = self.numbering.next(topic)
        headers = envelope.to_headers(
            topics.stamp(message, topic, seq, self.numbering.source), check=False
        )
        # max_payload counts the headers too.
        wire = len(message.body) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + 16
        if wire > self.nc.max_payload:
            self.numbering.give_back(topic, seq)
            raise MessageTooLarge(wire, self.nc.max_payload)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = _Pending(
            topic, message.id, seq, self.streams.subject(topic), message.body, headers, future
        )
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

    def _dispatch(self, pending: _Pending) -> None:
        if pending.future.done():  # failed at close
            return
        stream = self.streams.stream_for(pending.topic)
        if stream is None:
            self._core.append(pending)
            self._start_writer()
            self._wake.set()
            return
        pending.headers[envelope.MSG_ID] = envelope.dedupe_id(pending.topic, pending.id)
        task = asyncio.get_running_loop().create_task(self._send_retained(stream, pending))
        self._retained[task] = pending.future
        task.add_done_callback(self._retained.pop)

    # -- core NATS (Rule 2) ----------------------------------------------

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
                    self._failed(item, exc)
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
                    self._failed(item, exc, give_back=False)  # it may have gone out
            else:
                for item in written:
                    if not item.future.done():
                        item.future.set_result(None)
                self.counts["confirmed"] += len(written)

    def _failed(self, item: _Pending, exc: BaseException, *, give_back: bool = True) -> None:
        if give_back:
            self.numbering.give_back(item.topic, item.seq)
        if _fail(item.future, exc):
            self.counts["publish_failures"] += 1

    # -- JetStream (Rule 3) ----------------------------------------------

    async def _send_retained(self, stream: TopicStream, item: _Pending) -> None:
        options = self.options
        deadline = time.monotonic() + options.send_timeout
        pause = 0.05
        while not item.future.done():
            try:
                with map_exceptions(
                    f"publish on {item.topic!r}",
                    timeout=options.ack_timeout,
                    size=len(item.body),
                    limit=self.nc.max_payload,
                ):
                    await self.js.publish(
                        item.subject,
                        item.body,
                        headers=dict(item.headers),
                        timeout=options.ack_timeout,
                    )
            except (Timeout, TransportError) as exc:
                cause = exc.__cause__
                if isinstance(cause, nats.js.errors.APIError) and cause.err_code == FULL:
                    self.counts["refused"] += 1
                    limit = await self._limit(stream)
                    what = f"retained topic {item.topic!r} (stream {stream.name}, discard new)"
                    self._failed(item, Backpressure(what, limit))
                    return
                # Not confirmed: is the stream still there? (Deleted, it stays
                # unconfirmed for ever; core subscribers had it all the same.)
                await self._relist()
                if self.streams.stream_for(item.topic) is None:
                    self._failed(
                        item,
                        TransportError(
                            f"publish on {item.topic!r}: stream {stream.name} that held it is "
                            f"gone (it may have reached plain subscribers)"
                        ),
                        give_back=False,
                    )
                    return
                if time.monotonic() + pause >= deadline or self._closed:
                    error = TransportError(
                        f"publish on {item.topic!r} not confirmed within "
                        f"{options.send_timeout} s: {exc}"
                    )
                    error.__cause__ = exc
                    self._failed(item, error, give_back=False)
                    return
                self.counts["publish_retries"] += 1
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)
            except PigeonError as exc:  # too large, refused: resending cannot help
                self._failed(item, exc)
                return
            else:
                self.counts["confirmed"] += 1
                self.counts["stored"] += 1
                if not item.future.done():
                    item.future.set_result(None)

    async def _relist(self) -> None:
        try:
            await self.streams.listed_since(time.monotonic())
        except PigeonError:
            pass  # the resend decides

    async def _limit(self, stream: TopicStream) -> int:
        """The message limit a full stream has, for Backpressure (0: bytes or age)."""
        try:
            with map_exceptions(f"look at stream {stream.name}", timeout=self.options.ack_timeout):
                config = (await self.js.stream_info(stream.name)).config
        except PigeonError:
            return 0
        for limit in (config.max_msgs_per_subject, config.max_msgs):
            if limit is not None and limit > 0:
                return limit
        return 0

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
            *self._retained.values(),
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
        for task, future in list(self._retained.items()):
            task.cancel()
            if _fail(future, error):
                self.counts["unconfirmed_at_close"] += 1
        tasks = [*self._gates, *self._retained, *([self._writer] if self._writer else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
