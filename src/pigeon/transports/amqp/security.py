"""TLS and credentials for ``amqps://``: the client's SSL context, the TLS
settings a URL's query may carry (RabbitMQ's and aiormq's names), and TLS
errors in words.

Secrets are the URL's password and the ``password`` option; they never
appear in messages (``address`` is the URL without user, password and
query). File paths (CA, certificate, key) are not secrets.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field

from ...errors import ConfigurationError
from ..tls import TlsOptionNames, causes
from ..tls import tls_problem as diagnose

# URL query names for the TLS settings, as RabbitMQ's URI spec (cacertfile,
# certfile, keyfile, verify, server_name_indication) and aiormq (cafile,
# no_verify_ssl) spell them, and the option each one sets.
QUERY_NAMES = {
    "cacertfile": "ca_file",
    "cafile": "ca_file",
    "ca_certs": "ca_file",
    "certfile": "cert_file",
    "keyfile": "key_file",
    "server_name_indication": "server_hostname",
    "verify": "verify",
    "no_verify_ssl": "verify",
}
# Query names aiormq reads for TLS that pigeon does not take.
UNSUPPORTED_QUERY = {
    "capath": "give the CA as a file: cacertfile=PATH (or ca_file=)",
    "cadata": "give the CA as a file: cacertfile=PATH (or ca_file=)",
}


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """What ``amqps://`` is told about TLS.

    Attributes:
        ca_file: CA file (PEM) the broker's certificate must chain to
            (None: the system's CAs).
        cert_file: client certificate (PEM), for brokers that verify
            clients; may hold the key too.
        key_file: the client certificate's private key.
        server_hostname: the name the broker's certificate must carry, when
            it is not the URL's host (RabbitMQ's ``server_name_indication``).
        verify: check the broker's certificate and host name (False only
            for tests: anyone in the middle can then read everything).
        context: a ready :class:`ssl.SSLContext` instead of the files.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = None
    verify: bool = True
    context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def given(self) -> bool:
        return (
            any(
                v is not None
                for v in (self.ca_file, self.cert_file, self.key_file, self.server_hostname)
            )
            or self.context is not None
            or not self.verify
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The client context for these settings.

        Raises:
            ConfigurationError: a file is missing, unreadable, or not PEM
                that fits (a key that does not belong to the certificate).
        """
        if self.context is not None:
            return self.context
        if self.key_file is not None and self.cert_file is None:
            raise ConfigurationError("key_file (keyfile) needs cert_file (certfile) too")
        context: ssl.SSLContext
        if self.server_hostname is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        else:
            context = _NamedContext(ssl.PROTOCOL_TLS_CLIENT)
            context.name = self.server_hostname
        try:  # as ssl.create_default_context() does
            if self.ca_file is None:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                context.load_verify_locations(
                    cafile=_readable(self.ca_file, "ca_file (cacertfile)")
                )
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"ca_file (cacertfile) {self.ca_file!r} holds no usable CA: {exc}"
            ) from exc
        if self.cert_file is not None:
            _readable(self.cert_file, "cert_file (certfile)")
            if self.key_file is not None:
                _readable(self.key_file, "key_file (keyfile)")
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(
                    f"cannot use the client certificate {self.cert_file!r} with key "
                    f"{self.key_file!r}: {exc}"
                ) from exc
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class _NamedContext(ssl.SSLContext):
    """A client context that checks the server's certificate against
    ``name`` rather than the host connected to (aio-pika passes no
    ``server_hostname`` through to the connection)."""

    name: str

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, self.name, session)


def _readable(path: object, what: str) -> str:
    if not isinstance(path, str) or not path:
        raise ConfigurationError(f"{what} must be a file path (str), not {path!r}")
    if not os.path.isfile(path):
        raise ConfigurationError(f"{what} {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigurationError(f"{what} {path!r} cannot be read by this process")
    return path


def verify_flag(name: str, value: str) -> bool:
    """The ``verify`` setting a query parameter gives.

    Raises:
        ConfigurationError: a value that is not one of the conventions'.
    """
    if name == "verify" and value in ("verify_peer", "verify_none"):
        return value == "verify_peer"
    if name == "no_verify_ssl" and value in ("0", "1"):
        return value == "0"
    expected = "verify_peer or verify_none" if name == "verify" else "0 or 1"
    raise ConfigurationError(f"{name}={value!r} in the URL: expected {expected}")


_NAMES = TlsOptionNames(
    peer="broker",
    ca="ca_file (cacertfile)",
    hostname="server_hostname",
    client_cert="cert_file (certfile) and key_file (keyfile)",
    plain_port_hint="(RabbitMQ's is usually 5671; amqp:// is for the plain one)",
)


def tls_problem(exc: BaseException) -> str | None:
    """What went wrong in a TLS handshake with the broker (see ``transports.tls``)."""
    return diagnose(exc, _NAMES)


LOST_AFTER_HANDSHAKE = (
    "the broker closed the connection during or right after the TLS handshake, as brokers do "
    "with a client certificate they do not accept (or none, where they require one): check "
    "cert_file (certfile) and key_file (keyfile)"
)


def connection_lost(exc: BaseException) -> bool:
    """Is ``exc`` (or its cause) a connection closed or reset by the peer?"""
    return any(isinstance(error, (ConnectionError, EOFError)) for error in causes(exc))
