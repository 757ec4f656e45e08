"""pigeon's envelope on AMQP 0-9-1 properties and headers.

A plain AMQP client interoperates by using the same properties (the mapping
is documented in docs/transports-amqp.md):

* ``message_id`` ↔ ``Message.id``, ``content_type`` ↔ ``Message.content_type``,
  ``timestamp`` ↔ ``Message.created_at`` (whole seconds; the exact value
  travels in ``headers.CREATED_AT``), ``delivery_mode`` 2 (persistent).
* ``headers``: the message's own headers as strings, plus the envelope
  fields pigeon keeps under its own prefix (``ENVELOPE_HEADERS``),
  which are stripped again on the way in.
"""

from __future__ import annotations

import datetime
import decimal
import math
import time
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from ..._core import headers
from ...message import BYTES, Message, new_id

PREFIX = headers.PREFIX
ATTEMPT = headers.ATTEMPT
REDELIVERED = headers.REDELIVERED
CREATED_AT = headers.CREATED_AT
DEADLINE = headers.DEADLINE
ERROR = headers.ERROR
ENVELOPE_HEADERS = frozenset({ATTEMPT, REDELIVERED, CREATED_AT, DEADLINE, ERROR})

# Bookkeeping the broker adds; it is not the sender's metadata.
_BROKER_HEADERS = (
    "x-death",
    "x-first-death-",
    "x-last-death-",
    "x-delivery-count",
    "x-acquired-count",
)


def to_amqp(
    message: Message,
    *,
    persistent: bool = True,
    attempt: int = 0,
    redelivered: bool = False,
    extra: dict[str, str] | None = None,
    **properties: Any,
) -> aio_pika.Message:
    """Build the AMQP message that carries ``message``.

    Args:
        message: the envelope to carry.
        persistent: delivery mode 2 (stored on disk by the broker).
        attempt: deliveries already spent, for a republished copy.
        redelivered: mark the copy as possibly seen before.
        extra: headers to add or override (dead-letter reasons, errors).
        properties: other AMQP properties (reply_to, correlation_id, expiration).
    """
    headers: dict[str, Any] = dict(message.headers)
    if extra:
        headers.update(extra)
    if attempt:
        headers[ATTEMPT] = str(attempt)
    if redelivered or message.redelivered:
        headers[REDELIVERED] = "1"
    if message.created_at:
        headers[CREATED_AT] = repr(message.created_at)
    if message.deadline is not None:
        headers[DEADLINE] = repr(message.deadline)
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        message_id=message.id,
        timestamp=int(message.created_at) if message.created_at else None,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
        **properties,
    )


def _text(value: Any) -> str | None:
    """A header value as the str pigeon headers hold; None for tables and lists."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, decimal.Decimal)):
        return str(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    return None


def _number(value: Any, default: float = 0.0) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def broker_count(headers: dict[str, Any], redelivered: bool) -> int:
    """Earlier deliveries of this copy, as the broker counts them.

    Quorum queues add ``x-delivery-count`` (returns so far); RabbitMQ 4.3+
    counts every return in ``x-acquired-count`` and only failures in
    ``x-delivery-count``, so the larger wins. A classic queue only says
    ``redelivered``: at least one earlier delivery.
    """
    count = max(
        int(_number(headers.get("x-delivery-count"))), int(_number(headers.get("x-acquired-count")))
    )
    if count == 0 and redelivered:
        return 1
    return count


def from_amqp(incoming: AbstractIncomingMessage) -> Message:
    """The pigeon message an AMQP delivery carries, with ``attempt`` and
    ``redelivered`` set for this delivery."""
    raw: dict[str, Any] = dict(incoming.headers or {})
    headers: dict[str, str] = {}
    for key, value in raw.items():
        if key in ENVELOPE_HEADERS or key.startswith(_BROKER_HEADERS):
            continue
        text = _text(value)
        if text is not None:
            headers[key] = text
    prior = int(_number(raw.get(ATTEMPT)))
    attempt = prior + broker_count(raw, bool(incoming.redelivered)) + 1
    created_at = _number(raw.get(CREATED_AT))
    if not created_at and incoming.timestamp is not None:
        created_at = incoming.timestamp.timestamp()
    deadline = _number(raw.get(DEADLINE), math.nan)
    return Message(
        # A plain client may publish without an id; give one so settling and
        # logs work (its redeliveries then get other ids).
        id=incoming.message_id or new_id(),
        body=incoming.body,
        content_type=incoming.content_type or BYTES,
        headers=headers,
        attempt=attempt,
        redelivered=attempt > 1 or _text(raw.get(REDELIVERED)) == "1",
        created_at=created_at,
        deadline=None if math.isnan(deadline) else deadline,
    )


def error_of(incoming: AbstractIncomingMessage) -> str | None:
    """The error a reply carries, if the server's handler failed."""
    value = (incoming.headers or {}).get(ERROR)
    return None if value is None else (_text(value) or "unknown error")


def remaining(message: Message, now: float | None = None) -> float | None:
    """Seconds left before the message's deadline (None: no deadline)."""
    if message.deadline is None:
        return None
    return message.deadline - (time.time() if now is None else now)
