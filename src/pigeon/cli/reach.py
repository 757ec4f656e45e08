"""Opening the connection a message command uses, and telling "nothing is
there" (exit 69) apart from "it is there and said no" (exit 1).

A broker URL with no broker fails in ``start``. A ZeroMQ URL does not: the
socket connects in the background, so the command waits, within its
``--timeout``, until a link to the node is up before it sends anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import pigeon

from ..admin.reach import refused_at
from ..transports import ZMQ_SCHEMES
from .exits import Unreachable
from .options import connect_options

# How often the link table is read while waiting for a ZeroMQ handshake: a
# few reads per handshake on loopback, negligible against any --timeout.
_LINK_POLL = 0.02


def address(url: str) -> str:
    """``url`` as said in a message: without user and password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _is_zmq(url: str) -> bool:
    return url.partition("://")[0] in ZMQ_SCHEMES


def _linked(conn: pigeon.Connection) -> bool:
    links = conn.stats().get("links", {})
    return any(link.get("up") for link in links.values())


@asynccontextmanager
async def open_connection(
    url: str, *, timeout: float, key: str | None = None, server_key: str | None = None
) -> AsyncIterator[pigeon.Connection]:
    """A started connection to ``url``, closed on leaving.

    Raises:
        Unreachable: nothing answered at ``url`` within ``timeout``, or an
            operation in the block failed because every link of a ZeroMQ
            URL is down (the node went away).
        ConfigurationError: the URL or a key option is unusable.
    """
    if url.startswith("inproc://"):
        # Only the process that binds it can reach it; a command does not.
        raise Unreachable(address(url), "an inproc:// address is reached only from its own process")
    refused = refused_at(url)
    if refused:
        raise Unreachable(address(url), refused)
    for name in ("aio_pika", "aiormq"):
        # They log a refused connection themselves; the command says it once.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    conn = pigeon.connect(url, **connect_options(key, server_key))
    try:
        await asyncio.wait_for(conn.start(), timeout)
    except pigeon.TransportError as exc:
        raise Unreachable(address(url), _why(exc)) from exc
    except TimeoutError as exc:
        raise Unreachable(address(url), f"no answer within {timeout:g} s") from exc
    try:
        if _is_zmq(url):
            await _wait_for_link(conn, url, timeout)
        try:
            yield conn
        except pigeon.PigeonError as exc:
            _raise_if_gone(conn, url, exc)
            raise
    finally:
        # Bounded: a close that cannot confirm what is pending gives up.
        await conn.close(min(timeout, 5.0))


async def _wait_for_link(conn: pigeon.Connection, url: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not _linked(conn):
        if loop.time() >= deadline:
            raise Unreachable(address(url), f"no pigeon node answered within {timeout:g} s")
        await asyncio.sleep(_LINK_POLL)


def _raise_if_gone(conn: pigeon.Connection, url: str, exc: Exception) -> None:
    """Raise ``Unreachable`` for ``exc``, an operation's failure, when it
    failed because a ZeroMQ URL's every link is down (the node went away);
    else return, for the caller to re-raise ``exc``."""
    if (
        isinstance(exc, (pigeon.Timeout, pigeon.TransportError, pigeon.NoResponders))
        and _is_zmq(url)
        and not _linked(conn)
    ):
        raise Unreachable(address(url), _why(exc)) from exc


def _why(exc: BaseException) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("connect to ") and ": " in text else text
