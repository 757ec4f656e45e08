"""The message envelope and the payload codecs.

A :class:`Message` is what every transport carries and every handler gets.
Bodies are bytes; :func:`encode_body` turns Python values into bytes plus a
content type, and :meth:`Message.decode` turns them back, optionally into a
typed value (msgspec Struct, dataclass, pydantic model, builtins).
Only data formats are used: JSON, msgpack, text, raw bytes. Never pickle.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable
from typing import Annotated, Any, TypeVar, overload

import msgspec

from ._core import limits
from .errors import DecodeError

__all__ = [
    "BYTES",
    "JSON",
    "MSGPACK",
    "TEXT",
    "Message",
    "decode_body",
    "encode_body",
    "new_id",
]

T = TypeVar("T")

JSON = "application/json"
MSGPACK = "application/msgpack"
TEXT = "text/plain; charset=utf-8"
BYTES = "application/octet-stream"
_CONTENT_TYPES = (JSON, MSGPACK, TEXT, BYTES)

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()

# Ids sort by creation time: 12 hex digits of milliseconds, then a random
# per-process tag and a counter, so two processes never collide and one
# process never repeats itself without a syscall per id. The time prefix is
# formatted once per millisecond, not once per id.
_process_tag = os.urandom(5).hex()
_counter = itertools.count()
_prefix_ms = -1
_prefix = ""


def _reseed_after_fork() -> None:
    global _process_tag, _counter, _prefix_ms
    _process_tag = os.urandom(5).hex()
    _counter = itertools.count()
    _prefix_ms = -1


os.register_at_fork(after_in_child=_reseed_after_fork)


# The counter's 32 bits as two table lookups: faster than formatting them.
_HEX4 = [f"{i:04x}" for i in range(1 << 16)]


def _stamp() -> tuple[str, float]:
    """A new id and the wall-clock time it was made."""
    global _prefix_ms, _prefix
    ns = time.time_ns()
    ms = ns // 1_000_000
    if ms != _prefix_ms:
        _prefix_ms = ms
        _prefix = f"{ms:012x}{_process_tag}"
    n = next(_counter)
    return _prefix + _HEX4[(n >> 16) & 0xFFFF] + _HEX4[n & 0xFFFF], ns * 1e-9


def minted_here(message_id: str) -> bool:
    """True if ``message_id`` was made by :func:`new_id` in this process.

    Such an id cannot come back as another producer's resend, so a host
    needs no tombstone for it once it is acked.
    """
    return message_id[12:22] == _process_tag


def new_id() -> str:
    """Return a new unique message id that sorts by creation time."""
    return _stamp()[0]


_HeaderName = Annotated[str, msgspec.Meta(min_length=1, max_length=limits.MAX_HEADER_NAME)]
_HeaderValue = Annotated[str, msgspec.Meta(max_length=limits.MAX_HEADER_VALUE)]
_Time = Annotated[float, msgspec.Meta(ge=0.0, le=limits.MAX_TIME)]


class Message(msgspec.Struct, array_like=True, gc=False):
    """One message: the envelope every transport carries.

    Attributes:
        id: unique, time-ordered; producers resend with the same id and hosts
            de-duplicate on it.
        body: the payload bytes.
        content_type: how ``body`` is encoded (JSON, msgpack, text or bytes).
        headers: free-form ``str -> str`` metadata; keys starting with
            pigeon's prefix (``pigeon._core.headers.PREFIX``) are its own.
        attempt: how many times this message has been delivered, counting
            this delivery (1 on the first delivery).
        redelivered: True when this message may have been seen before. When it
            is False the message has never been delivered before.
        created_at: wall-clock seconds when the producer made it.
        deadline: wall-clock seconds after which nobody should work on it.
    """

    # The bounds apply when a message is decoded from the wire or a store
    # (``pigeon._core.limits``); a value outside them is refused there.
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=limits.MAX_ID)]
    body: bytes
    content_type: Annotated[str, msgspec.Meta(max_length=limits.MAX_NAME)] = BYTES
    headers: Annotated[
        dict[_HeaderName, _HeaderValue], msgspec.Meta(max_length=limits.MAX_HEADERS)
    ] = {}
    attempt: Annotated[int, msgspec.Meta(ge=0, le=limits.MAX_ATTEMPT)] = 0
    redelivered: bool = False
    created_at: _Time = 0.0
    deadline: _Time | None = None

    @overload
    def decode(self) -> Any: ...
    @overload
    def decode(self, type: type[T]) -> T: ...
    @overload
    def decode(self, type: Any) -> Any: ...
    def decode(self, type: Any = None) -> Any:
        """Decode the body by its content type, into ``type`` when given.

        ``message.decode(Order)`` is typed as returning an ``Order``; without
        a type the value is whatever the content type holds (``Any``).

        Raises:
            DecodeError: the body is not valid for its content type or type.
        """
        return decode_body(self.body, self.content_type, type)

    @property
    def text(self) -> str:
        """The body as UTF-8 text.

        Raises:
            DecodeError: the body is not UTF-8.
        """
        try:
            return self.body.decode()
        except UnicodeDecodeError as exc:
            raise DecodeError(f"message {self.id} body is not UTF-8 text") from exc


def make_message(
    payload: Any,
    *,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
    deadline: float | None = None,
    message_id: str | None = None,
) -> Message:
    """Build a new message from a Python value (see :func:`encode_body`).

    Raises:
        TypeError: the payload, headers or id have the wrong type.
        ValueError: headers or id are out of bounds (``pigeon._core.limits``).
    """
    if message_id is not None:
        if not isinstance(message_id, str):
            raise TypeError(f"message_id must be a str, not {type(message_id).__name__}")
        if not message_id or len(message_id) > limits.MAX_ID:
            raise ValueError(
                f"message_id is 1 to {limits.MAX_ID} characters, not {len(message_id)}"
            )
    if headers is not None:
        _check_headers(headers)
        headers = dict(headers)
    else:
        headers = {}
    if content_type is None and type(payload) is bytes:
        body, ctype = payload, BYTES  # the hot path: no codec
    else:
        body, ctype = encode_body(payload, content_type)
    stamp_id, now = _stamp()
    return Message(message_id or stamp_id, body, ctype, headers, 0, False, now, deadline)


def make_messages(
    payloads: Iterable[Any],
    *,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
    deadline: float | None = None,
) -> list[Message]:
    """Build many messages at once: one clock read for the whole batch."""
    if headers is not None:
        _check_headers(headers)
    _, now = _stamp()  # one clock read: refreshes the id prefix for this millisecond
    prefix, counter, hex4 = _prefix, _counter, _HEX4
    messages = []
    for payload in payloads:
        if content_type is None and type(payload) is bytes:
            body, ctype = payload, BYTES
        else:
            body, ctype = encode_body(payload, content_type)
        n = next(counter)
        message_id = prefix + hex4[(n >> 16) & 0xFFFF] + hex4[n & 0xFFFF]
        messages.append(
            Message(
                message_id, body, ctype, dict(headers) if headers else {}, 0, False, now, deadline
            )
        )
    return messages


def _check_headers(headers: dict[str, str]) -> None:
    if not isinstance(headers, dict):
        raise TypeError(f"headers must be a dict of str to str, not {type(headers).__name__}")
    if len(headers) > limits.MAX_HEADERS:
        raise ValueError(f"a message has at most {limits.MAX_HEADERS} headers, not {len(headers)}")
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"headers must map str to str; got {key!r}: {value!r}")
        if not key or len(key) > limits.MAX_HEADER_NAME:
            raise ValueError(f"a header name is 1 to {limits.MAX_HEADER_NAME} characters: {key!r}")
        if len(value) > limits.MAX_HEADER_VALUE:
            raise ValueError(
                f"header {key!r} is {len(value)} characters, over {limits.MAX_HEADER_VALUE}"
            )


def _to_builtins(payload: Any) -> Any:
    # pydantic models are not msgspec types; dump them to plain data first.
    dump = getattr(payload, "model_dump", None)
    if callable(dump):
        return dump(mode="json")
    return payload


def encode_body(payload: Any, content_type: str | None = None) -> tuple[bytes, str]:
    """Encode a Python value as message body bytes and a content type.

    bytes-like values travel as they are, ``str`` as UTF-8 text, anything else
    as JSON (or msgpack when ``content_type`` is ``MSGPACK``).

    Raises:
        ConfigurationError: the content type is not one pigeon knows.
        TypeError: the value cannot be encoded in that content type.
    """
    if content_type is None:
        if isinstance(payload, bytes):
            return payload, BYTES
        if isinstance(payload, (bytearray, memoryview)):
            return bytes(payload), BYTES
        if isinstance(payload, str):
            return payload.encode(), TEXT
        content_type = JSON
    if content_type == BYTES:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"content type {BYTES} needs bytes, not {type(payload).__name__}")
        return bytes(payload), BYTES
    if content_type == TEXT:
        if not isinstance(payload, str):
            raise TypeError(f"content type {TEXT!r} needs str, not {type(payload).__name__}")
        return payload.encode(), TEXT
    encoder: msgspec.json.Encoder | msgspec.msgpack.Encoder | None = None
    if content_type == JSON:
        encoder = _json_encoder
    elif content_type == MSGPACK:
        encoder = _msgpack_encoder
    if encoder is None:
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"unknown content type {content_type!r}; expected one of {', '.join(_CONTENT_TYPES)}"
        )
    try:
        return encoder.encode(_to_builtins(payload)), content_type
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"cannot encode {type(payload).__name__} as {content_type}: {exc}") from exc


def decode_body(body: bytes, content_type: str, type: Any = None) -> Any:
    """Decode body bytes by content type, optionally into ``type``.

    Raises:
        DecodeError: the body does not parse, or does not fit ``type``.
    """
    validate = getattr(type, "model_validate", None)  # pydantic
    target = Any if type is None or validate is not None else type
    try:
        if content_type == JSON:
            value = msgspec.json.decode(body, type=target)
        elif content_type == MSGPACK:
            value = msgspec.msgpack.decode(body, type=target)
        elif content_type.startswith("text/"):
            value = msgspec.convert(body.decode(), target)
        else:
            value = msgspec.convert(body, target) if target not in (Any, bytes) else body
        return validate(value) if validate is not None else value
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise DecodeError(f"cannot decode {content_type} body: {exc}") from exc
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise DecodeError(f"cannot decode {content_type} body into {type}: {exc}") from exc
