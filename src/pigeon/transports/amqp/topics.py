"""Publish-subscribe on RabbitMQ: the names, binding keys and declaration
arguments (no I/O; see docs/transports-amqp.md, "Publish-subscribe").

Rule 1: every topic is published to one durable topic exchange,
``pigeon.topics``, with the topic as routing key. A topic is at most 255
bytes of UTF-8 there (AMQP's limit for a routing key).
Rule 2: a pattern becomes a binding key segment by segment: ``*`` stays
``*`` (one word); ``>`` (one or more segments) becomes ``#`` (zero or
more), so ``a.>`` also binds the topic ``a``; a literal ``#`` segment, which
AMQP would read as a wildcard, becomes ``*``. The subscriber matches every
delivery against the pigeon pattern again and drops (and counts, as
``filtered``) what the binding let through beyond it: those topics are not
pigeon-visible.
Rule 3: a subscription is one queue bound with that key. An ephemeral one
is ``pigeon.eph.<id>`` (classic, exclusive, auto-delete: gone with its
subscriber); a named one is ``pigeon.sub.<name>`` (the name escaped as
:func:`escape` says; durable, the
transport's queue type), shared by every subscriber of that name, which
compete for its messages.
Rule 4: a subscription queue holds ``buffer`` messages (``x-max-length``);
its slow-subscriber policy is the overflow: ``block`` →
``reject-publish`` (the publisher's confirm is a nack: Backpressure);
``drop-oldest`` and ``disconnect`` → ``drop-head``, the dropped message
dead-lettered into ``<queue>.overflow``, which the subscriber reads to
count the drops (and, for ``disconnect``, to end the subscription).
Rule 5: a retained pattern is a stream queue ``pigeon.retained.<pattern>``
(escaped: ``a.>`` is ``pigeon.retained.a.:rest``) bound with the pattern's
key, trimmed by bytes and age. A stream cannot be trimmed by count:
``max_count`` is a ConfigurationError.
"""

from __future__ import annotations

import math
from typing import Any

from ..._core.ledger import dead_letter_queue
from ..._core.topics import Retention, SlowPolicy, check_pattern, check_topic, covers
from ...errors import ConfigurationError
from ..base import SubscribeOptions

TOPIC_EXCHANGE = "pigeon.topics"
BROADCAST_EXCHANGE = "pigeon.all"
NAMED_PREFIX = "pigeon.sub."
EPHEMERAL_PREFIX = "pigeon.eph."
RETAINED_PREFIX = "pigeon.retained."
BROADCAST_PREFIX = "pigeon.all."
OVERFLOW_SUFFIX = ".overflow"
# Dead letters of ephemeral subscriptions (their own queues die with them).
EPHEMERAL_DEAD = "pigeon.topics.dead"
# The AMQP ``type`` of the markers a replay writes into a stream to find its
# end; every pigeon reader skips them.
MARKER_TYPE = "pigeon.replay-marker"

MAX_KEY = 255  # bytes in an AMQP routing key, binding key or queue name
# Room kept after a named subscription's queue name for its ".delay.<ms>",
# ".overflow" and ".dead" queues.
SUFFIX_ROOM = 32

# Stream segments: retention trims whole segments, so they are cut small
# enough for the bounds to bite (RabbitMQ's default is 500 MB).
MIN_SEGMENT = 4096
MAX_SEGMENT = 500_000_000
AGE_ONLY_SEGMENT = 1_048_576


def _bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _checked(check: Any, value: object) -> str:
    try:
        result: str = check(value)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(str(exc)) from None
    return result


def routing_key(topic: object) -> str:
    """The routing key of ``topic`` (Rule 1).

    Raises:
        ConfigurationError: not a valid topic, or over 255 bytes.
    """
    key = _checked(check_topic, topic)
    if _bytes(key) > MAX_KEY:
        raise ConfigurationError(
            f"topic {key[:40]!r}… is {_bytes(key)} bytes of UTF-8; RabbitMQ routing keys are "
            f"at most {MAX_KEY}: use a shorter topic"
        )
    return key


def binding_key(pattern: object) -> str:
    """The binding key of ``pattern`` (Rule 2).

    Raises:
        ConfigurationError: not a valid pattern, or over 255 bytes.
    """
    text = _checked(check_pattern, pattern)
    words = ["#" if s == ">" else "*" if s == "#" else s for s in text.split(".")]
    key = ".".join(words)
    if _bytes(key) > MAX_KEY:
        raise ConfigurationError(
            f"pattern {text[:40]!r}… is {_bytes(key)} bytes of UTF-8; RabbitMQ binding keys "
            f"are at most {MAX_KEY}: use a shorter pattern"
        )
    return key


_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@#,/+")
_ESCAPES = {"*": ":any", ">": ":rest"}


