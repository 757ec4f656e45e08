"""Operate a pigeon system: its queues, services, peers and dead letters,
on every transport, through the system's own API.

>>> async def show(url):                                   # doctest: +SKIP
...     async with await open_admin(url) as admin:
...         for name, row in (await admin.queues()).items():
...             print(name, row["ready"], row["in_flight"], row["dead"])

The backend is chosen by the URL's scheme: tcp://, ipc://, inproc:// ask a
brokerless node's admin services (``pigeon.info``, ``pigeon.dead``,
``pigeon.replay``, ``pigeon.purge``: the ACL's admin grant); memory:// reads
the in-process broker of this process; nats:// asks the JetStream API;
amqp:// uses AMQP methods only (see docs/operations.md for what each knows).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .base import QUEUE_FIELDS, SERVICE_FIELDS, Admin, QueueRow, ServiceRow
from .errors import NotSupported, Unreachable

__all__ = [
    "QUEUE_FIELDS",
    "SERVICE_FIELDS",
    "Admin",
    "NotSupported",
    "QueueRow",
    "ServiceRow",
    "Unreachable",
    "open_admin",
]

ZMQ_SCHEMES = ("tcp", "ipc", "inproc")


async def open_admin(url: str, *, timeout: float = 3.0, **connect_options: Any) -> Admin:
    """Open an admin session on the system at ``url``.

    Args:
        url: ``tcp://``, ``ipc://``, ``inproc://`` (a pigeon node),
            ``memory://NAME``, ``nats://…`` or ``amqp://…``.
        timeout: seconds to wait for the system to answer, here and for each
            call on the session.
        connect_options: keywords for the connection (``key``,
            ``server_key`` on a node with CURVE keys; ``queues``: the queue
            names to show on RabbitMQ beside its inventory).

    Raises:
        Unreachable: nothing answers at ``url``.
        ConfigurationError: an unknown scheme or a bad option.
    """
    scheme = url.partition("://")[0]
    if scheme in ZMQ_SCHEMES:
        from .node import NodeAdmin

        return await NodeAdmin.open(url, timeout=timeout, **connect_options)
    if scheme == "memory":
        from .memory import MemoryAdmin

        return await MemoryAdmin.open(url, timeout=timeout, **connect_options)
    if scheme in ("nats", "tls"):  # tls://: NATS over TLS
        from .nats import NatsAdmin

        return await NatsAdmin.open(url, timeout=timeout, **connect_options)
    if scheme in ("amqp", "amqps"):
        from .amqp import AmqpAdmin

        return await AmqpAdmin.open(url, timeout=timeout, **connect_options)
    raise ConfigurationError(f"no admin backend for {scheme}:// (in {url!r})")
