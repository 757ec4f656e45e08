"""Queue and request policy shared by every transport (``pigeon._core.policy``)."""

from __future__ import annotations

import pytest

import pigeon
from pigeon._core import headers, policy
from pigeon._core.policy import RefusalReason, ReplyErrorKind


@pytest.mark.parametrize(
    ("attempt", "limit", "over"),
    [(1, 0, False), (99, 0, False), (1, -1, False), (3, 3, False), (4, 3, True), (2, 1, True)],
)
def test_the_attempt_limit(attempt: int, limit: int, over: bool) -> None:
    assert policy.over_attempt_limit(attempt, limit) is over


def test_the_attempt_limit_reason_names_queue_and_count() -> None:
    assert policy.attempt_limit_reason("jobs", 3) == "delivered 3 times, the limit for queue 'jobs'"


def test_dead_letter_headers_keep_the_first_queue_and_user_headers() -> None:
    first = policy.dead_letter_headers({"trace": "t1"}, "jobs", "boom", 2)
    assert first == {
        headers.DEAD_QUEUE: "jobs",
        "trace": "t1",
        headers.DEAD_REASON: "boom",
        headers.ATTEMPTS: "2",
    }
    again = policy.dead_letter_headers(first, "jobs.dead", "boom again", 1)
    assert again[headers.DEAD_QUEUE] == "jobs"
    assert again[headers.DEAD_REASON] == "boom again"
    assert policy.without_dead_letter_headers(again) == {"trace": "t1"}
    assert policy.dead_reason(again) == "boom again"


def test_every_header_name_has_the_prefix() -> None:
    names = [v for k, v in vars(headers).items() if k.isupper() and isinstance(v, str)]
    assert names and all(name.startswith(headers.PREFIX) for name in names)


def test_least_loaded_prefers_untried_then_fewest_outstanding() -> None:
    load = {"a": 2, "b": 0, "c": 0}.__getitem__
    assert policy.least_loaded([], load, 0) is None
    assert policy.least_loaded(["a"], load, 5) == "a"
    assert policy.least_loaded(["a", "b"], load, 0) == "b"
    assert policy.least_loaded(["a", "b"], load, 0, tried=["b"]) == "a"
    # ties take turns as the turn counter advances
    assert {policy.least_loaded(["b", "c"], load, turn) for turn in range(2)} == {"b", "c"}


def test_refusals_map_to_the_right_errors() -> None:
    full = policy.refusal_error("q", RefusalReason.FULL, "queue 'q'")
    assert isinstance(full, pigeon.Backpressure)
    store = policy.refusal_error("q", RefusalReason.STORE_FAILED, "disk is full")
    assert isinstance(store, pigeon.StoreError) and "disk is full" in str(store)
    too_large = policy.refusal_error("q", RefusalReason.TOO_LARGE, "9 > 1 bytes")
    assert type(too_large) is pigeon.DeliveryError
    assert [r for r in RefusalReason if r.retryable] == [
        RefusalReason.FULL,
        RefusalReason.STORE_FAILED,
    ]


@pytest.mark.parametrize(
    "error",
    [pigeon.NoResponders("s"), pigeon.Timeout("late"), pigeon.Rejected("s", "ValueError: x")],
)
def test_reply_error_kinds_round_trip(error: pigeon.PigeonError) -> None:
    kind = policy.reply_kind(error)
    assert kind is not ReplyErrorKind.NONE
    text = error.reason if isinstance(error, pigeon.Rejected) else str(error)
    back = policy.reply_error("s", kind, text)
    assert type(back) is type(error)


def test_a_producers_delivery_count_is_not_believed() -> None:
    from pigeon.message import Message

    sent = [Message(id="a", body=b"", attempt=7), Message(id="b", body=b"")]
    policy.as_received(sent)
    assert [m.attempt for m in sent] == [0, 0]
