"""The options of the ``amqp://`` transport, checked before anything connects."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from yarl import URL

from ...errors import ConfigurationError
from .topology import QUEUE_TYPES

DEFAULT_MAX_MESSAGE_SIZE = 16 << 20  # RabbitMQ 4.x's own default max_message_size
MAX_PREFETCH = 65535  # basic.qos prefetch-count is a 16-bit field

# Options other pigeon transports take that have no meaning here.
_NOT_HONOURED = {
    "max_length": "set a queue length limit with a RabbitMQ policy (max-length) instead",
    "lease_ttl": "pass lease_ttl to consume(); the broker has no transport-wide lease",
    "heartbeat_misses": "AMQP heartbeats are negotiated with the broker; use heartbeat",
    "connect_grace": "the broker knows its consumers; there is no handshake to wait for",
}


@dataclass(frozen=True, slots=True)
class AmqpOptions:
    """What an ``amqp://`` connection can be told (see ``AmqpTransport``).

    Attributes:
        address: the URL without user and password, for messages and errors.
        max_message_size: largest body accepted, in bytes.
        queue_type: ``quorum`` or ``classic`` for work queues.
        reconnect_interval: seconds between reconnect attempts.
        heartbeat: AMQP heartbeat in seconds (None: the broker's choice).
        connect_timeout: seconds to wait for the first connection.
        outbox_limit: unconfirmed sends before ``send_nowait`` raises Backpressure.
        service_prefetch: requests one server handles at once per service.
    """

    address: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    queue_type: str = "quorum"
    reconnect_interval: float = 1.0
    heartbeat: float | None = None
    connect_timeout: float = 5.0
    outbox_limit: int = 100_000
    service_prefetch: int = 64


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(url: str, options: dict[str, Any]) -> AmqpOptions:
    """Check ``url`` and ``options``.

    Raises:
        ConfigurationError: an unknown option, one this transport cannot
            honour, a value that cannot work, or a URL that is not ``amqp://HOST``.
    """
    defaults = AmqpOptions(address="")
    known = {f.name for f in fields(AmqpOptions)} - {"address"}
    for name in options:
        if name not in known:
            why = _NOT_HONOURED.get(
                name, f"it is not an option of this transport; known: {', '.join(sorted(known))}"
            )
            raise ConfigurationError(f"amqp transport cannot honour {name}=: {why}")
    queue_type = options.get("queue_type", defaults.queue_type)
    if queue_type not in QUEUE_TYPES:
        raise ConfigurationError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
    for name in ("max_message_size", "outbox_limit", "service_prefetch"):
        value = options.get(name, getattr(defaults, name))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
    if options.get("service_prefetch", defaults.service_prefetch) > MAX_PREFETCH:
        raise ConfigurationError(f"service_prefetch must be <= {MAX_PREFETCH}")
    for name in ("reconnect_interval", "connect_timeout"):
        number = options.get(name, getattr(defaults, name))
        if not _number(number) or not 0 < number < math.inf:
            raise ConfigurationError(f"{name} must be a positive number of seconds")
    heartbeat = options.get("heartbeat")
    if heartbeat is not None and (not _number(heartbeat) or not 0 <= heartbeat < math.inf):
        raise ConfigurationError(
            f"heartbeat must be a number of seconds >= 0 (or None), not {heartbeat!r}"
        )
    try:
        parsed = URL(url)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{url!r} is not a valid amqp:// URL: {exc}") from exc
    if parsed.scheme != "amqp" or not parsed.host:
        raise ConfigurationError(f"{url!r} is not an amqp://HOST URL")
    # For messages and errors: never the password.
    address = str(parsed.with_user(None).with_password(None))
    values: dict[str, Any] = dict(options)
    for name in ("reconnect_interval", "connect_timeout"):
        if name in values:
            values[name] = float(values[name])
    return AmqpOptions(address=address, **values)
