"""Publish-subscribe decisions, without I/O: topic names and patterns,
sequence numbers, gap detection, slow-subscriber policies and retained
history. Every transport's pub-sub adapter asks these.

Rule 1: a topic is dot-separated segments, like a queue name. A pattern is a
topic whose segments may be ``*`` (exactly one segment) or, last only, ``>``
(one or more segments). Anything else is a ValueError naming the rule.
Rule 2: every published message is numbered per topic, from 1, by one
source (the topic's host, or the publisher where nothing hosts the topic),
and carries topic, number and source in its headers (``headers.TOPIC``,
``SEQ``, ``SOURCE``).
Rule 3: a subscriber keeps the last number it saw per (source, topic). A
number at or below it is a repeat (a redelivery or a replay), counted,
never a gap. Where a topic host counts what each subscription drops, it
says so in every message (``headers.MISSED``: how many were dropped right
before this one), and that count is the gap: exact for a late joiner, for
any pattern, and for subscribers sharing a subscription. Otherwise
(numbered by the publisher) a number more than one past the last is a gap,
the numbers between ``missed``, and a source or topic seen for the first
time starts the count there.
Rule 4: a subscriber whose buffer is full gets its policy: ``block`` holds
the publisher back (its publish is refused with Backpressure until there is
room), ``drop-oldest`` drops the oldest message waiting for it (counted, and
seen by the subscriber as a gap), ``disconnect`` ends the subscription
(counted, and the subscriber is told why).
Rule 5: a retained topic keeps its latest messages, trimmed by count, bytes
and age; a subscriber may start from a number, from a time, from the last N
messages, or from the last message of each topic (the last-value cache).
The history it gets and the live messages after it are one sequence with no
gap: both are taken in the same step on the host. Asking for a number that
is already trimmed is ``ReplayTrimmed``, naming the first one retained.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from ..errors import ReplayTrimmed
from ..message import Message
from . import headers
from .limits import MAX_NAME


class SlowPolicy(StrEnum):
    """What a topic's host does when a subscriber's buffer is full (Rule 4)."""

    BLOCK = "block"
    DROP_OLDEST = "drop-oldest"
    DISCONNECT = "disconnect"


DEFAULT_BUFFER = 10_000  # messages waiting for one subscriber before its policy applies
MAX_BUFFER = 1_000_000


def _bad_segment(segment: str) -> bool:
    return not segment or any(c.isspace() or ord(c) < 0x20 or c in "*>\x7f" for c in segment)


def check_topic(topic: object) -> str:
    """``topic`` if it is a valid topic (Rule 1).

    Raises:
        TypeError: not a str.
        ValueError: names the rule it breaks.
    """
    if not isinstance(topic, str):
        raise TypeError(f"a topic must be a str, not {type(topic).__name__}")
    if not topic or len(topic) > MAX_NAME:
        raise ValueError(f"topic {topic!r}: a topic is 1 to {MAX_NAME} characters")
    for segment in topic.split("."):
        if segment in ("*", ">"):
            raise ValueError(
                f"topic {topic!r}: '*' and '>' are wildcards for subscriptions; "
                "publish to a full topic name"
            )
        if _bad_segment(segment):
            raise ValueError(
                f"topic {topic!r}: a topic is dot-separated segments, each non-empty, "
                "without spaces, control characters, '*' or '>'"
            )
    return topic


def check_pattern(pattern: object) -> str:
    """``pattern`` if it is a valid subscription pattern (Rule 1).

    Raises:
        TypeError: not a str.
        ValueError: names the rule it breaks.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"a topic pattern must be a str, not {type(pattern).__name__}")
    if not pattern or len(pattern) > MAX_NAME:
        raise ValueError(f"pattern {pattern!r}: a pattern is 1 to {MAX_NAME} characters")
    segments = pattern.split(".")
    for i, segment in enumerate(segments):
        if segment == ">" and i != len(segments) - 1:
            raise ValueError(f"pattern {pattern!r}: '>' may only be the last segment")
        if segment in ("*", ">"):
            continue
        if "*" in segment or ">" in segment:
            raise ValueError(
                f"pattern {pattern!r}: '*' and '>' must be whole segments "
                "('orders.*', not 'orders.a*')"
            )
        if _bad_segment(segment):
            raise ValueError(
                f"pattern {pattern!r}: a pattern is dot-separated segments, each non-empty "
                "and without spaces or control characters"
            )
    return pattern


