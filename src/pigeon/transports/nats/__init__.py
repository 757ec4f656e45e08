"""The ``nats://`` transport (needs nats-py: ``pip install 'pigeon-queues[nats]'``).

nats-py is optional; without it, asking for a ``nats://`` URL raises
:class:`~pigeon.errors.ConfigurationError` that says what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._extras import missing_transport

if TYPE_CHECKING:
    from .transport import NatsTransport
else:
    try:
        from .transport import NatsTransport
    except ImportError as exc:  # only nats-py is optional here
        if exc.name is None or not exc.name.startswith("nats"):
            raise
        NatsTransport = missing_transport("nats-py", "nats", exc)


__all__ = ["NatsTransport"]
