"""The options of the ``nats://`` transport, from keywords or the URL's query."""

from __future__ import annotations

import importlib.util
import math
import re
import ssl
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ...errors import ConfigurationError
from . import security

_STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,200}$")
_PREFIX = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_SECONDS = ("send_timeout", "ack_timeout", "pull_expires", "connect_timeout", "duplicate_window")
_SERVER_SCHEMES = ("nats", "tls", "ws", "wss")  # what nats-py connects to
MAX_REPLICAS = 5  # JetStream's own limit on a stream's replicas
# pigeon's names for the TLS files, the same on every transport.
ALIASES = {"ca_file": "tls_ca", "cert_file": "tls_cert", "key_file": "tls_key"}
_STRINGS = (
    "name",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_hostname",
    "user",
    "password",
    "token",
    "nkeys_seed",
    "user_credentials",
)


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
        replicas: copies of the stream JetStream keeps on different servers
            of a cluster, 1 to 5 (used when pigeon creates the stream; an
            existing stream with fewer is refused). 3 survives the loss of
            any one server.
        connect_timeout: seconds to reach a server at start.
        reconnect_wait: seconds between reconnect attempts (which go on for ever).
        outbox_limit: sends awaiting their pub ack before ``send_nowait``
            raises Backpressure.
        name: the connection's name, shown in the server's monitoring.
        tls_ca: CA file (PEM) the server's certificate must chain to (alias
            ``ca_file``); None: the system's CAs. Any ``tls_*`` option makes
            TLS required.
        tls_cert: client certificate (PEM) for servers that verify clients
            (alias ``cert_file``); may hold the key too.
        tls_key: the client certificate's private key (alias ``key_file``).
        tls_hostname: the name the server's certificate must carry, when it
            is not the host in the URL.
        tls: a ready :class:`ssl.SSLContext` instead of the ``tls_*`` files.
        user: user name, with ``password`` (or ``user:password@`` in the URL).
        password: the user's password; never shown.
        token: an authentication token (or ``token@`` in the URL); never shown.
        nkeys_seed: path of an nkey seed file (``SU...``), to sign the
            server's nonce; needs the ``nkeys`` package.
        user_credentials: path of a ``.creds`` file (user JWT and nkey
            seed), for servers in operator mode; needs ``nkeys``.
    """

    stream: str = "PIGEON_Q"
    prefix: str = "pigeon"
    max_message_size: int | None = None
    send_timeout: float = 30.0
    ack_timeout: float = 5.0
    pull_expires: float = 5.0
    max_ack_pending: int = 10_000
    duplicate_window: float = 120.0
    replicas: int = 1
    connect_timeout: float = 2.0
    reconnect_wait: float = 0.25
    outbox_limit: int = 100_000
    name: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_hostname: str | None = None
    tls: ssl.SSLContext | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkeys_seed: str | None = None
    user_credentials: str | None = None

    @property
    def wants_tls(self) -> bool:
        """Was TLS asked for by an option (a ``tls://`` URL asks too)?"""
        return self.tls is not None or any(
            v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key, self.tls_hostname)
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The context for TLS (None: nats-py's default, the system's CAs).

        Raises:
            ConfigurationError: a TLS file cannot be used.
        """
        if self.tls is not None:
            return self.tls
        if self.tls_ca is None and self.tls_cert is None and self.tls_key is None:
            return None
        return security.client_context(self.tls_ca, self.tls_cert, self.tls_key)

    def credentials(self) -> dict[str, Any]:
        """The login keywords for ``nats.connect`` (none: the URL's, if any)."""
        given = {
            "user": self.user,
            "password": self.password,
            "token": self.token,
            "nkeys_seed": self.nkeys_seed,
            "user_credentials": self.user_credentials,
        }
        return {k: v for k, v in given.items() if v is not None}

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
        if not _number(self.replicas, int) or not 1 <= self.replicas <= MAX_REPLICAS:
            raise ConfigurationError(
                f"replicas must be an int from 1 to {MAX_REPLICAS} (JetStream's limit), "
                f"not {self.replicas!r}"
            )
        for name in _STRINGS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                # A secret's value is not shown, even a wrong one.
                shown = "" if name in ("password", "token") else f", not {value!r}"
                raise ConfigurationError(f"{name} must be a non-empty str{shown}")
        if self.tls is not None:
            if not isinstance(self.tls, ssl.SSLContext):
                raise ConfigurationError(f"tls must be an ssl.SSLContext, not {type(self.tls)}")
            if any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key)):
                raise ConfigurationError(
                    "give either tls= (a context) or the tls_* files, not both"
                )
        if (self.user is None) != (self.password is None):
            raise ConfigurationError("user and password go together: give both or neither")
        logins = [
            name
            for name, value in (
                ("user/password", self.user),
                ("token", self.token),
                ("nkeys_seed", self.nkeys_seed),
                ("user_credentials", self.user_credentials),
            )
            if value is not None
        ]
        if len(logins) > 1:
            raise ConfigurationError(f"give one way to log in, not {' and '.join(logins)}")
        for name, what in (("nkeys_seed", "nkey seed file"), ("user_credentials", ".creds file")):
            path = getattr(self, name)
            if path is not None:
                security.check_file(path, f"{name} ({what})")
                if importlib.util.find_spec("nkeys") is None:
                    raise ConfigurationError(
                        f"{name} needs the nkeys package: pip install nkeys "
                        "(or pip install 'nats-py[nkeys]')"
                    )


