"""Saying what went wrong in a broker's TLS handshake, with what to check.

The NATS and AMQP adapters name their options differently; each passes
its own names, and the diagnosis is the same.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TlsOptionNames:
    """How a transport's users spell the options a TLS problem points at."""

    peer: str  # "server" or "broker"
    ca: str  # e.g. "tls_ca (ca_file)"
    hostname: str
    client_cert: str  # e.g. "tls_cert (cert_file) and tls_key (key_file)"
    plain_port_hint: str = ""  # said when the port does not speak TLS at all


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from, each once."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def tls_problem(exc: BaseException, names: TlsOptionNames) -> str | None:
    """What went wrong in a TLS handshake, in words and with what to check,
    if ``exc`` (or its cause) is a TLS error; None otherwise."""
    for error in causes(exc):
        if isinstance(error, ssl.SSLCertVerificationError):
            detail = error.verify_message or str(error)
            return (
                f"the {names.peer}'s TLS certificate was not accepted ({detail}): check "
                f"{names.ca} and the host name the certificate is for ({names.hostname})"
            )
        if isinstance(error, ssl.SSLError):
            reason = error.reason or str(error)
            if "WRONG_VERSION_NUMBER" in reason.upper() and names.plain_port_hint:
                return (
                    f"the TLS handshake failed ({reason}): is that port a TLS listener? "
                    f"{names.plain_port_hint}"
                )
            if "ALERT" in reason.upper():
                return (
                    f"the {names.peer} refused the TLS handshake ({reason}), as "
                    f"{names.peer}s do with a client certificate they do not accept (or none, "
                    f"where they require one): check {names.client_cert}"
                )
            return f"the TLS handshake failed ({reason})"
    return None
