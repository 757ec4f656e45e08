"""``amqp://`` transport: pigeon's API on RabbitMQ (see docs/transports-amqp.md).

aio-pika is optional; without it, asking for an ``amqp://`` URL raises
:class:`~pigeon.errors.ConfigurationError` that says what to install.
"""

from __future__ import annotations

from typing import Any

from ...errors import ConfigurationError

try:
    import aio_pika  # noqa: F401  (only probing that it is installed)
except ImportError as _missing:  # pragma: no cover - exercised by a test with aio-pika hidden
    _import_error: ImportError | None = _missing
else:
    _import_error = None

if _import_error is None:
    from .transport import AmqpTransport
else:

    class AmqpTransport:  # type: ignore[no-redef]
        """Stand-in that explains how to get the real transport.

        Raises:
            ConfigurationError: always; aio-pika is not installed.
        """

        def __init__(self, url: str, **options: Any) -> None:
            raise ConfigurationError(
                f"{url!r} needs the RabbitMQ client aio-pika, which is not installed: "
                "pip install 'pigeon-mq[amqp]'"
            ) from _import_error


__all__ = ["AmqpTransport"]
