"""The message envelope, its payload codecs and message ids."""

from __future__ import annotations

import dataclasses
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon import message as message_module
from pigeon.errors import ConfigurationError, DecodeError
from pigeon.message import (
    BYTES,
    JSON,
    MSGPACK,
    TEXT,
    Message,
    decode_body,
    encode_body,
    make_message,
    new_id,
)


class Point(msgspec.Struct):
    x: int
    y: int
    label: str = ""


@dataclasses.dataclass
class Order:
    sku: str
    qty: int
    tags: list[str] = dataclasses.field(default_factory=list)


# -- encode_body -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "content_type", "body", "ctype"),
    [
        (b"\x00\x01raw", None, b"\x00\x01raw", BYTES),
        (bytearray(b"ba"), None, b"ba", BYTES),
        (memoryview(b"mv"), None, b"mv", BYTES),
        ("héllo", None, "héllo".encode(), TEXT),
        ({"a": 1}, None, b'{"a":1}', JSON),
        ([1, 2], None, b"[1,2]", JSON),
        (None, None, b"null", JSON),
        (Point(1, 2), None, b'{"x":1,"y":2,"label":""}', JSON),
        (Order("s", 2), None, b'{"sku":"s","qty":2,"tags":[]}', JSON),
        ({"a": 1}, MSGPACK, b"\x81\xa1a\x01", MSGPACK),
        ("plain", TEXT, b"plain", TEXT),
        (b"raw", BYTES, b"raw", BYTES),
        (bytearray(b"raw"), BYTES, b"raw", BYTES),
        ("a str as json", JSON, b'"a str as json"', JSON),
    ],
    ids=repr,
)
def test_encode_body(payload: object, content_type: str | None, body: bytes, ctype: str) -> None:
    out_body, out_type = encode_body(payload, content_type)
    assert type(out_body) is bytes
    assert (out_body, out_type) == (body, ctype)


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        (object(), None),
        (object(), MSGPACK),
        ({"k": object()}, JSON),
        (12, TEXT),
        (b"bytes", TEXT),
        ("str", BYTES),
        (3.5, BYTES),
    ],
    ids=repr,
)
def test_unencodable_values_raise_type_error(payload: object, content_type: str | None) -> None:
    with pytest.raises(TypeError):
        encode_body(payload, content_type)


def test_unknown_content_type_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown content type"):
        encode_body({"a": 1}, "application/xml")


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "content_type", "as_type", "expected"),
    [
        (b"\x00\xff", None, None, b"\x00\xff"),
        (b"\x00\xff", None, bytes, b"\x00\xff"),
        ("naïve ☃", None, None, "naïve ☃"),
        ("naïve ☃", None, str, "naïve ☃"),
        ({"a": [1, 2.5, None, True]}, None, None, {"a": [1, 2.5, None, True]}),
        ({"a": 1}, MSGPACK, None, {"a": 1}),
        ({"a": b"bin"}, MSGPACK, None, {"a": b"bin"}),
        (Point(3, 4, "p"), None, Point, Point(3, 4, "p")),
        (Point(3, 4, "p"), MSGPACK, Point, Point(3, 4, "p")),
        (Point(3, 4, "p"), None, None, {"x": 3, "y": 4, "label": "p"}),
        (Order("sku-1", 2, ["x"]), None, Order, Order("sku-1", 2, ["x"])),
        (Order("sku-1", 2, ["x"]), MSGPACK, Order, Order("sku-1", 2, ["x"])),
        ([1, 2, 3], None, list[int], [1, 2, 3]),
        ([1, 2, 3], MSGPACK, tuple[int, ...], (1, 2, 3)),
        (b"bytes as json", JSON, bytes, b"bytes as json"),
    ],
    ids=repr,
)
def test_make_message_then_decode(
    payload: object, content_type: str | None, as_type: object, expected: object
) -> None:
    m = make_message(payload, content_type=content_type)
    value = m.decode(as_type) if as_type is not None else m.decode()
    assert value == expected
    assert type(value) is type(expected)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=15,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([JSON, MSGPACK]))
def test_structured_values_round_trip(value: object, content_type: str) -> None:
    body, ctype = encode_body(value, content_type)
    assert ctype == content_type
    assert decode_body(body, ctype) == value


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64), st.text(max_size=32))
def test_bytes_and_text_round_trip(raw: bytes, text: str) -> None:
    assert make_message(raw).decode() == raw
    m = make_message(text)
    assert m.decode() == text and m.text == text


