"""Bridges between pigeon and plain ZeroMQ peers (the seed's own programs).

On the plain side a message is its body as one frame, as the seed's sockets
send and expect it; on the pigeon side it is an ordinary message with a
``bytes`` body. Four kinds, each named by the plain socket it faces:

======  ===========================  =============================  =========
kind    spec                         does                           default
======  ===========================  =============================  =========
pull    ``URL=QUEUE``                plain PUSH peer → queue        connect
push    ``URL=QUEUE``                queue → plain PULL peers       bind
rep     ``SERVICE=URL[,URL...]``     service → plain REP servers    connect
req     ``URL=SERVICE``              plain REQ clients → service    bind
======  ===========================  =============================  =========

A ``bind:`` or ``connect:`` prefix on a URL overrides the default. Each
bridge class states its guarantee; all count ``received``, ``passed``,
``malformed`` and ``dropped`` (``stats()``), and hold a bounded number of
messages in flight. See docs/bridges.md.

Example::

    async with pigeon.connect("tcp://127.0.0.1:5555") as conn:
        async with pigeon.bridge.open_bridge(conn, "pull", "tcp://127.0.0.1:6700=words"):
            ...
"""

from __future__ import annotations

from typing import Any

from .._core.bridging import BridgeSpec, Endpoint, Kind, parse_endpoint, parse_spec
from ..errors import ConfigurationError
from .base import ERROR_PREFIX, PlainBridge
from .pull import PullBridge
from .push import PushBridge
from .rep import RepBridge
from .req import ReqBridge

KINDS: dict[Kind, type[PlainBridge]] = {
    Kind.PULL: PullBridge,
    Kind.PUSH: PushBridge,
    Kind.REP: RepBridge,
    Kind.REQ: ReqBridge,
}


def open_bridge(conn: Any, kind: str | Kind, spec: str | BridgeSpec, **options: Any) -> PlainBridge:
    """A bridge of ``kind`` (``"pull"``, ``"push"``, ``"rep"``, ``"req"``) on
    ``conn``; start it with ``async with`` or ``await bridge.start()``.

    Args:
        conn: a started :class:`pigeon.Connection` (the pigeon side).
        kind: the bridge's kind.
        spec: as on the command line (``"tcp://127.0.0.1:6700=words"``), or parsed.
        options: ``max_in_flight`` and a shared ``context`` (a ``zmq.asyncio.Context``).

    Raises:
        ConfigurationError: unknown kind, or a spec that does not parse.
    """
    try:
        kind = Kind(kind)
    except ValueError:
        raise ConfigurationError(
            f"no bridge kind {kind!r}; the kinds are {', '.join(k.value for k in Kind)}"
        ) from None
    if isinstance(spec, str):
        spec = parse_spec(kind, spec)
    elif spec.kind is not kind:
        raise ConfigurationError(f"a {spec.kind.value} spec given for a {kind.value} bridge")
    return KINDS[kind](conn, spec, **options)


__all__ = [
    "ERROR_PREFIX",
    "BridgeSpec",
    "Endpoint",
    "Kind",
    "PlainBridge",
    "PullBridge",
    "PushBridge",
    "RepBridge",
    "ReqBridge",
    "open_bridge",
    "parse_endpoint",
    "parse_spec",
]
