"""Services every serving node answers, for the ``pigeon`` command:
``pigeon.info`` (stats), ``pigeon.dead`` (list dead letters),
``pigeon.replay`` (move dead letters back to their queue),
``pigeon.purge`` (remove a queue's ready messages, or its dead letters),
``pigeon.declare`` (set the policy of a queue name or pattern) and
``pigeon.retain`` (keep history of topics)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from ..._core import headers, policy, queue_policies
from ..._core.ledger import dead_letter_queue
from ..._core.topics import Retention
from ...errors import DecodeError
from ...message import Message, make_message
from ..host import QueueHost
from ..local import LocalServices
from ..topic_host import TopicHost

INFO_SERVICE = "pigeon.info"
DEAD_SERVICE = "pigeon.dead"
REPLAY_SERVICE = "pigeon.replay"
PURGE_SERVICE = "pigeon.purge"
DECLARE_SERVICE = "pigeon.declare"
RETAIN_SERVICE = "pigeon.retain"
ADMIN_SERVICES = frozenset(
    {INFO_SERVICE, DEAD_SERVICE, REPLAY_SERVICE, PURGE_SERVICE, DECLARE_SERVICE, RETAIN_SERVICE}
)
# Read-only answers: cheap to make again, large to keep, so never cached
# (replay and purge are not read-only: a retried one must get the first
# answer, not move or remove more).
UNCACHED_SERVICES = frozenset({INFO_SERVICE, DEAD_SERVICE})


PAGE = 1000  # queues per pigeon.info answer


class _QueueRequest(msgspec.Struct):
    queue: str
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None


class _PurgeRequest(msgspec.Struct):
    queue: str
    dead: bool = False  # its dead letters (``<queue>.dead``) instead


class _InfoRequest(msgspec.Struct):
    after: str = ""  # the page starts after this queue name
    limit: Annotated[int, msgspec.Meta(ge=1, le=PAGE)] = PAGE


def _info_request(message: Message) -> _InfoRequest:
    if not message.body:
        return _InfoRequest()
    try:
        return message.decode(_InfoRequest)
    except DecodeError as exc:
        raise DecodeError(f"expected {{'after': str, 'limit': int}}: {exc}") from exc


def page_of(info: dict[str, Any], after: str, limit: int) -> dict[str, Any]:
    """``info`` with at most ``limit`` of its queues, those named after
    ``after``; ``next`` names where the following page starts (or None)."""
    names = sorted(name for name in info["queues"] if name > after)
    page = names[:limit]
    return {
        **info,
        "queues": {name: info["queues"][name] for name in page},
        "queue_count": len(info["queues"]),
        "next": page[-1] if len(names) > limit else None,
    }


class _DeclareRequest(msgspec.Struct):
    queue: str  # a name or a pattern
    policy: dict[str, int | float]


def _declare_request(message: Message) -> _DeclareRequest:
    try:
        return message.decode(_DeclareRequest)
    except DecodeError as exc:
        raise DecodeError(f"expected {{'queue': str, 'policy': {{field: number}}}}: {exc}") from exc


def _queue_request(message: Message) -> _QueueRequest:
    try:
        return message.decode(_QueueRequest)
    except DecodeError as exc:
        raise DecodeError(f"expected {{'queue': str, 'limit': int | null}}: {exc}") from exc


class RetainRequest(msgspec.Struct):
    pattern: str
    max_count: int | None = None
    max_bytes: int | None = None
    max_age: float | None = None


def dead_letter_row(letter: Message) -> dict[str, Any]:
    """A dead letter as ``pigeon dead`` shows it (the body's first 200 bytes)."""
    return {
        "id": letter.id,
        "reason": policy.dead_reason(letter.headers),
        "attempts": letter.headers.get(headers.ATTEMPTS, ""),
        "content_type": letter.content_type,
        "body": letter.body[:200].decode("utf-8", "replace"),
    }


def register(
    services: LocalServices,
    host: QueueHost,
    stats: Callable[[], dict[str, Any]],
    topics: TopicHost,
) -> None:
    """Serve the admin services of a node whose queues ``host`` and topics
    ``topics`` hold."""

    async def info(message: Message) -> Message:
        request = _info_request(message)
        return make_message(page_of(stats(), request.after, request.limit))

    async def dead(message: Message) -> Message:
        request = _queue_request(message)
        ledger = host.queues.get(dead_letter_queue(request.queue))
        letters: list[dict[str, Any]] = []
        if ledger is not None:
            letters = [dead_letter_row(m) for m in ledger.peek_ready(request.limit or 100)]
        return make_message(letters)

    async def replay(message: Message) -> Message:
        request = _queue_request(message)
        return make_message({"replayed": host.replay_dead(request.queue, request.limit)})

    async def purge(message: Message) -> Message:
        # Only a peer with admin rights gets here on a node with keys.
        try:
            request = message.decode(_PurgeRequest)
        except DecodeError as exc:
            raise DecodeError(f"expected {{'queue': str, 'dead': bool}}: {exc}") from exc
        queue = dead_letter_queue(request.queue) if request.dead else request.queue
        purged = host.purge(queue)
        ledger = host.queues.get(queue)
        return make_message(
            {"queue": queue, "purged": purged, "ready": ledger.ready_count if ledger else 0}
        )

    async def declare(message: Message) -> Message:
        # Only a peer with admin rights gets here on a node with keys (the
        # ACL's admin grant); the node's operator owns queue policy.
        request = _declare_request(message)
        made = host.declare(request.queue, request.policy)
        fields = {f: getattr(made, f) for f in sorted(queue_policies.FIELDS)}
        return make_message({"queue": request.queue, "policy": fields})

    async def retain(message: Message) -> Message:
        # The node's operator owns what it keeps (the ACL's admin grant).
        try:
            request = message.decode(RetainRequest)
        except DecodeError as exc:
            raise DecodeError(
                f"expected {{'pattern': str, 'max_count', 'max_bytes', 'max_age'}}: {exc}"
            ) from exc
        topics.retain(
            request.pattern, Retention(request.max_count, request.max_bytes, request.max_age)
        )
        return make_message({"pattern": request.pattern})

    services.add(INFO_SERVICE, info)
    services.add(RETAIN_SERVICE, retain)
    services.add(DECLARE_SERVICE, declare)
    services.add(DEAD_SERVICE, dead)
    services.add(REPLAY_SERVICE, replay)
    services.add(PURGE_SERVICE, purge)
