"""Services every serving node answers, for the ``pigeon`` command:
``pigeon.info`` (stats), ``pigeon.dead`` (list dead letters) and
``pigeon.replay`` (move dead letters back to their queue)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from ..._core import headers, policy
from ..._core.ledger import dead_letter_queue
from ...errors import DecodeError
from ...message import Message, make_message
from ..host import QueueHost
from ..local import LocalServices

INFO_SERVICE = "pigeon.info"
DEAD_SERVICE = "pigeon.dead"
REPLAY_SERVICE = "pigeon.replay"


class _QueueRequest(msgspec.Struct):
    queue: str
    limit: int | None = None


def _queue_request(message: Message) -> _QueueRequest:
    try:
        return message.decode(_QueueRequest)
    except DecodeError as exc:
        raise DecodeError(f"expected {{'queue': str, 'limit': int | null}}: {exc}") from exc


def register(services: LocalServices, host: QueueHost, stats: Callable[[], dict[str, Any]]) -> None:
    """Serve the admin services of a node whose queues ``host`` holds."""

    async def info(message: Message) -> Message:
        return make_message(stats())

    async def dead(message: Message) -> Message:
        request = _queue_request(message)
        ledger = host.queues.get(dead_letter_queue(request.queue))
        letters: list[dict[str, Any]] = []
        if ledger is not None:
            for letter in ledger.peek_ready(request.limit or 100):
                letters.append(
                    {
                        "id": letter.id,
                        "reason": policy.dead_reason(letter.headers),
                        "attempts": letter.headers.get(headers.ATTEMPTS, ""),
                        "content_type": letter.content_type,
                        "body": letter.body[:200].decode("utf-8", "replace"),
                    }
                )
        return make_message(letters)

    async def replay(message: Message) -> Message:
        request = _queue_request(message)
        return make_message({"replayed": host.replay_dead(request.queue, request.limit)})

    services.add(INFO_SERVICE, info)
    services.add(DEAD_SERVICE, dead)
    services.add(REPLAY_SERVICE, replay)
