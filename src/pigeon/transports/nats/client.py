"""The nats-py connection: opened with pigeon's reconnect policy, TLS and
credentials, and closed without hanging on a lost socket."""

from __future__ import annotations

import logging
import ssl
from typing import Any

import nats.errors
from nats.aio.client import Callback, Client, ErrorCallback
from nats.aio.transport import TcpTransport

from ...errors import AuthenticationError, PigeonError, TransportError
from . import security
from .errors import map_exceptions
from .options import NatsOptions

log = logging.getLogger("pigeon.nats")


class PlaintextRefused(nats.errors.Error):
    """The server did not switch to TLS, and TLS was asked for."""

    def __str__(self) -> str:
        return (
            "the server did not offer TLS (its INFO does not say tls_required), and TLS was "
            "asked for: nothing was sent to it"
        )


class LostAfterTls(nats.errors.Error):
    """The server closed the connection right after the TLS handshake."""

    def __str__(self) -> str:
        return (
            "the server closed the connection right after the TLS handshake, as servers do "
            "with a client certificate they do not accept (or none, where they require one): "
            "check tls_cert (cert_file) and tls_key (key_file)"
        )


class _Client(Client):
    """nats-py's client with two fixes for TLS.

    When TLS is required it will not send CONNECT (which carries the
    credentials) over a connection that is not encrypted: nats-py switches
    to TLS only when the server's INFO says ``tls_required``, and a
    ``tls://`` URL alone does not make it, so a server (or something posing
    as one) that leaves it out would get the password in clear. Checked
    before every CONNECT, reconnects included.

    A failed TLS handshake (a certificate refused) does not hang the client:
    nats-py then waits for the plain stream it upgraded to report its
    closing, which it never does (nats-io/nats.py issue 718), so its first
    connect never returns. The socket is dropped here instead. A connection
    lost just after the handshake is reported as :class:`LostAfterTls`: with
    TLS 1.3 that is how a refused client certificate looks from here.
    """

    require_tls = False

    async def _process_connect_init(self) -> None:
        try:
            await super()._process_connect_init()
        except (ConnectionError, EOFError) as exc:
            upgraded = self._upgraded()
            self._drop_socket()
            if upgraded:
                raise LostAfterTls() from exc
            raise
        except BaseException:
            self._drop_socket()
            raise

    def _upgraded(self) -> bool:
        transport = self._transport
        return (
            isinstance(transport, TcpTransport)
            and transport._io_writer is not None
            and transport._io_writer is not transport._bare_io_writer
        )

    def _drop_socket(self) -> None:
        transport = self._transport
        if not isinstance(transport, TcpTransport):
            return
        for writer in (transport._io_writer, transport._bare_io_writer):
            if writer is not None:
                writer.transport.abort()
        # Nothing left to close or wait for; the next attempt makes a new one.
        transport._io_writer = transport._io_reader = None
        transport._bare_io_writer = transport._bare_io_reader = None

    def _connect_command(self) -> bytes:
        if self.require_tls and not self._encrypted():
            raise PlaintextRefused()
        return super()._connect_command()

    def _encrypted(self) -> bool:
        server = self._current_server
        if server is not None and server.uri.scheme == "wss":
            return True
        writer = getattr(self._transport, "_io_writer", None)
        return writer is not None and writer.get_extra_info("ssl_object") is not None


