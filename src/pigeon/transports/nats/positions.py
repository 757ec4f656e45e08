"""Where a replay starts in a retained pattern's stream.

Rule 1: ``from_seq`` counts each topic's own numbers, the ones its stream
gave (storing.py Rule 2, ``Event.seq``): every matching topic from that
number on. Each topic's first message numbered that or more is found by
bisection over stream sequences (its numbers grow with them); the consumer
starts at the earliest of those, and the history before ``cut`` (the
stream's last sequence when the subscription was placed) numbered below
``from_seq`` in its topic is skipped there (acked, counted ``skipped``).
Live messages after ``cut`` all come.
Rule 2: a topic whose first kept message is numbered above ``from_seq``
has trimmed the ones asked for (numbers start at 1): ``ReplayTrimmed``
names that topic and its first kept number.
Rule 3: ``last=N`` starts at the N-th last message matching the filter,
across its topics in stream order, found by counting (``num_pending`` of a
probe consumer, deleted at once): first at ``last sequence - N + 1``
(right when every sequence there is on the filter, as in a stream of one
topic), else by bisection. Fewer than N messages: from the first.
Rule 4: ``from_time`` is BY_START_TIME, ``last_per_subject``
LAST_PER_SUBJECT, and no start (a durable subscription) NEW.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RawStreamMsg

from ..._core import headers as pigeon_headers
from ..._core.topics import StartAt
from ...errors import PigeonError, ReplayTrimmed
from .errors import map_exceptions
from .history import TopicStream, TopicStreams

log = logging.getLogger("pigeon.nats")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a new consumer starts, and what of the history it skips (Rule 1)."""

    config: dict[str, Any] = field(default_factory=dict)  # ConsumerConfig fields
    below: int = 0  # skip history numbered below this in its topic (0: nothing)
    cut: int = 0  # ... up to this stream sequence
    source: str = ""  # ... numbered by this stream


def after(seq: int) -> dict[str, Any]:
    """The ConsumerConfig fields starting right after stream sequence ``seq``."""
    return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": seq + 1}


