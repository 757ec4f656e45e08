"""The ``nats://`` transport (needs nats-py: ``pip install 'pigeon-mq[nats]'``)."""

from __future__ import annotations

from ...errors import ConfigurationError

try:
    from .transport import NatsTransport
except ImportError as exc:  # only nats-py is optional here
    if exc.name is None or not exc.name.startswith("nats"):
        raise
    _missing = exc

    class NatsTransport:  # type: ignore[no-redef]
        """Stands in when nats-py is missing, to say how to get it."""

        def __init__(self, url: str, **options: object) -> None:
            raise ConfigurationError(
                "the nats:// transport needs nats-py: pip install 'pigeon-mq[nats]'"
            ) from _missing


__all__ = ["NatsTransport"]
