"""Topic publishes through JetStream: confirmed by the pub ack, and for a
retained topic, numbered by its stream.

Rule 1: every publish here carries ``Nats-Msg-Id`` ``<topic>:<id>``; one
not acknowledged (a timeout, a reconnect) is published again with the same
id until ``send_timeout`` (JetStream drops the duplicate), unless the
stream turns out to be gone (TransportError at once). A stream at its
limits that discards new messages refuses it: Backpressure at once, and it
took no number. A refused publish on a retained topic reaches nobody (plain
subscribers get what the stream republishes); on a topic held by a
subscription stream it has still reached the plain subscribers (core NATS
hands a publish to them before the stream looks at it).
Rule 2: a retained topic's messages are numbered by its stream: they go
to ``<prefix>.r.<topic>`` (the stream republishes what it stored to the
topic's subject) one at a time per topic (a lane), each numbered one past the topic's
last message in the stream and published with
``Nats-Expected-Last-Subject-Sequence`` set to that message's stream
sequence. If another connection published on the topic in between,
JetStream refuses it ("wrong last sequence"): the lane reads the last
message again and numbers anew (counted ``renumbered``). So the topic's
numbers are one sequence from 1 (SOURCE: the stream's name), whoever
publishes. A topic whose last message was not numbered by the stream (a
plain NATS client's, or one published before its stream was known) starts
again from 1.
Rule 3: a topic held by a subscription stream (no history) keeps the
publisher's numbers, and its publishes run concurrently (pipelined).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from ..._core import headers as pigeon_headers
from ...errors import Backpressure, PigeonError, Timeout, TransportError
from . import envelope
from .errors import map_exceptions
from .history import TopicStream, TopicStreams
from .options import NatsOptions

EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
FULL = 10077  # JetStream's "maximum messages (per subject, bytes) exceeded"
WRONG_LAST = 10071  # JetStream's "wrong last sequence"


@dataclass(slots=True)
class Pending:
    """One publish on its way."""

    topic: str
    id: str
    subject: str
    body: bytes
    headers: dict[str, str]  # the envelope; numbering added on the way
    future: asyncio.Future[None]
    seq: int = 0  # the publisher's number, once given (0: none, or the stream's)


# What to do with a publish that failed: (item, error, give its number back).
Failed = Callable[[Pending, BaseException, bool], None]


class _Lane:
    """The publishes of one retained topic, one at a time (Rule 2)."""

    def __init__(self, stream: TopicStream) -> None:
        self.stream = stream
        self.waiting: deque[Pending] = deque()
        self.last: int | None = None  # the topic's last number (None: read it)
        self.last_seq = 0  # the stream sequence of that message
        self.task: asyncio.Task[None] | None = None


class StoredSends:
    """The JetStream publishes of one connection.

    Args:
        nc: the connection.
        js: its JetStream context.
        options: the transport's options (timeouts).
        counts: the topic counters.
        streams: the topic streams (looked at again when a stream may be gone).
        failed: told of a publish that failed.
    """

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        options: NatsOptions,
        counts: Counter[str],
        streams: TopicStreams,
        failed: Failed,
    ) -> None:
        self.nc = nc
        self.js = js
        self.options = options
        self.counts = counts
        self.streams = streams
        self.failed = failed
        self._sends: dict[asyncio.Task[None], asyncio.Future[None]] = {}
        self._lanes: dict[str, _Lane] = {}
        self._closed = False

    @property
    def unconfirmed(self) -> int:
        return len(self._sends) + sum(len(lane.waiting) for lane in self._lanes.values())

    def futures(self) -> Iterator[asyncio.Future[None]]:
        yield from self._sends.values()
        for lane in self._lanes.values():
            yield from (p.future for p in lane.waiting)

    # -- publisher-numbered, pipelined (Rule 3) --------------------------

    def send(self, stream: TopicStream, item: Pending) -> None:
        item.headers[envelope.MSG_ID] = envelope.dedupe_id(item.topic, item.id)
        task = asyncio.get_running_loop().create_task(self._until_stored(stream, item))
        self._sends[task] = item.future
        task.add_done_callback(self._sends.pop)

    async def _until_stored(self, stream: TopicStream, item: Pending) -> None:
        deadline = time.monotonic() + self.options.send_timeout
        pause = 0.05
        while not item.future.done():
            outcome, _ = await self._publish(stream, item, item.headers, deadline)
            if outcome != "again":
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    # -- stream-numbered, one at a time per topic (Rule 2) ---------------

    def send_numbered(self, stream: TopicStream, item: Pending) -> None:
        lane = self._lanes.get(item.topic)
        if lane is None or lane.stream != stream:
            # New, or its stream changed: the old lane (if any) finishes its own.
            lane = self._lanes[item.topic] = _Lane(stream)
        lane.waiting.append(item)
        if lane.task is None or lane.task.done():
            lane.task = asyncio.get_running_loop().create_task(self._drive(item.topic, lane))

    async def _drive(self, topic: str, lane: _Lane) -> None:
        while lane.waiting and not self._closed:
            item = lane.waiting[0]
            if not item.future.done():
                await self._number_and_store(lane, item)
            lane.waiting.popleft()
        if self._lanes.get(topic) is lane and not lane.waiting:
            del self._lanes[topic]

    async def _number_and_store(self, lane: _Lane, item: Pending) -> None:
        deadline = time.monotonic() + self.options.send_timeout
        pause = 0.05
        item.headers[envelope.MSG_ID] = envelope.dedupe_id(item.topic, item.id)
        while not item.future.done():
            if lane.last is None:
                try:
                    await self._read_last(lane, item.topic)
                except PigeonError as exc:
                    if time.monotonic() + pause >= deadline or self._closed:
                        self.failed(item, exc, False)
                        return
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, 1.0)
                    continue
            assert lane.last is not None
            headers = {
                **item.headers,
                pigeon_headers.TOPIC: item.topic,
                pigeon_headers.SEQ: str(lane.last + 1),
                pigeon_headers.SOURCE: lane.stream.name,
                EXPECTED_LAST: str(lane.last_seq),
            }
            outcome, stored_at = await self._publish(lane.stream, item, headers, deadline)
            if outcome == "stored":
                lane.last += 1
                lane.last_seq = stored_at
                return
            if outcome == "settled":
                return
            if outcome == "renumber":
                lane.last = None
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _read_last(self, lane: _Lane, topic: str) -> None:
        """The topic's last number and stream sequence, from its last message."""
        stream = lane.stream
        try:
            with map_exceptions(f"read stream {stream.name}", timeout=self.options.ack_timeout):
                msg = await self.js.get_msg(stream.name, subject=stream.subject_of(topic))
        except PigeonError as exc:
            if not isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                raise
            lane.last, lane.last_seq = 0, 0
            return
        found = msg.headers or {}
        seq = found.get(pigeon_headers.SEQ, "")
        ours = found.get(pigeon_headers.SOURCE) == stream.name
        lane.last = int(seq) if ours and seq.isdigit() and len(seq) <= 19 else 0
        lane.last_seq = int(msg.seq or 0)

    # -- one publish -----------------------------------------------------

    async def _publish(
        self, stream: TopicStream, item: Pending, headers: dict[str, str], deadline: float
    ) -> tuple[str, int]:
        """Publish once: ("stored", its stream sequence); ("settled", 0):
        failed for good (the future says); ("renumber", 0): another
        connection published on the topic since its last was read;
        ("again", 0): publish it again."""
        options = self.options
        try:
            with map_exceptions(
                f"publish on {item.topic!r}",
                timeout=options.ack_timeout,
                size=len(item.body),
                limit=self.nc.max_payload,
            ):
                ack = await self.js.publish(
                    stream.subject_of(item.topic),
                    item.body,
                    headers=dict(headers),
                    timeout=options.ack_timeout,
                )
        except (Timeout, TransportError) as exc:
            cause = exc.__cause__
            if isinstance(cause, nats.js.errors.APIError) and cause.err_code == FULL:
                self.counts["refused"] += 1
                limit = await self._limit(stream)
                what = f"topic {item.topic!r} (stream {stream.name}, full, discards new)"
                self.failed(item, Backpressure(what, limit), True)
                return "settled", 0
            # Not confirmed: is the stream still there? (Deleted, it stays
            # unconfirmed for ever; core subscribers had it all the same.)
            await self._relist()
            if self.streams.stream_for(item.topic) is None:
                gone = TransportError(
                    f"publish on {item.topic!r}: stream {stream.name} that held it is gone "
                    f"(it may have reached plain subscribers)"
                )
                self.failed(item, gone, False)
                return "settled", 0
            if time.monotonic() >= deadline or self._closed:
                error = TransportError(
                    f"publish on {item.topic!r} not confirmed within "
                    f"{options.send_timeout} s: {exc}"
                )
                error.__cause__ = exc
                self.failed(item, error, False)
                return "settled", 0
            self.counts["publish_retries"] += 1
            return "again", 0
        except PigeonError as exc:
            cause = exc.__cause__
            if isinstance(cause, nats.js.errors.APIError) and cause.err_code == WRONG_LAST:
                self.counts["renumbered"] += 1  # another connection published in between
                return "renumber", 0
            self.failed(item, exc, True)  # too large, refused: resending cannot help
            return "settled", 0
        self.counts["confirmed"] += 1
        self.counts["stored"] += 1
        if not item.future.done():
            item.future.set_result(None)
        return "stored", int(ack.seq or 0)

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

    async def close(self, error: TransportError) -> None:
        """Stop, failing what is unconfirmed (``unconfirmed_at_close``)."""
        self._closed = True
        tasks = [*self._sends, *(lane.task for lane in self._lanes.values() if lane.task)]
        futures = list(self.futures())
        for task in tasks:
            task.cancel()
        for future in futures:
            if not future.done():
                future.set_exception(error)
                future.exception()  # counted, not logged at garbage collection
                self.counts["unconfirmed_at_close"] += 1
        await asyncio.gather(*tasks, return_exceptions=True)
        self._lanes.clear()
