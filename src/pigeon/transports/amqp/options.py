"""The options of the ``amqp://`` and ``amqps://`` transport, checked
before anything connects."""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, fields
from typing import Any

from yarl import URL

from ...errors import ConfigurationError
from . import failover
from .security import QUERY_NAMES, UNSUPPORTED_QUERY, TlsSettings, verify_flag
from .topology import QUEUE_TYPES

SCHEMES = ("amqp", "amqps")
# Keywords of pigeon.connect() that are not AmqpOptions fields.
_TLS_KEYWORDS = ("ca_file", "cert_file", "key_file", "server_hostname", "verify", "ssl_context")
_LOGIN_KEYWORDS = ("user", "password")

DEFAULT_MAX_MESSAGE_SIZE = 16 << 20  # RabbitMQ 4.x's own default max_message_size
MAX_PREFETCH = 65535  # basic.qos prefetch-count is a 16-bit field

# Options other pigeon transports take that have no meaning here.
_NOT_HONOURED = {
    "max_length": "set a queue length limit with a RabbitMQ policy (max-length) instead",
    "lease_ttl": "pass lease_ttl to consume(); the broker has no transport-wide lease",
    "heartbeat_misses": "AMQP heartbeats are negotiated with the broker; use heartbeat",
    "connect_grace": "the broker knows its consumers; there is no handshake to wait for",
}


@dataclass(frozen=True, slots=True)
class AmqpOptions:
    """What an ``amqp://`` connection can be told (see ``AmqpTransport``).

    Attributes:
        address: the URL without user, password and query, for messages
            and errors.
        tls: the TLS settings (``amqps://`` only).
        max_message_size: largest body accepted, in bytes.
        queue_type: ``quorum`` or ``classic`` for work queues.
        reconnect_interval: seconds between reconnect attempts.
        heartbeat: AMQP heartbeat in seconds (None: the broker's choice).
        connect_timeout: seconds to wait for the first connection.
        outbox_limit: unconfirmed sends before ``send_nowait`` raises Backpressure.
        service_prefetch: requests one server handles at once per service.
    """

    address: str
    tls: TlsSettings | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    queue_type: str = "quorum"
    reconnect_interval: float = 1.0
    heartbeat: float | None = None
    connect_timeout: float = 5.0
    outbox_limit: int = 100_000
    service_prefetch: int = 64


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(url: str, options: dict[str, Any]) -> tuple[AmqpOptions, list[URL]]:
    """Check ``url`` and ``options``.

    Returns:
        The options, and the URLs for the client library, one per node
        (``amqp://h1:5672,h2:5672/`` names two): TLS settings taken out of
        the query (pigeon makes the SSL context), ``user`` and ``password``
        put in if given as options.

    Raises:
        ConfigurationError: an unknown option, one this transport cannot
            honour, a value that cannot work, a TLS file that cannot be used,
            TLS settings on ``amqp://``, or a URL that is not ``amqp[s]://HOST``.
    """
    options = dict(options)
    tls_options = {k: options.pop(k) for k in _TLS_KEYWORDS if k in options}
    login = {k: options.pop(k) for k in _LOGIN_KEYWORDS if k in options}
    defaults = AmqpOptions(address="")
    known = {f.name for f in fields(AmqpOptions)} - {"address", "tls"}
    for name in options:
        if name not in known:
            names = sorted([*known, *_TLS_KEYWORDS, *_LOGIN_KEYWORDS])
            why = _NOT_HONOURED.get(
                name, f"it is not an option of this transport; known: {', '.join(names)}"
            )
            raise ConfigurationError(f"amqp transport cannot honour {name}=: {why}")
    queue_type = options.get("queue_type", defaults.queue_type)
    if queue_type not in QUEUE_TYPES:
        raise ConfigurationError(f"queue_type must be one of {QUEUE_TYPES}, not {queue_type!r}")
    for name in ("max_message_size", "outbox_limit", "service_prefetch"):
        value = options.get(name, getattr(defaults, name))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
    if options.get("service_prefetch", defaults.service_prefetch) > MAX_PREFETCH:
        raise ConfigurationError(f"service_prefetch must be <= {MAX_PREFETCH}")
    for name in ("reconnect_interval", "connect_timeout"):
        number = options.get(name, getattr(defaults, name))
        if not _number(number) or not 0 < number < math.inf:
            raise ConfigurationError(f"{name} must be a positive number of seconds")
    heartbeat = options.get("heartbeat")
    if heartbeat is not None and (not _number(heartbeat) or not 0 <= heartbeat < math.inf):
        raise ConfigurationError(
            f"heartbeat must be a number of seconds >= 0 (or None), not {heartbeat!r}"
        )
    first, others = failover.split_hosts(url)
    parsed = _parse_url(first)
    # For messages and errors: never the password (nor the query's paths).
    address = failover.address(
        str(parsed.with_user(None).with_password(None).with_query(None)), others
    )
    parsed = _with_login(parsed, login)
    tls, parsed = _tls(parsed, tls_options, address)
    values: dict[str, Any] = dict(options)
    for name in ("reconnect_interval", "connect_timeout"):
        if name in values:
            values[name] = float(values[name])
    return AmqpOptions(address=address, tls=tls, **values), failover.node_urls(parsed, others)


