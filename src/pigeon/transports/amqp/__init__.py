"""``amqp://`` transport: pigeon's API on RabbitMQ (see docs/transports-amqp.md).

aio-pika is optional; without it, asking for an ``amqp://`` URL raises
:class:`~pigeon.errors.ConfigurationError` that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._extras import missing_transport

if TYPE_CHECKING:
    from .transport import AmqpTransport
else:
    try:
        import aio_pika  # noqa: F401  (only probing that it is installed)
    except ImportError as exc:  # exercised by a test with aio-pika hidden
        AmqpTransport = missing_transport("the RabbitMQ client aio-pika", "amqp", exc)
    else:
        from .transport import AmqpTransport


__all__ = ["AmqpTransport"]
