"""Pigeon's envelope as a NATS message, and pigeon names as NATS names.

The body is the NATS payload. The envelope's fields travel as headers with
the ``Pigeon-`` prefix; user headers travel as they are, so any NATS client
can read and write them. See docs/transports-nats.md for the table.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from ...errors import ConfigurationError
from ...message import BYTES, Message

ID = "Pigeon-Id"
CONTENT_TYPE = "Pigeon-Content-Type"
CREATED_AT = "Pigeon-Created-At"
DEADLINE = "Pigeon-Deadline"
REDELIVERED = "Pigeon-Redelivered"
ERROR = "Pigeon-Error"
MSG_ID = "Nats-Msg-Id"  # JetStream's de-duplication key


def dedupe_id(queue: str, message_id: str) -> str:
    """The ``Nats-Msg-Id`` of a message sent to ``queue``.

    JetStream's duplicate window spans the whole stream, but pigeon drops
    resends per queue: the same id sent to two queues is two messages.
    """
    return f"{queue}:{message_id}"


# Header names a user may not set: pigeon's own, NATS's own, and the names
# nats-py reads a status line into (a user "Status" would look like one).
_RESERVED_PREFIXES = ("pigeon-", "nats-")
_RESERVED_NAMES = ("status", "description")
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # printable ASCII, no ':' or space
_TOKEN = re.compile(r"^[^\s.*>]+$")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def _reserved(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith(_RESERVED_PREFIXES) or lowered in _RESERVED_NAMES


def single_line(value: str) -> str:
    """A header value cannot hold CR or LF; fold them into spaces."""
    return value.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def to_headers(message: Message, *, check: bool = True) -> dict[str, str]:
    """The NATS headers carrying ``message``'s envelope.

    Args:
        check: refuse user headers NATS cannot carry (True for new messages);
            False folds them instead (for copies of received messages).

    Raises:
        ConfigurationError: a user header name is reserved or not a valid
            NATS header name, or a value holds a line break.
    """
    headers: dict[str, str] = {}
    for name, value in message.headers.items():
        if check:
            if not _HEADER_NAME.match(name) or _reserved(name):
                raise ConfigurationError(
                    f"header {name!r} cannot travel over NATS: names must be printable ASCII "
                    f"without ':' and must not start with 'Pigeon-' or 'Nats-'"
                )
            if "\r" in value or "\n" in value:
                raise ConfigurationError(
                    f"header {name!r} holds a line break; NATS cannot carry it"
                )
        elif not _HEADER_NAME.match(name) or _reserved(name):
            continue
        headers[name] = single_line(value)
    headers[ID] = message.id
    headers[CONTENT_TYPE] = message.content_type
    if message.created_at:
        headers[CREATED_AT] = repr(message.created_at)
    if message.deadline is not None:
        headers[DEADLINE] = repr(message.deadline)
    return headers


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def from_headers(
    body: bytes,
    headers: Mapping[str, str] | None,
    *,
    fallback_id: str,
    attempt: int = 0,
    redelivered: bool = False,
) -> Message:
    """Rebuild the envelope of a received NATS message.

    Messages from plain NATS clients work too: without ``Pigeon-Id`` the id
    is ``Nats-Msg-Id`` or ``fallback_id``; without ``Pigeon-Content-Type``
    the body is bytes.
    """
    headers = headers or {}
    user = {k: v for k, v in headers.items() if isinstance(k, str) and not _reserved(k)}
    return Message(
        id=headers.get(ID) or headers.get(MSG_ID) or fallback_id,
        body=body,
        content_type=headers.get(CONTENT_TYPE) or BYTES,
        headers=user,
        attempt=attempt,
        redelivered=redelivered or headers.get(REDELIVERED) == "1",
        created_at=_float(headers.get(CREATED_AT)) or 0.0,
        deadline=_float(headers.get(DEADLINE)),
    )


def subject(prefix: str, kind: str, name: str) -> str:
    """The subject of queue or service ``name``: ``<prefix>.<kind>.<name>``.

    Dots in ``name`` become subject token separators (``orders.eu`` is
    ``pigeon.q.orders.eu``).

    Raises:
        ConfigurationError: the name holds a NATS wildcard (``*``, ``>``) or
            an empty token, which cannot name one subject.
    """
    if not all(_TOKEN.match(token) for token in name.split(".")):
        raise ConfigurationError(
            f"{name!r} cannot be a NATS subject: no '*', '>', spaces or empty dot-separated parts"
        )
    return f"{prefix}.{kind}.{name}"


def durable_name(queue: str) -> str:
    """The JetStream durable consumer name of ``queue``, shared by its workers.

    Names made of letters, digits, ``-`` and ``_`` are used as they are (with a
    ``q_`` prefix); others are made safe and get a hash of the original, so two
    queues never share a consumer.
    """
    safe = _NAME_UNSAFE.sub("_", queue)
    if safe == queue and len(queue) <= 200:
        return f"q_{queue}"
    digest = hashlib.sha256(queue.encode()).hexdigest()[:12]
    return f"q_{safe[:180]}_{digest}"