def _number(value: object, kind: type | tuple[type, ...] = (int, float)) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def check_server(server: str) -> None:
    """Raises:
    ConfigurationError: ``server`` is not a URL nats-py can connect to.
    """
    url = server if "://" in server else f"nats://{server}"  # as nats-py reads it
    shown = security.redact_server(server)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (parsing it is the check: a bad port raises)
    except ValueError as exc:
        raise ConfigurationError(f"{shown!r} is not a valid NATS server URL: {exc}") from None
    if parts.scheme not in _SERVER_SCHEMES or not parts.hostname:
        raise ConfigurationError(f"{shown!r} is not a NATS server URL (nats://HOST:PORT)")


def parse(url: str, keywords: dict[str, Any]) -> tuple[list[str], NatsOptions]:
    """Split ``url`` into server URLs and options (the query's win over keywords).

    Raises:
        ConfigurationError: an unknown option, or a value that cannot work.
    """
    servers, _, query = url.partition("?")
    known = {f.name: f for f in fields(NatsOptions)}
    options = _canonical(keywords)
    for key, value in parse_qsl(query, keep_blank_values=True):
        key = ALIASES.get(key, key)
        if key == "tls":
            raise ConfigurationError("tls= takes an ssl.SSLContext: give it as a keyword")
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
        names = sorted([*known, *ALIASES])
        raise ConfigurationError(
            f"unknown nats:// option(s) {', '.join(unknown)}; known: {', '.join(names)}"
        )
    result = NatsOptions(**options)
    result.check()
    urls = [s.strip() for s in servers.split(",") if s.strip()]
    if not urls:
        raise ConfigurationError(f"{security.redact(url)!r} names no NATS server")
    for server in urls:
        check_server(server)
    if result.credentials() and any(security.has_userinfo(s) for s in urls):
        raise ConfigurationError(
            "credentials are given both in the URL and as options: give them once"
        )
    return urls, result


def _canonical(keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords with pigeon's aliases (``ca_file``...) as nats-py's names.

    Raises:
        ConfigurationError: an option is given under both of its names.
    """
    options: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in keywords.items():
        name = ALIASES.get(key, key)
        if name in options:
            raise ConfigurationError(f"{given[name]}= and {key}= are the same option: give one")
        options[name] = value
        given[name] = key
    return options