def _parse_url(url: str) -> URL:
    try:
        parsed = URL(url)
        parsed.port  # noqa: B018  (reading it is the check: a bad port raises)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{_shown(url)!r} is not a valid amqp:// URL: {exc}") from None
    if parsed.scheme not in SCHEMES or not parsed.host:
        raise ConfigurationError(f"{_shown(url)!r} is not an amqp://HOST or amqps://HOST URL")
    return parsed


def _shown(url: str) -> str:
    """``url`` with anything between ``://`` and ``@`` masked, for an error
    about a URL too broken to parse."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{host}"
    return f"{scheme}{sep}{netloc}{slash}{path}"


def _with_login(parsed: URL, login: dict[str, Any]) -> URL:
    if not login:
        return parsed
    user, password = login.get("user"), login.get("password")
    for name, value in (("user", user), ("password", password)):
        if not isinstance(value, str) or not value:
            # A password's value is not shown, even a wrong one.
            shown = f", not {value!r}" if name == "user" else ""
            raise ConfigurationError(f"{name} must be a non-empty str{shown}")
    if parsed.user is not None or parsed.password is not None:
        raise ConfigurationError(
            "credentials are given both in the URL and as options: give them once"
        )
    return parsed.with_user(user).with_password(password)


def _tls(parsed: URL, keywords: dict[str, Any], address: str) -> tuple[TlsSettings | None, URL]:
    """The TLS settings from the keywords and the URL's query (which wins),
    and the URL without them.

    Raises:
        ConfigurationError: TLS settings on amqp://, a value that cannot
            work, or a file that cannot be used.
    """
    settings: dict[str, Any] = {}
    for name, value in keywords.items():
        key = "context" if name == "ssl_context" else name
        settings[key] = value
    rest: list[tuple[str, str]] = []
    for key, value in parsed.query.items():
        if key in UNSUPPORTED_QUERY:
            raise ConfigurationError(f"{key}= in the URL: {UNSUPPORTED_QUERY[key]}")
        setting = QUERY_NAMES.get(key)
        if setting is None:
            rest.append((key, value))  # for aiormq: heartbeat, name, auth...
        elif setting == "verify":
            settings["verify"] = verify_flag(key, value)
        else:
            settings[setting] = value
    if parsed.scheme == "amqp":
        if settings:
            raise ConfigurationError(
                f"TLS settings ({', '.join(sorted(settings))}) on {address}: use amqps:// "
                "(RabbitMQ's TLS port is usually 5671)"
            )
        return None, parsed.with_query(rest)
    for name in ("ca_file", "cert_file", "key_file", "server_hostname"):
        value = settings.get(name)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigurationError(f"{name} must be a non-empty str, not {value!r}")
    verify = settings.get("verify", True)
    if not isinstance(verify, bool):
        raise ConfigurationError(f"verify must be True or False, not {verify!r}")
    context = settings.get("context")
    if context is not None:
        if not isinstance(context, ssl.SSLContext):
            raise ConfigurationError(
                f"ssl_context must be an ssl.SSLContext, not {type(context).__name__}"
            )
        if any(
            k in settings for k in ("ca_file", "cert_file", "key_file", "verify", "server_hostname")
        ):
            raise ConfigurationError(
                "give either ssl_context= or the TLS settings (ca_file, cert_file, key_file, "
                "server_hostname, verify), not both"
            )
    return TlsSettings(**settings), parsed.with_query(rest)
