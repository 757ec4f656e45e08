"""Transports, chosen by URL scheme and imported only when used."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigurationError
from .base import ConsumeOptions, Delivery, SubscribeOptions, Subscription, Transport

__all__ = [
    "ConsumeOptions",
    "Delivery",
    "SubscribeOptions",
    "Subscription",
    "Transport",
    "open_transport",
]

ZMQ_SCHEMES = ("inproc", "ipc", "tcp")
SCHEMES = ("memory", *ZMQ_SCHEMES, "nats", "tls", "amqp", "amqps")
_FAMILIES = {"tls": "nats", "amqps": "amqp"}  # over TLS, the same transport


def masked(url: str) -> str:
    """``url`` without the secrets it may carry (``user:password@``, ``token@``,
    and the query string), for messages."""
    scheme, sep, rest = url.partition("://")
    where, _, _query = rest.partition("?")
    login, at, host = where.rpartition("@")
    if at:
        user = login.partition(":")[0] if ":" in login else ""
        where = f"{user + ':' if user else ''}***@{host}"
    return f"{scheme}{sep}{where}" if sep else "***"


def _scheme(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"a URL must be a str, not {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(
            f"{masked(url)!r} is not a URL; expected SCHEME://ADDRESS with SCHEME one of "
            f"{', '.join(SCHEMES)}"
        )
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"unknown URL scheme {scheme!r} in {masked(url)!r}; pigeon knows {', '.join(SCHEMES)}"
        )
    if scheme in ("tcp", "ipc", "inproc") and not rest:
        raise ConfigurationError(f"{url!r} has no address")
    return scheme


def open_transport(connect: list[str], bind: list[str], **options: Any) -> Transport:
    """Make (not start) the transport for these URLs.

    A ZeroMQ node may be given ``discover=`` (a source of addresses to
    connect to) instead of, or besides, URLs.

    Raises:
        ConfigurationError: unknown scheme, mixed families, or an option the
            chosen transport does not take.
    """
    discovers = options.get("discover") is not None
    if not connect and not bind and not discovers:
        raise ConfigurationError("give at least one URL to connect to or to bind, or discover=")
    schemes = {_scheme(u) for u in [*connect, *bind]}
    family = {"zmq" if s in ZMQ_SCHEMES else _FAMILIES.get(s, s) for s in schemes}
    if len(family) > 1:
        raise ConfigurationError(f"cannot mix URL schemes {sorted(schemes)} in one connection")
    (kind,) = family or {"zmq"}
    if discovers and kind != "zmq":
        raise ConfigurationError(
            f"discover= finds ZeroMQ nodes; {kind}:// finds its servers itself"
        )
    if kind != "zmq" and bind:
        raise ConfigurationError(f"bind= is for ZeroMQ addresses; {kind}:// connects to a server")
    if kind != "zmq" and len(connect) != 1:
        raise ConfigurationError(f"{kind}:// takes exactly one URL")
    try:
        if kind == "memory":
            from .memory import MemoryTransport

            return MemoryTransport(connect[0], **options)
        if kind == "zmq":
            from .zmq import ZmqTransport

            return ZmqTransport(connect, bind, **options)
        if kind == "nats":
            from .nats import NatsTransport

            return NatsTransport(connect[0], **options)
        from .amqp import AmqpTransport

        return AmqpTransport(connect[0], **options)
    except TypeError as exc:
        raise ConfigurationError(f"{kind} transport: {exc}") from exc
