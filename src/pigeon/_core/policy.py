"""Queue and request policy that every transport applies the same way.

Rule 1 (attempt limit): a message whose delivery count would pass the
queue's ``max_attempts`` is dead-lettered instead of delivered again; 0
means no limit. The reason text is the same on every transport.
Rule 2 (dead letters): a dead letter keeps its headers and gains
``DEAD_QUEUE`` (where it first died, kept if it dies again), ``DEAD_REASON``
and ``ATTEMPTS``.
Rule 3 (server choice): a call goes to the server with the fewest calls
outstanding, servers not yet tried first; ties take turns.
Rule 4: a host's refusal and a server's failed reply say why with an enum
member, never with text to be parsed.
Rule 5 (delivery count): deliveries are counted by the host that holds a
message; one that arrives from a producer enters its queue with attempt 0,
whatever the producer wrote.
Rule 6 (message deadline): a work-queue message whose deadline (``send``'s
``ttl``) has passed is dead-lettered unrun with the reason ``expired``, by
the host before it hands it out and by a worker before it runs it. A dead
letter never expires.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import TypeVar

from ..errors import (
    Backpressure,
    DeliveryError,
    Forbidden,
    NoResponders,
    PigeonError,
    Rejected,
    StoreError,
)
from ..errors import Timeout as PigeonTimeout
from ..message import Message
from . import headers
from .budget import MAX_PEER_REQUESTS

S = TypeVar("S")


def over_attempt_limit(attempt: int, max_attempts: int) -> bool:
    """Rule 1: True if a delivery numbered ``attempt`` must not happen."""
    return max_attempts > 0 and attempt > max_attempts


EXPIRED_REASON = "expired"


def past_deadline(message: Message, now: float) -> bool:
    """Rule 6: True if ``message`` must not run at wall-clock ``now``.

    A dead letter never expires: it is kept for whoever reads dead letters.
    """
    deadline = message.deadline
    return deadline is not None and now >= deadline and headers.DEAD_REASON not in message.headers


def attempt_limit_reason(queue: str, delivered: int) -> str:
    """Rule 1: the dead-letter reason for a message over its queue's limit."""
    return f"delivered {delivered} times, the limit for queue {queue!r}"


def as_received(messages: Iterable[Message]) -> None:
    """Rule 5: set the delivery count of messages a producer sent to 0."""
    for message in messages:
        message.attempt = 0


def dead_letter_headers(
    message_headers: Mapping[str, str], queue: str, reason: str, attempts: int
) -> dict[str, str]:
    """Rule 2: the headers of a dead letter of ``queue``."""
    return {
        headers.DEAD_QUEUE: queue,
        **message_headers,
        headers.DEAD_REASON: reason,
        headers.ATTEMPTS: str(attempts),
    }


def without_dead_letter_headers(message_headers: Mapping[str, str]) -> dict[str, str]:
    """A replayed dead letter's headers: Rule 2's additions taken off again."""
    return {
        k: v
        for k, v in message_headers.items()
        if not k.startswith(headers.DEAD_PREFIX) and k != headers.ATTEMPTS
    }


def dead_reason(message_headers: Mapping[str, str]) -> str:
    return message_headers.get(headers.DEAD_REASON, "")


def least_loaded(
    servers: Sequence[S],
    load: Callable[[S], int],
    turn: int,
    tried: Iterable[S] = (),
) -> S | None:
    """Rule 3: the server for a call's next attempt, or None if there is none.

    ``turn`` is a counter the caller advances per choice, so equally loaded
    servers take turns.
    """
    if len(servers) <= 1:
        return servers[0] if servers else None
    start = turn % len(servers)
    ordered = [*servers[start:], *servers[:start]]
    seen = set(tried) if tried else None
    if seen:
        return min(ordered, key=lambda s: (s in seen, load(s)))
    return min(ordered, key=load)


class RefusalReason(StrEnum):
    """Why a host refused a message it was sent (Rule 4)."""

    FULL = "full"  # the queue is at its bound; retrying later may work
    TOO_LARGE = "too large"  # over the host's message size limit
    STORE_FAILED = "store failed"  # the durable store could not write it
    FORBIDDEN = "forbidden"  # the sender's key may not send to this queue

    @property
    def retryable(self) -> bool:
        """True if the same message may be taken later (a durable outbox retries it)."""
        return self in (RefusalReason.FULL, RefusalReason.STORE_FAILED)


class ReplyErrorKind(StrEnum):
    """Why a reply carries no answer (Rule 4); NONE on a good reply."""

    NONE = ""
    REJECTED = "Rejected"  # the handler raised or returned nothing
    NO_RESPONDERS = "NoResponders"  # the server no longer offers the service
    TIMEOUT = "Timeout"  # the handler ran past the request's deadline
    FORBIDDEN = "Forbidden"  # the caller's key may not call this service
    BUSY = "Busy"  # the caller has too many requests running on that node


# A Send to this prefix and a topic is a publish on that topic (see
# pigeon.transports.zmq.topic_side).
PUBLISH_PREFIX = "pigeon.publish."


def refusal_error(queue: str, reason: RefusalReason, detail: str) -> PigeonError:
    """The error a producer gets when a host refused its message for ``queue``
    (``pigeon.publish.TOPIC``: a publish on TOPIC)."""
    topic = queue.removeprefix(PUBLISH_PREFIX) if queue.startswith(PUBLISH_PREFIX) else None
    if reason is RefusalReason.FULL:
        if topic is not None:
            return Backpressure(f"topic {topic!r} on its host ({detail})")
        return Backpressure(f"queue {queue!r} on its host")
    if reason is RefusalReason.FORBIDDEN:
        return Forbidden("send", queue if topic is None else topic)
    if reason is RefusalReason.STORE_FAILED:
        return StoreError(f"the host could not store a message for {queue!r}: {detail}")
    return DeliveryError(f"host refused a message for queue {queue!r}: {reason.value}: {detail}")


def reply_error(service: str, kind: ReplyErrorKind, error: str) -> PigeonError:
    """The error a caller gets for a reply that carries no answer."""
    if kind is ReplyErrorKind.NO_RESPONDERS:
        return NoResponders(service)
    if kind is ReplyErrorKind.TIMEOUT:
        return PigeonTimeout(error)
    if kind is ReplyErrorKind.FORBIDDEN:
        return Forbidden("call", service)
    if kind is ReplyErrorKind.BUSY:
        what = f"requests this caller has running on the server of {service!r}"
        return Backpressure(what, MAX_PEER_REQUESTS)
    return Rejected(service, error)


def reply_kind(error: PigeonError) -> ReplyErrorKind:
    """The kind a server sends back for a call that failed with ``error``."""
    if isinstance(error, NoResponders):
        return ReplyErrorKind.NO_RESPONDERS
    if isinstance(error, PigeonTimeout):
        return ReplyErrorKind.TIMEOUT
    if isinstance(error, Forbidden):
        return ReplyErrorKind.FORBIDDEN
    if isinstance(error, Backpressure):
        return ReplyErrorKind.BUSY
    return ReplyErrorKind.REJECTED