def escape(text: str) -> str:
    """``text`` as the part of a queue name (AMQP clients allow only ASCII
    letters, digits and ``-_.:@#,/+`` and space there): ``*`` is ``:any``,
    ``>`` is ``:rest``, any other character outside that set (``:``
    included) is ``:`` and its code point in six hex digits. One-to-one, so
    two patterns or names never share a queue."""
    return "".join(c if c in _PLAIN else _ESCAPES.get(c) or f":{ord(c):06x}" for c in text)


def named_queue(name: object) -> str:
    """The queue of the named subscription ``name`` (Rule 3).

    Raises:
        ConfigurationError: not a non-empty str, or too long for its queues.
    """
    if not isinstance(name, str) or not name or any(c.isspace() or ord(c) < 0x20 for c in name):
        raise ConfigurationError(
            f"a subscription name is a non-empty str without spaces, not {name!r}"
        )
    queue = NAMED_PREFIX + escape(name)
    if _bytes(queue) > MAX_KEY - SUFFIX_ROOM:
        raise ConfigurationError(
            f"subscription name {name[:40]!r}… is too long: its queue {NAMED_PREFIX}<name> must "
            f"leave room for its delay, overflow and dead-letter queues "
            f"(at most {MAX_KEY - SUFFIX_ROOM - len(NAMED_PREFIX)} bytes)"
        )
    return queue


def ephemeral_queue(session: str, number: int) -> str:
    """The queue of this transport's ``number``-th ephemeral subscription."""
    return f"{EPHEMERAL_PREFIX}{session}.{number}"


def overflow_queue(queue: str) -> str:
    return queue + OVERFLOW_SUFFIX


def overflows(policy: SlowPolicy) -> bool:
    """True if the policy drops the oldest (and so needs an overflow queue)."""
    return policy is not SlowPolicy.BLOCK


def subscription_arguments(
    queue: str, options: SubscribeOptions, queue_type: str
) -> dict[str, Any]:
    """The declaration arguments of a subscription queue (Rules 3 and 4)."""
    arguments: dict[str, Any] = {"x-queue-type": queue_type, "x-max-length": options.buffer}
    if overflows(options.policy):
        arguments["x-overflow"] = "drop-head"
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = overflow_queue(queue)
    else:
        arguments["x-overflow"] = "reject-publish"
        if queue_type == "quorum":
            # What the broker drops itself (4.x's delivery limit) is kept,
            # as for a work queue.
            arguments["x-dead-letter-exchange"] = ""
            arguments["x-dead-letter-routing-key"] = dead_letter_queue(queue)
    return arguments


def overflow_arguments(buffer: int, queue_type: str) -> dict[str, Any]:
    """An overflow queue keeps the last ``buffer`` drops (it only counts them)."""
    return {"x-queue-type": queue_type, "x-max-length": buffer, "x-overflow": "drop-head"}


# -- retained history (Rule 5) -----------------------------------------------


def stream_name(pattern: str) -> str:
    """The stream of the retained ``pattern`` (escaped: ``a.>`` is
    ``pigeon.retained.a.:rest``)."""
    return RETAINED_PREFIX + escape(pattern)


def stream_arguments(pattern: str, retention: Retention) -> dict[str, Any]:
    """The declaration arguments of the stream keeping ``pattern`` (Rule 5).

    Raises:
        ConfigurationError: ``max_count`` is set, or the retention is invalid.
    """
    try:
        retention.check()
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if retention.max_count is not None:
        raise ConfigurationError(
            f"retain({pattern!r}): RabbitMQ streams are trimmed by bytes and age, not by count; "
            "give max_bytes and/or max_age instead of max_count (or use NATS or a pigeon node, "
            "which keep a count)"
        )
    if _bytes(stream_name(pattern)) > MAX_KEY:
        raise ConfigurationError(f"retain({pattern!r}): the pattern is too long for a stream name")
    arguments: dict[str, Any] = {"x-queue-type": "stream"}
    if retention.max_bytes is not None:
        arguments["x-max-length-bytes"] = retention.max_bytes
        segment = retention.max_bytes // 4
    else:
        segment = AGE_ONLY_SEGMENT
    if retention.max_age is not None:
        arguments["x-max-age"] = f"{max(1, math.ceil(retention.max_age))}s"
    arguments["x-stream-max-segment-size-bytes"] = min(MAX_SEGMENT, max(MIN_SEGMENT, segment))
    return arguments


def retained_candidates(pattern: str) -> list[str]:
    """Retained patterns a subscription to ``pattern`` looks for when this
    connection did not retain one itself: the pattern, then each shorter
    prefix followed by ``>`` (``a.b.c``: ``a.b.c``, ``a.b.>``, ``a.>``, ``>``)."""
    segments = pattern.split(".")
    found = [pattern]
    for end in range(len(segments) - 1, -1, -1):
        candidate = ".".join([*segments[:end], ">"])
        if candidate not in found and covers(candidate, pattern):
            found.append(candidate)
    return found