async def place(
    streams: TopicStreams, stream: TopicStream, pattern: str, start: StartAt
) -> Placement:
    """Where a new consumer of ``pattern`` starts for ``start``.

    Raises:
        ReplayTrimmed: ``from_seq`` is trimmed in a topic (Rule 2).
        TransportError, Timeout: JetStream did not answer.
    """
    if start.from_seq is not None:
        return await _from_number(streams, stream, pattern, start.from_seq)
    if start.from_time is not None:
        when = datetime.datetime.fromtimestamp(start.from_time, tz=datetime.UTC)
        return Placement({"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": when})
    if start.last_per_subject:
        return Placement({"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT})
    if start.last is not None:
        seq = await _nth_last(streams, stream, pattern, start.last)
        if seq is None:
            return Placement({"deliver_policy": DeliverPolicy.ALL})
        return Placement({"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": seq})
    return Placement({"deliver_policy": DeliverPolicy.NEW})


# -- from_seq (Rules 1 and 2) ------------------------------------------------


async def _from_number(
    streams: TopicStreams, stream: TopicStream, pattern: str, wanted: int
) -> Placement:
    timeout = streams.options.ack_timeout
    with map_exceptions(f"look at stream {stream.name}", timeout=timeout):
        info = await streams.js.stream_info(stream.name, subjects_filter=stream.subject_of(pattern))
    cut = int(info.state.last_seq or 0)
    starts: list[int] = []
    for subject in sorted(info.state.subjects or {}):
        topic = subject[len(stream.root) :]
        first = await _message(streams, stream, seq=1, subject=subject, next=True)
        if first is None:
            continue  # trimmed since the stream was looked at
        number = _number(first, stream)
        if number is not None and wanted < number:
            streams.counts["replays_trimmed"] += 1
            raise ReplayTrimmed(topic, wanted, number)
        start = await _first_numbered(streams, stream, subject, wanted, first)
        if start is not None:
            starts.append(start)
    begin = min(starts) if starts else cut + 1
    config = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": max(begin, 1)}
    return Placement(config, below=wanted, cut=cut, source=stream.name)


async def _first_numbered(
    streams: TopicStreams, stream: TopicStream, subject: str, wanted: int, first: RawStreamMsg
) -> int | None:
    """The stream sequence of the first message on ``subject`` numbered
    ``wanted`` or more (None: none yet)."""
    number = _number(first, stream)
    if number is None or number >= wanted:
        return int(first.seq or 0)
    last = await _message(streams, stream, subject=subject)
    if last is None or (_number(last, stream) or 0) < wanted:
        return None
    # The answer is ``high`` or a sequence in (low, limit), not looked at yet.
    low, high = int(first.seq or 0), int(last.seq or 0)
    limit = high
    while limit - low > 1:
        middle = (low + limit) // 2
        found = await _message(streams, stream, seq=middle, subject=subject, next=True)
        if found is None:
            return high  # trimmed meanwhile: start late rather than never
        if (_number(found, stream) or 0) >= wanted:
            high, limit = min(high, int(found.seq or 0)), middle  # none in [middle, found)
        else:
            low = int(found.seq or 0)  # at or past middle
    return high


def _number(msg: RawStreamMsg, stream: TopicStream) -> int | None:
    """The topic number ``stream`` gave ``msg`` (None: it did not number it)."""
    found = msg.headers or {}
    seq = found.get(pigeon_headers.SEQ, "")
    if found.get(pigeon_headers.SOURCE) != stream.name or not seq.isdigit() or len(seq) > 19:
        return None
    return int(seq)


async def _message(streams: TopicStreams, stream: TopicStream, **where: Any) -> RawStreamMsg | None:
    """The message ``get_msg(**where)`` finds, or None."""
    try:
        with map_exceptions(f"read stream {stream.name}", timeout=streams.options.ack_timeout):
            msg: RawStreamMsg = await streams.js.get_msg(stream.name, **where)
    except PigeonError as exc:
        if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
            return None
        raise
    return msg


# -- last=N (Rule 3) ---------------------------------------------------------


async def _nth_last(streams: TopicStreams, stream: TopicStream, pattern: str, n: int) -> int | None:
    """The sequence of the ``n``-th last message on ``pattern``; None if it
    has ``n`` or fewer (start at the first)."""
    subject = stream.subject_of(pattern)
    last = await _message(streams, stream, subject=subject)
    first = await _message(streams, stream, seq=1, subject=subject, next=True)
    if last is None or first is None:
        return None
    low, guess = int(first.seq or 0), int(last.seq or 0) - n + 1
    if guess <= low:
        return None
    if await _pending_from(streams, stream, pattern, guess) >= n:
        return guess  # n sequences, every one on the filter
    if await _pending_from(streams, stream, pattern, low) <= n:
        return None
    # count(low) > n > count(high): the answer is the largest sequence
    # from which n are still counted, in [low, high).
    high = guess
    while high - low > 1:
        middle = (low + high) // 2
        if await _pending_from(streams, stream, pattern, middle) >= n:
            low = middle
        else:
            high = middle
    return low


async def _pending_from(streams: TopicStreams, stream: TopicStream, pattern: str, seq: int) -> int:
    """How many messages on ``pattern`` the stream holds from ``seq`` on."""
    timeout = streams.options.ack_timeout
    config = ConsumerConfig(
        filter_subject=stream.subject_of(pattern),
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=seq,
        inactive_threshold=max(5.0, 2 * timeout),  # gone by itself if the delete is lost
    )
    streams.counts["position_probes"] += 1
    what = f"count the messages of {pattern!r}"
    with map_exceptions(what, timeout=timeout):
        info = await streams.js.add_consumer(stream.name, config)
    try:
        with map_exceptions(what, timeout=timeout):
            await streams.js.delete_consumer(stream.name, info.name)
    except PigeonError as exc:
        log.debug("deleting a probe consumer failed: %s", exc)
    return int(info.num_pending or 0)
