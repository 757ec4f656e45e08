"""TLS and credentials for ``nats://`` and ``tls://``: the client's SSL
context, what nats-py is told to log in with, and URLs with their secrets
masked for every message, log line and ``repr``.

Secrets are a URL's user information (``user:password@`` or a token as
``token@``), and the ``password`` and ``token`` options, in keywords or in
the query string. File paths (CA, certificate, key, nkey seed, ``.creds``)
are not secrets and are shown; their contents never are.
"""

from __future__ import annotations

import os
import re
import ssl
from urllib.parse import urlsplit

from ...errors import ConfigurationError
from ..tls import TlsOptionNames
from ..tls import tls_problem as diagnose

MASK = "***"
_SECRET_QUERY = re.compile(r"(?i)(^|[?&])(password|pass|token)=[^&]*")


def redact_server(server: str) -> str:
    """``server`` with its user information masked: ``nats://user:***@host``,
    or ``nats://***@host`` for a token (a user name alone is a token to NATS).
    """
    scheme, sep, rest = server.partition("://")
    if not sep:
        scheme, rest = "", server
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon else f"{MASK}@{host}"
    return f"{scheme}{sep}{netloc}{slash}{path}"


def redact(url: str) -> str:
    """``url`` (servers separated by commas, then a query) with every
    credential masked."""
    servers, question, query = url.partition("?")
    masked = ",".join(redact_server(s) for s in servers.split(","))
    if question:
        query = _SECRET_QUERY.sub(lambda m: f"{m.group(1)}{m.group(2)}={MASK}", query)
    return f"{masked}{question}{query}"


def has_userinfo(server: str) -> bool:
    netloc = server.partition("://")[2].partition("/")[0] if "://" in server else server
    return "@" in netloc


def uses_tls(server: str) -> bool:
    """Does this server URL ask for TLS by its scheme?"""
    return urlsplit(server if "://" in server else f"nats://{server}").scheme in ("tls", "wss")


def _readable(path: object, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigurationError(f"{what} must be a file path (str), not {path!r}")
    if not os.path.isfile(path):
        raise ConfigurationError(f"{what} {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f"{what} {path!r} cannot be read by this process")
    return path


def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (the system's
    CAs when None) and its host name, and presents ``cert``/``key`` if given.

    Raises:
        ConfigurationError: a file is missing, unreadable or not PEM that
            fits (a key that does not match the certificate, say).
    """
    if key is not None and cert is None:
        raise ConfigurationError("tls_key (key_file) needs tls_cert (cert_file) too")
    try:
        context = ssl.create_default_context(
            cafile=_readable(ca, "tls_ca (ca_file)") if ca is not None else None
        )
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(f"tls_ca (ca_file) {ca!r} holds no usable CA: {exc}") from exc
    if cert is not None:
        _readable(cert, "tls_cert (cert_file)")
        if key is not None:
            _readable(key, "tls_key (key_file)")
        try:
            context.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"cannot use the client certificate {cert!r} with key {key!r}: {exc}"
            ) from exc
    return context


def check_file(path: object, what: str) -> str:
    """Raises:
    ConfigurationError: ``path`` is not a readable file.
    """
    return _readable(path, what)


_NAMES = TlsOptionNames(
    peer="server",
    ca="tls_ca (ca_file)",
    hostname="tls_hostname",
    client_cert="tls_cert (cert_file) and tls_key (key_file)",
)


def tls_problem(exc: BaseException) -> str | None:
    """What went wrong in a TLS handshake with the server (see ``transports.tls``)."""
    return diagnose(exc, _NAMES)
