"""pigeon._core.topics: topic and pattern rules, numbering, gap tracking and
retained history, without I/O."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon._core import headers
from pigeon._core.limits import MAX_NAME
from pigeon._core.topics import (
    DEFAULT_BUFFER,
    MAX_BUFFER,
    GapTracker,
    Numbering,
    RetainedLog,
    Retention,
    SlowPolicy,
    StartAt,
    check_buffer,
    check_pattern,
    check_policy,
    check_topic,
    matches,
    numbered,
    stamp,
)
from pigeon.errors import ReplayTrimmed
from pigeon.message import Message, make_message

pytestmark = pytest.mark.timeout(60)


def msg(
    topic: str = "t", seq: int | str | None = None, source: str = "s", body: bytes = b"x"
) -> Message:
    """A message numbered ``seq`` in ``topic`` by ``source`` (unnumbered if None)."""
    message = make_message(body)
    if seq is None:
        return message
    if isinstance(seq, int):
        return stamp(message, topic, seq, source)
    marked = {headers.TOPIC: topic, headers.SEQ: seq, headers.SOURCE: source}
    return Message(id=message.id, body=message.body, headers=marked)


# -- Rule 1: topics and patterns -----------------------------------------------


@pytest.mark.parametrize("topic", ["a", "orders.eu.new", "a-b_c.D9", "é.ü", "x" * MAX_NAME])
def test_valid_topics(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    ("topic", "rule"),
    [
        ("", "1 to 255 characters"),
        ("x" * (MAX_NAME + 1), "1 to 255 characters"),
        ("a..b", "dot-separated segments, each non-empty"),
        (".a", "dot-separated segments, each non-empty"),
        ("a.", "dot-separated segments, each non-empty"),
        ("a b", "without spaces"),
        ("a\tb", "without spaces"),
        ("a\x01b", "control characters"),
        ("a\x7fb", "control characters"),
        ("a*b", "'*' or '>'"),
        ("a.b>", "'*' or '>'"),
        ("a.*", "wildcards for subscriptions"),
        ("*", "wildcards for subscriptions"),
        ("a.>", "wildcards for subscriptions"),
    ],
)
def test_invalid_topics_name_the_rule(topic: str, rule: str) -> None:
    with pytest.raises(ValueError, match="topic") as info:
        check_topic(topic)
    assert rule in str(info.value)
    assert repr(topic) in str(info.value)


@pytest.mark.parametrize("bad", [None, 3, b"a.b", ["a"]])
def test_a_topic_must_be_a_str(bad: object) -> None:
    with pytest.raises(TypeError, match="must be a str"):
        check_topic(bad)
    with pytest.raises(TypeError, match="must be a str"):
        check_pattern(bad)


@pytest.mark.parametrize("pattern", ["a", "*", ">", "a.*", "a.>", "*.b.*", "a.*.>", "*.>"])
def test_valid_patterns(pattern: str) -> None:
    assert check_pattern(pattern) == pattern


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        ("", "1 to 255 characters"),
        ("a.>.b", "'>' may only be the last segment"),
        (">.a", "'>' may only be the last segment"),
        ("a*", "must be whole segments"),
        ("a.b*.c", "must be whole segments"),
        ("a.>>", "must be whole segments"),
        ("a..b", "each non-empty"),
        ("a.", "each non-empty"),
        ("a b.*", "without spaces or control characters"),
        ("a.\x00", "without spaces or control characters"),
    ],
)
def test_invalid_patterns_name_the_rule(pattern: str, rule: str) -> None:
    with pytest.raises(ValueError, match="pattern") as info:
        check_pattern(pattern)
    assert rule in str(info.value)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a", "a.b", False),
        ("a.b", "a", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.*", "a", False),  # '*' is exactly one segment
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("*.b", "a.b", True),
        (">", "a", True),
        (">", "a.b.c", True),
        ("a.>", "a", False),  # '>' needs at least one segment
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "ab.c", False),  # segments, not prefixes
        ("a.b.>", "a.b", False),
        ("a.b.>", "a.c.d", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.*.>", "a.b", False),
        ("a.*.>", "a.b.c.d", True),
    ],
)
def test_matches(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


def test_policy_and_buffer() -> None:
    assert check_policy("block") is SlowPolicy.BLOCK
    assert check_policy("drop-oldest") is SlowPolicy.DROP_OLDEST
    assert check_policy(SlowPolicy.DISCONNECT) is SlowPolicy.DISCONNECT
    with pytest.raises(ValueError, match="one of 'block', 'drop-oldest', 'disconnect'"):
        check_policy("drop_oldest")
    assert DEFAULT_BUFFER == 10_000
    assert check_buffer(1) == 1 and check_buffer(MAX_BUFFER) == MAX_BUFFER
    for bad in (0, -1, MAX_BUFFER + 1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match="buffer must be an int"):
            check_buffer(bad)


# -- Rule 2: numbering ------------------------------------------------------------


def test_stamp_marks_a_copy_and_numbered_reads_it_back() -> None:
    original = make_message("hi", headers={"trace": "1"})
    marked = stamp(original, "a.b", 7, "src-1")
    assert numbered(marked) == ("src-1", "a.b", 7)
    assert marked.headers["trace"] == "1"
    assert (marked.id, marked.body) == (original.id, original.body)
    assert headers.SEQ not in original.headers  # the original is untouched
    assert numbered(original) is None


@pytest.mark.parametrize("seq", ["", "x", "-1", "1.5", " 1", "1" * 20])
def test_numbered_refuses_bad_numbers(seq: str) -> None:
    assert numbered(msg(seq=seq)) is None


def test_numbered_needs_all_three_headers() -> None:
    for missing in (headers.TOPIC, headers.SEQ, headers.SOURCE):
        marked = dict(msg(seq=3).headers)
        del marked[missing]
        assert numbered(Message(id="i", body=b"", headers=marked)) is None


def test_numbered_refuses_unicode_digits() -> None:
    # str.isdigit() is True for '²', which int() refuses: a peer's header
    # must not make it raise.
    assert numbered(msg(seq="²")) is None


def test_numbering_counts_per_topic_from_one() -> None:
    numbering = Numbering("me")
    assert [numbering.next("a") for _ in range(3)] == [1, 2, 3]
    assert numbering.next("b") == 1
    assert (numbering.last("a"), numbering.last("b"), numbering.last("c")) == (3, 1, 0)
    numbering.set_last("a", 10)
    assert numbering.next("a") == 11
    numbering.set_last("a", 5)  # never backwards
    assert numbering.next("a") == 12


def test_numbering_is_bounded_and_forgets_the_least_recent() -> None:
    numbering = Numbering("me", max_topics=2)
    numbering.next("a")
    numbering.next("b")
    numbering.next("a")  # a is now the most recent
    numbering.next("c")  # b goes
    assert numbering.forgotten == 1
    assert numbering.next("a") == 3
    assert numbering.next("b") == 1  # starts again: subscribers see a repeat, not a gap
    assert numbering.forgotten == 2
    assert len(numbering._last) == 2


# -- Rule 3: gaps ------------------------------------------------------------------


def test_gap_tracker_counts_gaps_and_missed() -> None:
    tracker = GapTracker()
    assert [tracker.observe(msg(seq=s)) for s in (1, 2, 5, 6, 10)] == [0, 0, 2, 0, 3]
    assert tracker.counts() == {"gaps": 2, "missed": 5, "repeats": 0, "unnumbered": 0}


def test_a_late_joiner_missed_nothing() -> None:
    tracker = GapTracker()
    assert tracker.observe(msg(seq=500)) == 0
    assert tracker.observe(msg(seq=501)) == 0
    assert tracker.counts()["missed"] == 0


def test_repeats_are_counted_never_gaps() -> None:
    tracker = GapTracker()
    for s in (1, 2, 3, 2, 3, 1, 4):
        tracker.observe(msg(seq=s))
    assert tracker.counts() == {"gaps": 0, "missed": 0, "repeats": 3, "unnumbered": 0}
    assert tracker.observe(msg(seq=6)) == 1  # the count went on from 4, not from a repeat


def test_each_source_and_topic_counts_apart() -> None:
    tracker = GapTracker()
    tracker.observe(msg("a", 1, "s1"))
    tracker.observe(msg("b", 1, "s1"))
    tracker.observe(msg("a", 1, "s2"))  # another source's 1: not a repeat
    tracker.observe(msg("a", 2, "s1"))
    tracker.observe(msg("b", 3, "s1"))
    tracker.observe(msg("a", 4, "s2"))
    assert tracker.counts() == {"gaps": 2, "missed": 3, "repeats": 0, "unnumbered": 0}


def test_unnumbered_messages_are_counted_apart() -> None:
    tracker = GapTracker()
    assert tracker.observe(msg()) == 0
    assert tracker.observe(msg(seq="nope")) == 0
    assert tracker.counts() == {"gaps": 0, "missed": 0, "repeats": 0, "unnumbered": 2}


def test_gap_tracker_is_bounded() -> None:
    tracker = GapTracker(max_keys=2)
    tracker.observe(msg("a", 1))
    tracker.observe(msg("b", 1))
    tracker.observe(msg("a", 2))  # a is the most recent
    tracker.observe(msg("c", 1))  # b is forgotten
    assert len(tracker._last) == 2
    assert tracker.observe(msg("b", 9)) == 0  # starts again there, as a late joiner
    assert tracker.observe(msg("a", 5)) == 0  # a was forgotten in turn (b came in)
    assert tracker.observe(msg("b", 11)) == 1
    assert tracker.counts()["missed"] == 1


@st.composite
def numbered_streams(draw: st.DrawFn) -> tuple[list[tuple[str, int, bool]], int, int]:
    """Several numbered streams (one per key), each with some numbers dropped
    and some delivered ones delivered again later, interleaved in any order
    that keeps each stream's order. Returns the deliveries (key, seq, is a
    repeat) and the expected missed and repeats."""
    keys = draw(
        st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4, unique=True)
    )
    queues: list[list[tuple[str, int, bool]]] = []
    missed = repeats = 0
    for key in keys:
        n = draw(st.integers(1, 60))
        kept = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        delivered = [seq for seq, keep in zip(range(1, n + 1), kept, strict=True) if keep]
        if delivered:
            # Drops before the first delivered are no gap (Rule 3: a late joiner
            # missed nothing); drops after the last are not seen yet.
            missed += delivered[-1] - delivered[0] + 1 - len(delivered)
        stream: list[tuple[str, int, bool]] = []
        for i, seq in enumerate(delivered):
            stream.append((key, seq, False))
            if i and draw(st.integers(0, 4)) == 0:  # a redelivery of an earlier one
                stream.append((key, draw(st.sampled_from(delivered[: i + 1])), True))
                repeats += 1
        queues.append(stream)
    merged: list[tuple[str, int, bool]] = []
    while any(queues):
        pick = draw(st.sampled_from([q for q in queues if q]))
        merged.append(pick.pop(0))
    return merged, missed, repeats


@given(numbered_streams())
def test_missed_is_exactly_what_was_dropped(
    case: tuple[list[tuple[str, int, bool]], int, int],
) -> None:
    deliveries, missed, repeats = case
    tracker = GapTracker()
    seen = 0
    for key, seq, _repeat in deliveries:
        seen += tracker.observe(msg(key, seq))
    assert tracker.missed == missed == seen
    assert tracker.repeats == repeats
    assert tracker.unnumbered == 0


@given(st.lists(st.booleans(), min_size=1, max_size=200))
def test_missed_between_first_and_last_received(kept: list[bool]) -> None:
    """One stream 1..n with any numbers dropped: missed is what was dropped,
    but for the drops before the first one received (Rule 3)."""
    tracker = GapTracker()
    received = [seq for seq, keep in enumerate(kept, 1) if keep]
    for seq in received:
        tracker.observe(msg(seq=seq))
    dropped = len(kept) - len(received)
    leading = received[0] - 1 if received else len(kept)
    trailing = len(kept) - received[-1] if received else 0
    assert tracker.missed == dropped - leading - trailing
    assert tracker.gaps == sum(1 for a, b in zip(received, received[1:], strict=False) if b > a + 1)


# -- Rule 5: retained history ---------------------------------------------------


def test_retention_check() -> None:
    assert Retention(max_count=1).check() == Retention(max_count=1)
    assert Retention(max_bytes=10, max_age=0.5).check().max_age == 0.5
    with pytest.raises(ValueError, match="needs max_count, max_bytes or max_age"):
        Retention().check()
    for bad in (0, -1, True, 1.5, "3", 2**63):
        with pytest.raises(ValueError, match="max_count must be an int >= 1"):
            Retention(max_count=bad).check()  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_bytes must be an int >= 1"):
            Retention(max_bytes=bad).check()  # type: ignore[arg-type]
    for bad_age in (0, -1.0, math.inf, math.nan, True, "1"):
        with pytest.raises(ValueError, match="max_age must be a number of seconds above 0"):
            Retention(max_age=bad_age).check()  # type: ignore[arg-type]


def test_start_at_check() -> None:
    assert not StartAt().check().replays
    assert StartAt(from_seq=1).check().replays
    assert StartAt(last_per_subject=True).check().replays
    assert StartAt(from_time=0.0).check().replays  # the epoch is a time, not "unset"
    with pytest.raises(ValueError, match="give one of") as info:
        StartAt(from_seq=1, last=2).check()
    assert "'from_seq'" in str(info.value) and "'last'" in str(info.value)
    with pytest.raises(ValueError, match="give one of"):
        StartAt(from_time=1.0, last_per_subject=True).check()
    for name in ("from_seq", "last"):
        for bad in (0, -3, True, 1.0, 2**63):
            with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
                StartAt(**{name: bad}).check()  # type: ignore[arg-type]
    for when in (math.nan, math.inf, True, "now"):
        with pytest.raises(ValueError, match="from_time must be a time"):
            StartAt(from_time=when).check()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="last_per_subject must be a bool"):
        StartAt(last_per_subject=1).check()  # type: ignore[arg-type]


def fill(log: RetainedLog, topic: str, seqs: range, at: float = 0.0, step: float = 0.0) -> None:
    for i, seq in enumerate(seqs):
        log.add(topic, seq, msg(topic, seq), at + i * step)


def seqs_of(messages: list[Message]) -> list[tuple[str, int]]:
    return [(m.headers[headers.TOPIC], int(m.headers[headers.SEQ])) for m in messages]


def test_only_retained_topics_are_kept() -> None:
    log = RetainedLog()
    log.retain("a.>", Retention(max_count=10))
    fill(log, "a.x", range(1, 4))
    fill(log, "b.x", range(1, 4))
    fill(log, "a", range(1, 4))  # 'a.>' needs one more segment
    assert log.topics(">") == ["a.x"]
    assert log.stats()["retained_messages"] == 3


def test_exact_topic_rule_wins_over_a_pattern() -> None:
    log = RetainedLog()
    log.retain("a.>", Retention(max_count=10))
    log.retain("a.x", Retention(max_count=2))
    assert log.retention("a.x") == Retention(max_count=2)
    assert log.retention("a.y") == Retention(max_count=10)
    assert log.retention("b") is None


def test_trim_by_count() -> None:
    log = RetainedLog()
    log.retain("t", Retention(max_count=3))
    fill(log, "t", range(1, 6))
    assert log.first_retained("t") == 3
    assert seqs_of(log.select("t", StartAt(last=10), 0.0)) == [("t", 3), ("t", 4), ("t", 5)]
    assert log.stats()["trimmed"] == 2


def test_trim_by_bytes_keeps_at_least_the_last() -> None:
    log = RetainedLog()
    one = msg("t", 1, body=b"x" * 100)
    size = len(one.body) + sum(len(k) + len(v) for k, v in one.headers.items())
    log.retain("t", Retention(max_bytes=2 * size))
    for seq in range(1, 5):
        log.add("t", seq, msg("t", seq, body=b"x" * 100), 0.0)
    assert log.first_retained("t") == 3
    assert log.stats()["retained_bytes"] == 2 * size
    log.add("t", 5, msg("t", 5, body=b"y" * 10 * size), 0.0)  # alone over the bound
    assert log.first_retained("t") == 5
    assert log.stats()["retained_messages"] == 1


def test_trim_by_age_on_add_expire_and_select() -> None:
    log = RetainedLog()
    log.retain("t", Retention(max_age=10.0))
    fill(log, "t", range(1, 6), at=100.0, step=1.0)  # at 100..104
    assert log.first_retained("t") == 1
    log.add("t", 6, msg("t", 6), 112.0)  # 1 (100) and 2 (101) are older than 102
    assert log.first_retained("t") == 3
    log.expire(113.0)  # 103 is not older than 103: kept
    assert log.first_retained("t") == 4
    assert seqs_of(log.select("t", StartAt(last=100), 114.0)) == [("t", 5), ("t", 6)]


def test_a_new_rule_trims_what_is_kept() -> None:
    log = RetainedLog()
    log.retain("t", Retention(max_count=10))
    fill(log, "t", range(1, 8))
    log.retain("t", Retention(max_count=2))
    assert log.first_retained("t") == 6


def test_select_each_start() -> None:
    log = RetainedLog()
    log.retain("p.>", Retention(max_count=5))
    for seq in range(1, 9):  # p.a 4..8 kept, published at 1..8
        log.add("p.a", seq, msg("p.a", seq), float(seq))
        if seq <= 3:  # p.b 1..3, published between p.a's 1..3 and 4
            log.add("p.b", seq, msg("p.b", seq), float(seq) + 0.5)
    everything = [("p.b", 1), ("p.b", 2), ("p.b", 3)] + [("p.a", s) for s in range(4, 9)]
    # Replays come oldest first, in the order they were published across topics.
    assert (
        seqs_of(log.select("p.>", StartAt(last=100), 9.0))
        == [
            ("p.b", 1),
            ("p.b", 2),
            ("p.b", 3),
            ("p.a", 4),
            ("p.a", 5),
            ("p.a", 6),
            ("p.a", 7),
            ("p.a", 8),
        ]
        == everything
    )
    assert seqs_of(log.select("p.a", StartAt(last=3), 9.0)) == [("p.a", 6), ("p.a", 7), ("p.a", 8)]
    assert seqs_of(log.select("p.>", StartAt(last=4), 9.0)) == everything[-4:]
    assert seqs_of(log.select("p.a", StartAt(from_seq=6), 9.0)) == [
        ("p.a", 6),
        ("p.a", 7),
        ("p.a", 8),
    ]
    assert seqs_of(log.select("p.a", StartAt(from_seq=9), 9.0)) == []  # the next one, live
    assert seqs_of(log.select("p.>", StartAt(from_seq=4), 9.0)) == [("p.a", s) for s in range(4, 9)]
    assert seqs_of(log.select("p.>", StartAt(from_time=6.0), 9.0)) == [
        ("p.a", 6),
        ("p.a", 7),
        ("p.a", 8),
    ]
    assert seqs_of(log.select("p.>", StartAt(last_per_subject=True), 9.0)) == [
        ("p.b", 3),
        ("p.a", 8),
    ]
    assert log.select("p.>", StartAt(), 9.0) == []  # new messages only
    assert log.select("q.>", StartAt(last=5), 9.0) == []


def test_replay_trimmed_names_the_first_retained() -> None:
    log = RetainedLog()
    log.retain("p.>", Retention(max_count=5))
    fill(log, "p.a", range(1, 9))
    with pytest.raises(ReplayTrimmed) as info:
        log.select("p.>", StartAt(from_seq=1), 0.0)
    assert (info.value.topic, info.value.asked, info.value.first_retained) == ("p.a", 1, 4)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ReplayTrimmed):
        log.select("p.a", StartAt(from_seq=3), 0.0)
    assert seqs_of(log.select("p.a", StartAt(from_seq=4), 0.0))[0] == ("p.a", 4)


def test_numbers_before_this_hosts_history_are_not_trimmed() -> None:
    """A topic whose first number here was 50 (numbers restored, or history
    turned on later) never had 1..49 here: asking for them replays what there is."""
    log = RetainedLog()
    log.retain("t", Retention(max_count=5))
    fill(log, "t", range(50, 53))
    assert seqs_of(log.select("t", StartAt(from_seq=1), 0.0)) == [("t", 50), ("t", 51), ("t", 52)]


def test_topics_past_the_bound_are_refused() -> None:
    log = RetainedLog(max_topics=2)
    log.retain(">", Retention(max_count=5))
    for topic in ("a", "b", "c"):
        fill(log, topic, range(1, 3))
    assert sorted(log.topics(">")) == ["a", "b"]
    assert log.first_retained("c") is None
    stats = log.stats()
    assert (stats["retained_topics"], stats["retained_messages"]) == (2, 4)
    assert (stats["trimmed"], stats["refused_topics"]) == (0, 2)  # both of c's messages