async def connect(
    address: str,
    servers: list[str],
    options: NatsOptions,
    *,
    tls: ssl.SSLContext | None,
    on_error: ErrorCallback,
    on_disconnected: Callback,
    on_reconnected: Callback,
) -> Client:
    """Connect to the first server that answers.

    A server lost later is reconnected to for ever, every ``reconnect_wait``.

    Args:
        address: the URL with its secrets masked, for error messages.
        servers: the server URLs, credentials and all, for nats-py.
        tls: the SSL context (None: nats-py's default, the system's CAs).

    Raises:
        AuthenticationError: the server refused the credentials.
        TransportError: no server reachable, a TLS certificate was not
            accepted, or TLS was asked for and the server does not offer it.
        Timeout: no server answered within ``connect_timeout``.
    """
    errors: list[BaseException] = []  # what went wrong while connecting
    connecting = True

    async def remember(exc: Exception) -> None:
        if connecting:
            errors.append(exc)
        await on_error(exc)

    extra: dict[str, Any] = dict(options.credentials())
    if tls is not None:
        extra["tls"] = tls
    if options.tls_hostname is not None:
        extra["tls_hostname"] = options.tls_hostname
    nc = _Client()
    nc.require_tls = options.wants_tls or any(security.uses_tls(s) for s in servers)
    try:
        with map_exceptions(f"connect to {address}", timeout=options.connect_timeout):
            # nats-py annotates these times as int but uses them as seconds
            # (asyncio.wait_for, asyncio.sleep), which take any number.
            await nc.connect(
                servers,
                name=options.name,
                connect_timeout=options.connect_timeout,  # type: ignore[arg-type]
                reconnect_time_wait=options.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=1,
                allow_reconnect=True,
                error_cb=remember,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                **extra,
            )
    except PigeonError as exc:
        why = _why(address, errors, exc)
        if why is exc:
            raise
        raise why  # noqa: B904  (_why set its cause: the error that says why)
    finally:
        connecting = False
    # Give up at start when no server answers (nats-py would retry the
    # first connect forever with -1), but once connected never stop
    # reconnecting: nats-py reads this option on every reconnect.
    nc.options["max_reconnect_attempts"] = -1
    return nc


def _why(address: str, errors: list[BaseException], failure: PigeonError) -> PigeonError:
    """The error that says why the connect failed: nats-py ends with
    "no servers available", and the reason is among the errors it reported."""
    for error in reversed(errors):
        if isinstance(error, (PlaintextRefused, LostAfterTls)):
            return _caused(TransportError(f"connect to {address}: {error}", address=address), error)
        problem = security.tls_problem(error)
        if problem is not None:
            return _caused(
                TransportError(f"connect to {address}: {problem}", address=address), error
            )
        text = str(error).lower()
        if isinstance(error, nats.errors.AuthorizationError) or "authorization" in text:
            return _caused(
                AuthenticationError(
                    f"connect to {address}: the server refused the credentials "
                    f"({_single_line(error)})",
                    address=address,
                ),
                error,
            )
    if errors and isinstance(failure, TransportError) and failure.__cause__ is not None:
        if isinstance(failure.__cause__, nats.errors.NoServersError):
            last = errors[-1]
            return _caused(
                TransportError(
                    f"connect to {address}: {type(last).__name__}: {_single_line(last)}",
                    address=address,
                ),
                last,
            )
    return failure


def _caused(error: PigeonError, cause: BaseException) -> PigeonError:
    error.__cause__ = cause
    return error


def _single_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


async def close(nc: Client, timeout: float) -> None:
    """Flush what is buffered (settles, mostly) if still connected, then close.

    Never raises: what cannot be written now, JetStream redelivers.
    """
    try:
        with map_exceptions("close"):
            if nc.is_connected:
                # nats-py annotates the timeout as int but hands it to
                # asyncio.wait_for, which takes any number of seconds.
                await nc.flush(timeout=max(0.1, min(timeout, 1.0)))  # type: ignore[arg-type]
    except PigeonError:
        pass  # nothing more can be done for them: JetStream redelivers
    pending: int = getattr(nc, "_pending_data_size", 0)
    if not nc.is_connected and pending:
        # nats-py's close() writes what it buffered during an outage to
        # the lost socket and raises before releasing its subscriptions
        # and socket; those commands cannot reach a server anyway.
        nc._pending = []
        nc._pending_data_size = 0
    try:
        with map_exceptions("close"):
            await nc.close()
    except PigeonError as exc:
        log.debug("closing the NATS connection: %s", exc)