def matches(pattern: str, topic: str) -> bool:
    """True if ``topic`` matches ``pattern`` (Rule 1)."""
    return covers(pattern, topic)


def covers(outer: str, inner: str) -> bool:
    """True if every topic matching pattern ``inner`` matches pattern
    ``outer`` (a topic is a pattern without wildcards: then it is
    ``matches``). A ``*`` in ``inner`` is covered only by ``*`` or ``>``, a
    ``>`` only by ``>``."""
    want, have = outer.split("."), inner.split(".")
    for i, segment in enumerate(want):
        if segment == ">":
            return len(have) > i
        if i >= len(have) or have[i] == ">":
            return False
        if segment != "*" and segment != have[i]:
            return False
    return len(want) == len(have)


def check_policy(policy: object) -> SlowPolicy:
    try:
        return SlowPolicy(str(policy) if isinstance(policy, str) else "")
    except ValueError:
        names = ", ".join(repr(p.value) for p in SlowPolicy)
        raise ValueError(f"slow-subscriber policy must be one of {names}, not {policy!r}") from None


def check_buffer(buffer: object) -> int:
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 1 <= buffer <= MAX_BUFFER:
        raise ValueError(f"buffer must be an int 1 to {MAX_BUFFER}, not {buffer!r}")
    return buffer


# -- numbering (Rule 2) ------------------------------------------------------


def stamp(
    message: Message, topic: str, seq: int, source: str, *, counts_drops: bool = False
) -> Message:
    """A copy of ``message`` carrying its topic, number and source; with
    ``counts_drops`` (a topic host that tells its drops, Rule 3), also
    ``headers.MISSED`` at 0."""
    marked = {
        **message.headers,
        headers.TOPIC: topic,
        headers.SEQ: str(seq),
        headers.SOURCE: source,
    }
    if counts_drops:
        marked[headers.MISSED] = "0"
    return Message(
        id=message.id,
        body=message.body,
        content_type=message.content_type,
        headers=marked,
        attempt=message.attempt,
        redelivered=message.redelivered,
        created_at=message.created_at,
        deadline=message.deadline,
    )


def numbered(message: Message) -> tuple[str, str, int] | None:
    """(source, topic, seq) of a published message, or None if it carries
    no valid numbering (a peer's message is checked, never trusted)."""
    h = message.headers
    topic, seq, source = h.get(headers.TOPIC), h.get(headers.SEQ), h.get(headers.SOURCE)
    if (
        topic is None
        or seq is None
        or source is None
        or not (seq.isascii() and seq.isdigit())
        or len(seq) > 19
    ):
        return None
    return source, topic, int(seq)


class Numbering:
    """Per-topic counters of one source (a host or a publisher).

    Bounded: past ``max_topics`` the least recently used counter is
    forgotten, and that topic starts again from 1, which subscribers read
    as a repeat, not a gap (Rule 3). ``forgotten`` counts those.
    """

    def __init__(self, source: str, max_topics: int = 100_000) -> None:
        self.source = source
        self.max_topics = max_topics
        self._last: OrderedDict[str, int] = OrderedDict()
        self.forgotten = 0

    def next(self, topic: str) -> int:
        seq = self._last.pop(topic, 0) + 1
        self._last[topic] = seq
        if len(self._last) > self.max_topics:
            self._last.popitem(last=False)
            self.forgotten += 1
        return seq

    def last(self, topic: str) -> int:
        return self._last.get(topic, 0)

    def set_last(self, topic: str, seq: int) -> None:
        """Continue ``topic`` after ``seq`` (numbers restored from history)."""
        self._last[topic] = max(seq, self._last.get(topic, 0))


# -- gap detection (Rule 3) --------------------------------------------------


@dataclass(slots=True)
class GapTracker:
    """What one subscriber saw, per (source, topic); bounded like Numbering."""

    max_keys: int = 100_000
    gaps: int = 0  # jumps seen
    missed: int = 0  # numbers skipped by those jumps
    repeats: int = 0  # numbers at or below the last seen
    unnumbered: int = 0  # messages without valid numbering
    _last: OrderedDict[tuple[str, str], int] = field(default_factory=OrderedDict)

    def observe(self, message: Message) -> int:
        """Take in one message; how many messages were missed right before it."""
        mark = numbered(message)
        if mark is None:
            self.unnumbered += 1
            return 0
        source, topic, seq = mark
        key = (source, topic)
        last = self._last.pop(key, None)
        if last is not None and seq <= last:
            self.repeats += 1
            self._last[key] = last
            return 0
        self._last[key] = seq
        if len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        told = message.headers.get(headers.MISSED)
        if told is not None:  # the host counted them for us (Rule 3)
            skipped = int(told) if told.isascii() and told.isdigit() and len(told) <= 18 else 0
        elif last is None or seq == last + 1:
            return 0
        else:
            skipped = seq - last - 1
        if not skipped:
            return 0
        self.gaps += 1
        self.missed += skipped
        return skipped

    def counts(self) -> dict[str, int]:
        return {
            "gaps": self.gaps,
            "missed": self.missed,
            "repeats": self.repeats,
            "unnumbered": self.unnumbered,
        }


