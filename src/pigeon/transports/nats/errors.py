"""The one place where nats-py's exceptions become pigeon's.

Every call into nats-py that can fail runs inside :func:`map_exceptions`, so
callers of the transport only ever see :mod:`pigeon.errors`, with the
original nats-py error kept as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import nats.errors
import nats.js.errors

from ...errors import (
    ConfigurationError,
    MessageTooLarge,
    NoResponders,
    PigeonError,
    Timeout,
    TransportError,
)

# JetStream's error codes for a configuration it can never accept, which it
# answers with 500 rather than 400: retrying cannot help.
_REFUSED = {
    10052,  # maximum replicas is 5
    10074,  # replicas > 1 not supported in non-clustered mode
}


@contextmanager
def map_exceptions(
    what: str,
    *,
    service: str | None = None,
    timeout: float | None = None,
    size: int = 0,
    limit: int = 0,
) -> Iterator[None]:
    """Translate nats-py errors raised inside the block.

    Args:
        what: the operation, for the error text ("send to 'jobs'").
        service: set for request-reply, where "no responders" means nobody
            serves ``service`` rather than "JetStream is unavailable".
        timeout: the timeout the operation had, for the error text.
        size: body size of the message being sent, for MessageTooLarge.
        limit: the payload limit that applies, for MessageTooLarge.

    Raises:
        NoResponders: nobody listens on a service subject.
        Timeout: the operation (a request, a pub ack) timed out.
        MessageTooLarge: the server's max_payload was exceeded.
        ConfigurationError: JetStream refused a request as malformed (400),
            or a configuration it cannot serve (replicas outside a cluster).
        TransportError: everything else: connection closed, lost,
            reconnecting, JetStream unavailable or failing.
    """
    try:
        yield
    except PigeonError:
        raise
    except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError) as exc:
        if service is not None:
            raise NoResponders(service) from exc
        raise TransportError(
            f"{what}: nothing answered on JetStream's subjects (is JetStream enabled and "
            f"the stream there?)"
        ) from exc
    except TimeoutError as exc:  # nats-py's TimeoutError is one too
        within = f" within {timeout:.3f} s" if timeout is not None else ""
        if service is not None:
            raise Timeout(f"service {service!r} did not answer{within}") from exc
        raise Timeout(f"{what}: no answer from the NATS server{within}") from exc
    except nats.errors.MaxPayloadError as exc:
        raise MessageTooLarge(size, limit) from exc
    except nats.js.errors.APIError as exc:
        if isinstance(exc, nats.js.errors.BadRequestError) or exc.err_code in _REFUSED:
            raise ConfigurationError(f"{what}: JetStream refused it: {exc.description}") from exc
        raise TransportError(f"{what}: JetStream error {exc.code}: {exc.description}") from exc
    except (nats.errors.Error, OSError) as exc:
        raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc
