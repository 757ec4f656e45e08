"""Where a replay starts in a retained pattern's stream.

Rule 1: ``from_seq`` is a JetStream stream sequence: the position of a
message in its retained pattern's stream, counted across that pattern's
topics (a delivered retained message carries it in ``STREAM_SEQ``). It is
not the publisher's per-topic number, which stays in ``SEQ`` for gap
detection. It becomes BY_START_SEQUENCE.
Rule 2: ``from_seq`` is trimmed when it lies below the first message the
subscription's filter still has and the stream lost messages between the
two (it starts past ``from_seq``, or deleted one in between):
``ReplayTrimmed`` then names that first message's sequence. This is
conservative: messages of another topic of the same stream trimmed in that
range count too, and starting at the named sequence then misses nothing.
Rule 3: ``last=N`` starts at the N-th last message matching the filter,
found by counting (``num_pending`` of a probe consumer, deleted at once):
first at ``last sequence - N + 1`` (right when every sequence there is on
the filter, as in a stream of one topic), else by bisection. Fewer than N
messages: from the first.
Rule 4: ``from_time`` is BY_START_TIME, ``last_per_subject``
LAST_PER_SUBJECT, and no start (a durable subscription) NEW.
"""

from __future__ import annotations

import datetime
import logging
from typing import Any

import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ..._core.topics import StartAt
from ...errors import PigeonError, ReplayTrimmed
from .errors import map_exceptions
from .history import API, TopicStream, TopicStreams

log = logging.getLogger("pigeon.nats")


async def start_config(
    streams: TopicStreams, stream: TopicStream, pattern: str, start: StartAt
) -> dict[str, Any]:
    """The ConsumerConfig fields placing a new consumer of ``pattern`` at ``start``.

    Raises:
        ReplayTrimmed: ``from_seq`` is trimmed (Rule 2).
        TransportError, Timeout: JetStream did not answer.
    """
    if start.from_seq is not None:
        await _check_trimmed(streams, stream, pattern, start.from_seq)
        return {
            "deliver_policy": DeliverPolicy.BY_START_SEQUENCE,
            "opt_start_seq": start.from_seq,
        }
    if start.from_time is not None:
        when = datetime.datetime.fromtimestamp(start.from_time, tz=datetime.UTC)
        return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": when}
    if start.last_per_subject:
        return {"deliver_policy": DeliverPolicy.LAST_PER_SUBJECT}
    if start.last is not None:
        seq = await _nth_last(streams, stream, pattern, start.last)
        if seq is None:
            return {"deliver_policy": DeliverPolicy.ALL}
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": seq}
    return {"deliver_policy": DeliverPolicy.NEW}


def after(seq: int) -> dict[str, Any]:
    """The ConsumerConfig fields starting right after stream sequence ``seq``."""
    return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": seq + 1}


async def _check_trimmed(
    streams: TopicStreams, stream: TopicStream, pattern: str, asked: int
) -> None:
    info = await streams.api(
        f"look at stream {stream.name}",
        f"{API}.STREAM.INFO.{stream.name}",
        {"deleted_details": True},
    )
    state = info.get("state") or {}
    first_kept = await _first_seq(streams, stream, pattern)
    if first_kept is None:  # nothing kept on the filter: the next one to come
        first_kept = int(state.get("last_seq", 0)) + 1
    if asked >= first_kept:
        return
    lost = asked < int(state.get("first_seq", 0)) or any(
        asked <= int(d) < first_kept for d in state.get("deleted") or []
    )
    if lost:
        streams.counts["replays_trimmed"] += 1
        raise ReplayTrimmed(pattern, asked, first_kept)


async def _get(streams: TopicStreams, stream: TopicStream, **where: Any) -> int | None:
    """The stream sequence of the message ``get_msg(**where)`` finds, or None."""
    try:
        with map_exceptions(f"read stream {stream.name}", timeout=streams.options.ack_timeout):
            msg = await streams.js.get_msg(stream.name, **where)
    except PigeonError as exc:
        if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
            return None
        raise
    return int(msg.seq or 0) or None


async def _first_seq(streams: TopicStreams, stream: TopicStream, pattern: str) -> int | None:
    """The stream sequence of the first message on ``pattern`` still kept."""
    return await _get(streams, stream, seq=1, subject=streams.subject(pattern), next=True)


async def _nth_last(streams: TopicStreams, stream: TopicStream, pattern: str, n: int) -> int | None:
    """The sequence of the ``n``-th last message on ``pattern``; None if it
    has ``n`` or fewer (start at the first)."""
    last = await _get(streams, stream, subject=streams.subject(pattern))
    first = await _first_seq(streams, stream, pattern)
    if last is None or first is None:
        return None
    guess = last - n + 1
    if guess <= first:
        return None
    if await _pending_from(streams, stream, pattern, guess) >= n:
        return guess  # n sequences, every one on the filter
    if await _pending_from(streams, stream, pattern, first) <= n:
        return None
    # count(first) > n > count(guess): the answer is the largest sequence
    # from which n are still counted, in [first, guess).
    low, high = first, guess
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
        filter_subject=streams.subject(pattern),
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
