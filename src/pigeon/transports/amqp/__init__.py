"""``amqp://`` transport: pigeon's API on RabbitMQ (see docs/transports-amqp.md).

aio-pika is optional; without it, asking for an ``amqp://`` URL raises
:class:`~pigeon.errors.ConfigurationError` that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..._extras import install_hint
from ...errors import ConfigurationError


class _AmqpMissing:
    """Stands in for the transport when aio-pika is missing, to say how to get it.

    Raises:
        ConfigurationError: always; aio-pika is not installed.
    """

    import_error: ClassVar[ImportError | None] = None

    def __init__(self, url: str, **options: object) -> None:
        scheme = url.partition("://")[0] if isinstance(url, str) else "amqp"
        raise ConfigurationError(  # the scheme only: the URL may hold a password
            f"{scheme}:// needs the RabbitMQ client aio-pika, which is not installed: "
            f"{install_hint('amqp')}"
        ) from self.import_error


if TYPE_CHECKING:
    from .transport import AmqpTransport
else:
    try:
        import aio_pika  # noqa: F401  (only probing that it is installed)
    except ImportError as exc:  # exercised by a test with aio-pika hidden
        _AmqpMissing.import_error = exc
        AmqpTransport = _AmqpMissing
    else:
        from .transport import AmqpTransport


__all__ = ["AmqpTransport"]
