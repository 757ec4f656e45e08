"""Dead letters on JetStream: a copy of the message in ``<queue>.dead``.

The copy carries the core's dead-letter headers (Rule 2 of
:mod:`pigeon._core.policy`) as user headers and ``Pigeon-Redelivered: 1``,
since it was seen. Its ``Nats-Msg-Id`` is per dead-letter queue, so a
message dead-lettered twice within the stream's duplicate window (its first
term lost) is stored once.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext

from ..._core import policy
from ..._core.ledger import dead_letter_queue
from ...message import Message
from . import envelope
from .errors import map_exceptions


class DeadLetters:
    """Publishes the dead letters of every queue into the same stream.

    Args:
        js: the JetStream context of the connection.
        stream: the stream's name.
        prefix: the subject prefix of queues.
        ack_timeout: seconds to wait for the pub ack.
    """

    def __init__(self, js: JetStreamContext, stream: str, prefix: str, ack_timeout: float) -> None:
        self.js = js
        self.stream = stream
        self.prefix = prefix
        self.ack_timeout = ack_timeout

    async def publish(self, queue: str, message: Message, reason: str, attempts: int) -> None:
        """Store a dead letter of ``queue`` in its dead-letter queue.

        Raises:
            TransportError: JetStream did not confirm it.
            Timeout: no pub ack in time.
        """
        dead = msgspec.structs.replace(
            message,
            headers=policy.dead_letter_headers(
                message.headers, queue, envelope.single_line(reason), attempts
            ),
        )
        headers = envelope.to_headers(dead, check=False)
        headers[envelope.REDELIVERED] = "1"  # it was seen, as on the other transports
        dead_queue = dead_letter_queue(queue)
        headers[envelope.MSG_ID] = envelope.dedupe_id(dead_queue, message.id)
        subject = envelope.subject(self.prefix, "q", dead_queue)
        with map_exceptions(f"dead-letter to {queue!r}", timeout=self.ack_timeout):
            await self.js.publish(subject, message.body, headers=headers, stream=self.stream)
