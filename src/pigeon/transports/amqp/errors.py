"""The one place where aio-pika and aiormq errors become pigeon errors.

Everything that talks to the broker runs inside :func:`map_exceptions`, so
callers only ever see :mod:`pigeon.errors`, with the client library's
exception kept as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import aiormq.exceptions as amqp_errors

from ...errors import (
    AuthenticationError,
    ConfigurationError,
    DeliveryError,
    NoResponders,
    PigeonError,
    Timeout,
    TransportError,
)
from .security import tls_problem

# Errors meaning "the connection or channel is gone; retrying after the
# reconnect may work". ChannelInvalidStateError is a RuntimeError in aiormq.
LOST = (
    amqp_errors.AMQPConnectionError,
    amqp_errors.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)


# What RabbitMQ says (PRECONDITION_FAILED) to a consume of a stream whose
# member on its node is not running yet: a moment, not a misconfiguration.
NO_LOCAL_REPLICA = "does not have a replica on the local node"


class QueueNotReady(TransportError):
    """The broker cannot serve the queue yet (its member is starting): the
    same call may work a moment later."""


@contextmanager
def map_exceptions(
    action: str, *, address: str | None = None, service: str | None = None
) -> Iterator[None]:
    """Translate client-library errors raised inside the block.

    Args:
        action: what was being done, for the message ("publish to 'jobs'").
        address: the broker address (without credentials), for TransportError.
        service: set when publishing a request: an unroutable request then
            means nobody serves it.

    Raises:
        NoResponders: a request came back unroutable (``service`` given).
        DeliveryError: the broker refused or could not route a message.
        ConfigurationError: the broker refused a declaration (different
            arguments on an existing queue, access refused).
        AuthenticationError: the broker refused the login.
        Timeout: the broker did not answer in time.
        TransportError: the connection or channel was lost or cannot be
            made (a TLS certificate not accepted, for one: the message says).
    """
    try:
        yield
    except PigeonError:
        raise
    except amqp_errors.PublishError as exc:  # basic.return: no queue took it
        if service is not None:
            raise NoResponders(service) from exc
        raise DeliveryError(f"{action}: the broker could not route the message") from exc
    except amqp_errors.DeliveryError as exc:  # basic.nack: e.g. a full queue rejecting
        raise DeliveryError(f"{action}: the broker refused the message") from exc
    except amqp_errors.ChannelPreconditionFailed as exc:
        if NO_LOCAL_REPLICA in str(exc):
            raise QueueNotReady(
                f"{action}: the queue has no running member on the broker's node yet ({exc})",
                address=address,
            ) from exc
        raise ConfigurationError(
            f"{action}: the broker refused it ({exc}); a queue of that name probably exists "
            "with other arguments (queue type, dead-letter settings)"
        ) from exc
    except amqp_errors.ChannelAccessRefused as exc:
        raise ConfigurationError(f"{action}: access refused by the broker ({exc})") from exc
    except (amqp_errors.AuthenticationError, amqp_errors.ProbableAuthenticationError) as exc:
        raise AuthenticationError(
            f"{action}: the broker at {address} refused the credentials ({exc})", address=address
        ) from exc
    except amqp_errors.ChannelNotFoundEntity as exc:
        raise DeliveryError(f"{action}: no such queue on the broker ({exc})") from exc
    except TimeoutError as exc:  # before OSError: TimeoutError is one
        raise Timeout(f"{action}: the broker at {address} did not answer in time") from exc
    except (*LOST, amqp_errors.AMQPError) as exc:
        problem = tls_problem(exc)
        if problem is not None:
            raise TransportError(f"{action}: {problem}", address=address) from exc
        raise TransportError(f"{action}: {type(exc).__name__}: {exc}", address=address) from exc