# -- decode errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "as_type"),
    [
        (b"{not json", JSON, None),
        (b"", JSON, None),
        (b'{"x": 1}', JSON, Point),  # missing y
        (b'{"x": "1", "y": 2}', JSON, Point),  # wrong field type
        (b'{"sku": "s"}', JSON, Order),
        (b"[1, 2]", JSON, dict),
        (b"\xc1", MSGPACK, None),  # reserved byte
        (b"\x92\x01", MSGPACK, None),  # truncated
        (b"\x81\xa1x\x01", MSGPACK, Point),
        (b"\xff\xfe", TEXT, None),  # not UTF-8
        (b"12", TEXT, int),  # text is text
        (b"raw", BYTES, int),
        (b"raw", BYTES, str),
    ],
    ids=repr,
)
def test_decode_error_on_garbage_or_wrong_type(
    body: bytes, content_type: str, as_type: object
) -> None:
    m = Message(id="m", body=body, content_type=content_type)
    with pytest.raises(DecodeError):
        m.decode(as_type)
    with pytest.raises(DecodeError):
        decode_body(body, content_type, as_type)


def test_text_property() -> None:
    assert Message(id="m", body="ünï".encode()).text == "ünï"
    with pytest.raises(DecodeError, match="not UTF-8"):
        Message(id="m", body=b"\xff").text  # noqa: B018


def test_unknown_content_type_decodes_as_bytes() -> None:
    m = Message(id="m", body=b"<x/>", content_type="application/xml")
    assert m.decode() == b"<x/>"


# -- make_message and headers ------------------------------------------------------


def test_make_message_fills_the_envelope() -> None:
    headers = {"trace": "t-1"}
    m = make_message({"a": 1}, headers=headers, deadline=123.0, message_id="fixed-id")
    assert m.id == "fixed-id"
    assert m.content_type == JSON and m.body == b'{"a":1}'
    assert m.headers == {"trace": "t-1"} and m.headers is not headers
    headers["trace"] = "changed"
    assert m.headers == {"trace": "t-1"}
    assert m.deadline == 123.0
    assert m.created_at > 0
    assert m.attempt == 0 and m.redelivered is False


def test_make_message_defaults() -> None:
    a, b = make_message(b"x"), make_message(b"x")
    assert a.id != b.id
    assert a.headers == {} and a.deadline is None


@pytest.mark.parametrize(
    "headers",
    [
        {"k": 1},
        {1: "v"},
        {"k": None},
        {"k": b"v"},
        [("k", "v")],
        "k=v",
    ],
    ids=repr,
)
def test_bad_headers_raise_type_error(headers: object) -> None:
    with pytest.raises(TypeError, match="headers"):
        make_message(b"x", headers=headers)  # type: ignore[arg-type]


def test_message_defaults_do_not_share_headers() -> None:
    a, b = Message(id="a", body=b""), Message(id="b", body=b"")
    a.headers["k"] = "v"
    assert b.headers == {}


# -- new_id ----------------------------------------------------------------------------

ID_RE = re.compile(r"^[0-9a-f]{12}[0-9a-f]{10}[0-9a-f]{8}$")


def test_new_id_shape_and_uniqueness() -> None:
    ids = [new_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    assert all(ID_RE.match(i) for i in ids)
    assert ids == sorted(ids)


def test_new_id_sorts_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([5_000_000_000_000, 3_000_000_000_000, 9_000_000_000_000])

    class FakeTime:
        @staticmethod
        def time_ns() -> int:
            return next(clock) * 1_000_000

    monkeypatch.setattr(message_module, "time", FakeTime)
    a, b, c = new_id(), new_id(), new_id()
    assert [int(i[:12], 16) for i in (a, b, c)] == [
        5_000_000_000_000,
        3_000_000_000_000,
        9_000_000_000_000,
    ]
    assert sorted([a, b, c]) == [b, a, c]


def test_new_id_carries_the_current_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeTime:
        @staticmethod
        def time_ns() -> int:
            return 1_700_000_000_123_456_789

    monkeypatch.setattr(message_module, "time", FakeTime)
    assert int(new_id()[:12], 16) == 1_700_000_000_123
