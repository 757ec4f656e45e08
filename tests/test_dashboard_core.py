"""The dashboard's I/O-free parts: HTTP request heads (``dashboard.http``),
who may read and act (``dashboard.guard``), and the queues' history and
rates (``dashboard.history``). No sockets, no event loop."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pigeon.dashboard import guard
from pigeon.dashboard.history import QueueHistory
from pigeon.dashboard.http import (
    HttpError,
    Limits,
    Request,
    body_length,
    json_response,
    parse_head,
    response,
)

TOKEN = "a-token-of-enough-length"


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode()


# -- http -------------------------------------------------------------------


def test_a_request_head_is_parsed() -> None:
    request = parse_head(
        head("GET /api/dead?queue=jobs&limit=5 HTTP/1.1", "Host: 127.0.0.1:8642", "X-A: 1")
    )
    assert (request.method, request.path) == ("GET", "/api/dead")
    assert request.query == {"queue": "jobs", "limit": "5"}
    assert request.header("HOST") == "127.0.0.1:8642"
    assert body_length(request) == 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (head("GET / HTTP/2"), 400),
        (head("GET /"), 400),
        (head("GET http://elsewhere/ HTTP/1.1"), 400),
        (head("DELETE / HTTP/1.1"), 405),
        (head("GET / HTTP/1.1", "no colon"), 400),
        (head("GET / HTTP/1.1", " Host: x"), 400),
        (head("GET / HTTP/1.1", "Host: a", "Host: b"), 400),
        (head("POST / HTTP/1.1", "Transfer-Encoding: chunked"), 501),
        ("GET /é HTTP/1.1".encode(), 400),
        (head("GET / HTTP/1.1", *(f"X-{n}: 1" for n in range(49))), 431),
        (head("GET / HTTP/1.1", "X: " + "a" * (16 << 10)), 431),
    ],
)
def test_a_malformed_or_oversized_head_is_refused_with_its_status(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as refused:
        parse_head(raw)
    assert refused.value.status == status


@pytest.mark.parametrize(
    ("lines", "status"),
    [
        (("POST /api/replay HTTP/1.1",), 411),
        (("POST /api/replay HTTP/1.1", "Content-Length: -1"), 400),
        (("POST /api/replay HTTP/1.1", "Content-Length: 4097"), 413),
    ],
)
def test_a_body_needs_a_length_within_the_limit(lines: tuple[str, ...], status: int) -> None:
    with pytest.raises(HttpError) as refused:
        body_length(parse_head(head(*lines)))
    assert refused.value.status == status
    assert body_length(parse_head(head(lines[0], "Content-Length: 4096"))) == 4096


@given(st.binary(max_size=600))
def test_random_heads_parse_or_are_refused_with_an_http_status(raw: bytes) -> None:
    try:
        request = parse_head(raw, Limits(head_bytes=512, headers=8))
    except HttpError as exc:
        assert 400 <= exc.status < 600
    else:
        assert request.method in ("GET", "HEAD", "POST")
        assert request.path.startswith("/")


def test_a_json_body_needs_its_content_type() -> None:
    request = Request("POST", "/api/replay", {}, {"content-type": "text/plain"}, b"{}")
    with pytest.raises(HttpError) as refused:
        request.json()
    assert refused.value.status == 415
    request.headers["content-type"] = "application/json; charset=utf-8"
    request.body = b"{nope"
    with pytest.raises(HttpError) as refused:
        request.json()
    assert refused.value.status == 400


def test_every_response_closes_and_forbids_framing_caching_and_foreign_scripts() -> None:
    raw = response(200, b"hi")
    head_part, _, body = raw.partition(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head_part.decode().split("\r\n")[1:])
    assert body == b"hi" and fields["Content-Length"] == "2"
    assert fields["Connection"] == "close"
    assert fields["Cache-Control"] == "no-store"
    assert fields["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in fields["Content-Security-Policy"]
    assert response(200, b"hi", head_only=True) == head_part + b"\r\n\r\n"
    assert json.loads(json_response(404, {"error": "x"}).partition(b"\r\n\r\n")[2]) == {
        "error": "x"
    }


# -- guard ------------------------------------------------------------------


def request(method: str = "GET", **headers: str) -> Request:
    return Request(method, "/", {}, {k.replace("_", "-"): v for k, v in headers.items()})


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("127.0.0.1:8642", False),
        ("localhost:8642", False),
        ("[::1]:8642", False),
        ("127.0.0.1:9999", True),
        ("evil.example:8642", True),  # a name rebound to 127.0.0.1
        ("", True),
    ],
)
def test_on_loopback_only_a_loopback_host_is_answered(host: str, refused: bool) -> None:
    verdict = guard.check_host(request(host=host), port=8642, loopback=True)
    assert verdict is (guard.Refusal.FOREIGN_HOST if refused else None)
    assert guard.check_host(request(host=host), port=8642, loopback=False) is None


@pytest.mark.parametrize(
    ("headers", "verdict"),
    [
        ({"x_pigeon_token": TOKEN}, None),
        ({"x_pigeon_token": TOKEN, "origin": "http://127.0.0.1:8642"}, None),
        ({"x_pigeon_token": TOKEN, "sec_fetch_site": "same-origin"}, None),
        ({}, guard.Refusal.NO_TOKEN),
        ({"x_pigeon_token": "wrong"}, guard.Refusal.BAD_TOKEN),
        ({"x_pigeon_token": TOKEN, "origin": "http://evil.example"}, guard.Refusal.CROSS_ORIGIN),
        ({"x_pigeon_token": TOKEN, "origin": "null"}, guard.Refusal.CROSS_ORIGIN),
        ({"x_pigeon_token": TOKEN, "sec_fetch_site": "cross-site"}, guard.Refusal.CROSS_ORIGIN),
        ({"x_pigeon_token": TOKEN, "sec_fetch_site": "same-site"}, guard.Refusal.CROSS_ORIGIN),
    ],
)
def test_an_action_needs_the_token_from_the_same_origin(
    headers: dict[str, str], verdict: guard.Refusal | None
) -> None:
    given_request = request("POST", host="127.0.0.1:8642", **headers)
    assert guard.check_action(given_request, token=TOKEN) is verdict


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert guard.is_loopback(host) is loopback


# -- history ----------------------------------------------------------------


def test_history_keeps_the_last_points_and_rates_per_queue() -> None:
    history = QueueHistory(points=3)
    first = history.add(0.0, {"jobs": {"ready": 1, "in_flight": 0, "received": 10, "acked": 0}})
    assert first == {"jobs": {"received_rate": None, "acked_rate": None}}
    for t in (1.0, 2.0, 3.0):
        rates = history.add(
            t, {"jobs": {"ready": int(t), "in_flight": 2, "received": 10 + 5 * int(t), "acked": 0}}
        )
    assert rates == {"jobs": {"received_rate": 5.0, "acked_rate": 0.0}}
    series = history.series()["jobs"]
    assert series["ready"] == [1, 2, 3]  # the oldest went first
    assert series["received_rate"] == [5.0, 5.0, 5.0]
    assert series["dead"] == [None, None, None]  # not given: unknown, not 0
    # The node restarted: its counters start again from 0.
    rates = history.add(4.0, {"jobs": {"ready": 0, "in_flight": 0, "received": 2, "acked": 0}})
    assert rates == {"jobs": {"received_rate": None, "acked_rate": 0.0}}
    assert history.series()["jobs"]["received_rate"] == [5.0, 5.0, None]


def test_history_forgets_queues_gone_and_follows_at_most_max_queues() -> None:
    history = QueueHistory(points=5, max_queues=2)
    history.add(0.0, {name: {"ready": 1, "received": 0} for name in ("a", "b", "c")})
    assert sorted(history.series()) == ["a", "b"] and history.untracked == 1
    rates = history.add(1.0, {"b": {"ready": 1}, "c": {"ready": 2, "received": 4}})
    assert rates["c"]["received_rate"] == 4.0  # an untracked queue had its rate
    assert sorted(history.series()) == ["b", "c"] and history.untracked == 0
    assert history.series()["c"]["ready"] == [2]


def test_a_history_needs_room() -> None:
    with pytest.raises(ValueError):
        QueueHistory(points=1)
    with pytest.raises(ValueError):
        QueueHistory(max_queues=0)