# -- retained history (Rule 5) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history a retained topic keeps; None is no bound on that
    axis, but at least one must be set."""

    max_count: int | None = None
    max_bytes: int | None = None
    max_age: float | None = None

    def check(self) -> Retention:
        if self.max_count is None and self.max_bytes is None and self.max_age is None:
            raise ValueError("a retained topic needs max_count, max_bytes or max_age")
        for name in ("max_count", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**62
            ):
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        age = self.max_age
        if age is not None and (
            isinstance(age, bool) or not isinstance(age, (int, float)) or not 0 < age < math.inf
        ):
            raise ValueError(f"max_age must be a number of seconds above 0, not {age!r}")
        return self


@dataclass(frozen=True, slots=True)
class StartAt:
    """Where a subscription starts (Rule 5); all unset: new messages only.

    ``from_seq``: each matching topic from that number on. ``from_time``:
    messages published at or after that wall-clock time. ``last``: the last
    N messages on matching topics. ``last_per_subject``: the last message of
    each matching topic.
    """

    from_seq: int | None = None
    from_time: float | None = None
    last: int | None = None
    last_per_subject: bool = False

    @property
    def replays(self) -> bool:
        return (
            self.from_seq is not None
            or self.from_time is not None
            or self.last is not None
            or self.last_per_subject
        )

    def check(self) -> StartAt:
        chosen = [
            name
            for name, value in (
                ("from_seq", self.from_seq),
                ("from_time", self.from_time),
                ("last", self.last),
                ("last_per_subject", self.last_per_subject or None),
            )
            if value is not None
        ]
        if len(chosen) > 1:
            raise ValueError(
                f"give one of from_seq, from_time, last, last_per_subject, not {chosen}"
            )
        for name, value in (("from_seq", self.from_seq), ("last", self.last)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**62
            ):
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        when = self.from_time
        if when is not None and (
            isinstance(when, bool) or not isinstance(when, (int, float)) or not math.isfinite(when)
        ):
            raise ValueError(f"from_time must be a time in seconds since the epoch, not {when!r}")
        if not isinstance(self.last_per_subject, bool):
            raise ValueError(f"last_per_subject must be a bool, not {self.last_per_subject!r}")
        return self


@dataclass(slots=True)
class _Entry:
    order: int  # the host's publish order, across topics
    seq: int
    at: float
    size: int
    message: Message


class RetainedLog:
    """The retained history of the topics a host keeps (Rule 5).

    Args:
        max_topics: topics with history this host keeps; a new one past it is
            not retained (counted in ``refused_topics``).
    """

    def __init__(self, max_topics: int = 10_000) -> None:
        self.max_topics = max_topics
        self.rules: dict[str, Retention] = {}  # pattern or topic -> its retention
        self._logs: dict[str, deque[_Entry]] = {}
        self._bytes: dict[str, int] = {}
        self._first: dict[str, int] = {}  # first number ever published on a topic here
        self._order = 0
        self.trimmed = 0
        self.refused_topics = 0
        # Told the messages each trim drops (a durable host deletes them).
        self.on_trim: Callable[[list[Message]], None] | None = None

    def retain(self, pattern: str, retention: Retention) -> None:
        self.rules[check_pattern(pattern)] = retention.check()
        for topic in list(self._logs):
            if matches(pattern, topic):
                self._trim(topic, None)

    def restore(self, topic: str, seq: int, message: Message, at: float) -> None:
        """Take back a message kept before a restart, whatever the rules
        (they may not be declared yet): ``expire`` trims it by them later."""
        self._append(topic, seq, message, at)
        self._first[topic] = 1  # what came before it may have been trimmed

    def retention(self, topic: str) -> Retention | None:
        exact = self.rules.get(topic)
        if exact is not None:
            return exact
        for pattern, rule in self.rules.items():
            if matches(pattern, topic):
                return rule
        return None

    def add(self, topic: str, seq: int, message: Message, now: float) -> bool:
        """Keep ``message`` if its topic is retained; True if kept."""
        rule = self.retention(topic)
        if rule is None:
            return False
        log = self._logs.get(topic)
        if log is None:
            if len(self._logs) >= self.max_topics:
                self.refused_topics += 1
                return False
        self._append(topic, seq, message, now)
        self._trim(topic, now)
        return True

    def _append(self, topic: str, seq: int, message: Message, at: float) -> None:
        log = self._logs.get(topic)
        if log is None:
            log = self._logs[topic] = deque()
            self._bytes[topic] = 0
            self._first.setdefault(topic, seq)
        self._order += 1
        size = len(message.body) + sum(len(k) + len(v) for k, v in message.headers.items())
        log.append(_Entry(self._order, seq, at, size, message))
        self._bytes[topic] += size

    def last_seqs(self) -> dict[str, int]:
        """The last number kept of each topic (to go on from after a restart)."""
        return {topic: log[-1].seq for topic, log in self._logs.items() if log}

    def _trim(self, topic: str, now: float | None) -> None:
        rule = self.retention(topic)
        log = self._logs[topic]
        dropped: list[Message] = []
        if rule is None:
            # Kept as it is (history restored before its rule is declared
            # again), growing no more: add() takes nothing for it.
            return
        while log and (
            (rule.max_count is not None and len(log) > rule.max_count)
            or (rule.max_bytes is not None and self._bytes[topic] > rule.max_bytes and len(log) > 1)
            or (rule.max_age is not None and now is not None and log[0].at < now - rule.max_age)
        ):
            entry = log.popleft()
            self._bytes[topic] -= entry.size
            dropped.append(entry.message)
        self.trimmed += len(dropped)
        if dropped and self.on_trim is not None:
            self.on_trim(dropped)

    def expire(self, now: float) -> None:
        for topic in list(self._logs):
            self._trim(topic, now)

    def topics(self, pattern: str) -> list[str]:
        return [t for t in self._logs if matches(pattern, t)]

    def first_retained(self, topic: str) -> int | None:
        log = self._logs.get(topic)
        return log[0].seq if log else None

    def select(self, pattern: str, start: StartAt, now: float) -> list[Message]:
        """The history a subscription to ``pattern`` starting at ``start``
        gets, oldest first.

        Raises:
            ReplayTrimmed: ``from_seq`` asks for a number a matching topic
                had and no longer retains.
        """
        if not start.replays:
            return []
        self.expire(now)
        entries: list[_Entry] = []
        for topic in self.topics(pattern):
            log = self._logs[topic]
            if start.from_seq is not None:
                if log and start.from_seq < log[0].seq and start.from_seq >= self._first[topic]:
                    raise ReplayTrimmed(topic, start.from_seq, log[0].seq)
                entries.extend(e for e in log if e.seq >= start.from_seq)
            elif start.from_time is not None:
                entries.extend(e for e in log if e.at >= start.from_time)
            elif start.last_per_subject:
                if log:
                    entries.append(log[-1])
            else:
                entries.extend(log)
        entries.sort(key=lambda e: e.order)
        if start.last is not None:
            entries = entries[-start.last :]
        return [e.message for e in entries]

    def stats(self) -> dict[str, int]:
        return {
            "retained_topics": len(self._logs),
            "retained_messages": sum(len(log) for log in self._logs.values()),
            "retained_bytes": sum(self._bytes.values()),
            "trimmed": self.trimmed,
            "refused_topics": self.refused_topics,
        }
