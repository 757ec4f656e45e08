"""The options of the ``nats://`` transport, from keywords or the URL's query."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ...errors import ConfigurationError

_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SECONDS = ("send_timeout", "ack_timeout", "pull_expires", "connect_timeout", "duplicate_window")
_SERVER_SCHEMES = ("nats", "tls", "ws", "wss")  # what nats-py connects to


@dataclass(slots=True)
class NatsOptions:
    """What a ``nats://`` connection can be told.

    Attributes:
        stream: the JetStream stream holding pigeon's queues.
        prefix: first subject token(s): queues are ``<prefix>.q.<queue>``,
            services ``<prefix>.svc.<service>``.
        max_message_size: largest body sent, in bytes (None: 1 MiB, or the
            server's ``max_payload`` if smaller); not above ``max_payload``.
        send_timeout: seconds a send keeps being retried (same message id, so
            JetStream drops duplicates) before its future fails.
        ack_timeout: seconds one publish waits for JetStream's pub ack.
        pull_expires: seconds a worker's pull request waits on an empty queue.
        max_ack_pending: JetStream's limit on unacked messages of one queue,
            over all its workers (raised to ``prefetch`` when lower).
        duplicate_window: seconds JetStream remembers ids to drop resends
            (used when pigeon creates the stream).
        connect_timeout: seconds to reach a server at start.
        reconnect_wait: seconds between reconnect attempts (which go on for ever).
        outbox_limit: sends awaiting their pub ack before ``send_nowait``
            raises Backpressure.
        name: the connection's name, shown in the server's monitoring.
    """

    stream: str = "PIGEON_Q"
    prefix: str = "pigeon"
    max_message_size: int | None = None
    send_timeout: float = 30.0
    ack_timeout: float = 5.0
    pull_expires: float = 5.0
    max_ack_pending: int = 10_000
    duplicate_window: float = 120.0
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.25
    outbox_limit: int = 100_000
    name: str | None = None

    def check(self) -> None:
        """Raises:
        ConfigurationError: a value that cannot work.
        """
        if not isinstance(self.stream, str) or not _STREAM_NAME.match(self.stream):
            raise ConfigurationError(f"stream name {self.stream!r}: use letters, digits, '-', '_'")
        if not isinstance(self.prefix, str) or not _PREFIX.match(self.prefix):
            raise ConfigurationError(f"subject prefix {self.prefix!r}: use literal subject tokens")
        for name in (*_SECONDS, "reconnect_wait"):
            value = getattr(self, name)
            if not _number(value) or not 0 < value < math.inf:
                raise ConfigurationError(f"{name} must be > 0 seconds, not {value!r}")
        for name in ("max_message_size", "max_ack_pending", "outbox_limit"):
            value = getattr(self, name)
            if value is not None and (not _number(value, int) or value < 1):
                raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigurationError(f"name must be a str, not {self.name!r}")


def _number(value: object, kind: type | tuple[type, ...] = (int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def check_server(server: str) -> None:
    """Raises:
    ConfigurationError: ``server`` is not a URL nats-py can connect to.
    """
    url = server if "://" in server else f"nats://{server}"  # as nats-py reads it
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsing it is the check: a bad port raises)
    except ValueError as exc:
        raise ConfigurationError(f"{server!r} is not a valid NATS server URL: {exc}") from exc
    if parts.scheme not in _SERVER_SCHEMES or not parts.hostname:
        raise ConfigurationError(f"{server!r} is not a NATS server URL (nats://HOST:PORT)")


def parse(url: str, keywords: dict[str, Any]) -> tuple[list[str], NatsOptions]:
    """Split ``url`` into server URLs and options (the query's win over keywords).

    Raises:
        ConfigurationError: an unknown option, or a value that cannot work.
    """
    servers, _, query = url.partition("?")
    known = {f.name: f for f in fields(NatsOptions)}
    options = dict(keywords)
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in known:
            options[key] = value  # reported below with the unknown keywords
            continue
        kind = str(known[key].type)
        try:
            if "int" in kind:
                options[key] = int(value)
            elif "float" in kind:
                options[key] = float(value)
            else:
                options[key] = value
        except ValueError as exc:
            raise ConfigurationError(f"nats:// option {key}={value!r} is not a number") from exc
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigurationError(
            f"unknown nats:// option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    result = NatsOptions(**options)
    result.check()
    urls = [s.strip() for s in servers.split(",") if s.strip()]
    if not urls:
        raise ConfigurationError(f"{url!r} names no NATS server")
    for server in urls:
        check_server(server)
    return urls, result
