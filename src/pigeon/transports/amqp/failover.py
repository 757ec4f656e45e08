"""Several nodes of one RabbitMQ cluster behind one connection.

``amqp://user:pw@n1:5672,n2:5672,n3:5672/vhost`` names three nodes that
share the login, virtual host and query. The connection takes the first
that answers; when it is lost, every reconnect attempt goes to the next node
in turn (the one lost last), so a client on a node that died carries on from
another. aio-pika's robust connection reconnects to one address only; the
hook used here is the one method it calls for each attempt.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from aio_pika import RobustConnection
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from yarl import URL

from ...errors import ConfigurationError

# RobustConnection.__connect_transport, as Python names it outside its class:
# called once per connection attempt, first and after every loss.
_ATTEMPT = "_RobustConnection__connect_transport"
SUPPORTED = hasattr(RobustConnection, _ATTEMPT)


def split_hosts(url: str) -> tuple[str, list[str]]:
    """``scheme://[login@]h1[:p1],h2[:p2]…[/vhost][?query]`` into the URL of
    the first node and the ``host[:port]`` of the others (none: ``[]``).

    Raises:
        ConfigurationError: an empty host between the commas.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url, []
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    cut = min(ends, default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    login, at, hosts = netloc.rpartition("@")
    first, *others = hosts.split(",")
    if not others:
        return url, []
    if not first or not all(others):
        raise ConfigurationError(f"an empty host in {scheme}://{hosts}{tail.partition('?')[0]}")
    return f"{scheme}://{login}{at}{first}{tail}", others


def node_urls(first: URL, others: Sequence[str]) -> list[URL]:
    """``first`` and, for each ``host[:port]`` of ``others``, the same URL
    (login, virtual host, query) on that node.

    Raises:
        ConfigurationError: a host that is not ``HOST`` or ``HOST:PORT``, or
            aio-pika has no per-attempt hook to change node with.
    """
    urls = [first]
    for other in others:
        try:
            node = URL(f"{first.scheme}://{other}")
            port = node.port
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"{other!r} is not a HOST:PORT of a node: {exc}") from None
        if not node.host or node.path not in ("", "/") or node.user is not None:
            raise ConfigurationError(f"{other!r} is not a HOST:PORT of a node")
        urls.append(first.with_host(node.host).with_port(port))
    if len(urls) > 1 and not SUPPORTED:
        raise ConfigurationError(
            "several nodes need an aio-pika whose RobustConnection reconnects through "
            f"{_ATTEMPT.replace('_RobustConnection', '')}: upgrade aio-pika (10.x has it)"
        )
    return urls


def address(first: str, others: Sequence[str]) -> str:
    """The address shown in messages: ``amqp://n1:5672,n2:5672/vhost``."""
    if not others:
        return first
    scheme, _, rest = first.partition("://")
    host, slash, tail = rest.partition("/")
    return f"{scheme}://{','.join([host, *others])}{slash}{tail}"


class FailoverConnection(RobustConnection):
    """A robust connection that tries the next node on each attempt.

    Args:
        urls: the nodes, tried in this order, round and round.
        kwargs: what :class:`aio_pika.RobustConnection` takes.
    """

    def __init__(self, urls: Sequence[URL], **kwargs: Any) -> None:
        super().__init__(urls[0], **kwargs)
        self.node_urls = list(urls)
        self._turn = 0

    async def _RobustConnection__connect_transport(self) -> None:
        # Read by Connection.connect for this attempt (and by str() for logs).
        self.url = self.node_urls[self._turn % len(self.node_urls)]
        self._turn += 1
        await getattr(super(), _ATTEMPT)()


async def connect(urls: Sequence[URL], *, timeout: float, **kwargs: Any) -> FailoverConnection:
    """Connect to the first of ``urls`` that answers (each tried once, in
    order); reconnects later go round all of them.

    Raises:
        what aio-pika raises for the last node tried (the caller maps it).
    """
    for start in range(len(urls)):
        connection = FailoverConnection([*urls[start:], *urls[:start]], **kwargs)
        try:
            await connection.connect(timeout=timeout)
        except CONNECTION_EXCEPTIONS:
            # aio-pika gives up on the first failure of a first connect
            # (fail fast); the next node gets a connection of its own.
            with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                await connection.close()
            if start == len(urls) - 1:
                raise
            continue
        return connection
    raise AssertionError("unreachable: urls is never empty")
