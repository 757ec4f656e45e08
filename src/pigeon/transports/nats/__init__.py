"""The ``nats://`` transport (needs nats-py: ``pip install 'pigeon-queues[nats]'``).

nats-py is optional; without it, asking for a ``nats://`` URL raises
:class:`~pigeon.errors.ConfigurationError` that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..._extras import install_hint
from ...errors import ConfigurationError


class _NatsMissing:
    """Stands in for the transport when nats-py is missing, to say how to get it.

    Raises:
        ConfigurationError: always; nats-py is not installed.
    """

    import_error: ClassVar[ImportError | None] = None

    def __init__(self, url: str, **options: object) -> None:
        raise ConfigurationError(
            f"the nats:// transport needs nats-py: {install_hint('nats')}"
        ) from self.import_error


if TYPE_CHECKING:
    from .transport import NatsTransport
else:
    try:
        from .transport import NatsTransport
    except ImportError as exc:  # only nats-py is optional here
        if exc.name is None or not exc.name.startswith("nats"):
            raise
        _NatsMissing.import_error = exc
        NatsTransport = _NatsMissing


__all__ = ["NatsTransport"]
