"""A subscription on a retained pattern's stream: durable (shared by name)
or replaying history.

Rule 1: a JetStream pull consumer on the stream holding the pattern
(history.py Rule 3), filtered on ``<prefix>.t.<pattern>``, explicit ack,
ack wait ``lease_ttl``, pulled as a queue is (pull.py): never more than
``prefetch`` unsettled, leases and redelivery kept by JetStream.
Rule 2: with a name it is the durable consumer ``s_<name>``: subscribers
with the same name share it as competing consumers, and it keeps its
position while none runs. ``start`` (default: new messages only) places it
only when it is created. A name already used for another pattern in that
stream is a ConfigurationError. Settling is a queue's: ack is ``+ACK``,
nack ``-NAK`` with its delay, reject (and a delivery past
``max_attempts``) dead-letters into the queue ``<name>.dead`` of the
work-queue stream, then ``+TERM``.
Rule 3: without a name it is an ephemeral consumer of its own, placed at
``start`` (positions.py), deleted when the subscription is
cancelled (and by JetStream after ``inactive_threshold`` if this process
died). It has no dead-letter queue: reject is ``+TERM``, counted
``rejected`` with the latest reason in stats.
Rule 4: history and the live messages after it come from the one
consumer, in stream order: no gap and no duplicate between them.
Rule 5: the slow-subscriber policy on a stream: ``drop-oldest`` is the
stream trimming at its limits what the subscriber has not read yet (seen
as a gap in the publisher's numbers); ``disconnect``: a delivery after
which more than ``buffer`` messages are still pending for this consumer
(JetStream's ``num_pending``) ends the subscription (it is nak'd back, a
durable keeps its position), counted ``disconnected``, and
``on_disconnect(reason)`` is called once; ``block`` (durable only) makes
the stream discard new messages at its limits (history.py Rule 5).
Rule 6: a consumer that vanished (deleted, or an ephemeral one after
inactivity) is made again, with the same name, from the stream sequence
after the last one delivered here, so nothing is replayed twice.
Rule 7: a ``from_seq`` start skips the history numbered below it in its
topic (positions.py Rule 1): acked here, counted ``skipped``, not handed on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo

from ..._core import headers as pigeon_headers
from ..._core.topics import SlowPolicy
from ...errors import ConfigurationError, PigeonError
from ...message import Message, new_id
from ..base import ConsumeOptions, Delivery, DeliverySink, SubscribeOptions
from . import positions
from .deadletter import DeadLetters
from .errors import map_exceptions
from .history import TopicStream, TopicStreams
from .plain import TopicCounts, checked
from .pull import PullConsumer

log = logging.getLogger("pigeon.nats")

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_API = "$JS.API"


def durable_name(name: str) -> str:
    """The durable consumer of subscription ``name``: ``s_<name>``, made
    safe and hashed as queues' are (``envelope.durable_name``)."""
    safe = _NAME_UNSAFE.sub("_", name)
    if safe == name and len(name) <= 200:
        return f"s_{name}"
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"s_{safe[:180]}_{digest}"


def _raise(error: dict[str, Any] | None, what: str) -> None:
    """Raise JetStream's API ``error`` as a pigeon error, if there is one."""
    if error:
        with map_exceptions(what):
            nats.js.errors.APIError.from_error(error)  # raises the matching APIError


class _Placement:
    """What PullConsumer asks to (re)create its consumer (``stream.ConsumerSetup``)."""

    def __init__(self, name: str, create: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._create = create

    async def ensure_consumer(self, queue: str, subject: str, options: ConsumeOptions) -> None:
        await self._create()


class TopicConsumer(PullConsumer):
    """One subscriber's pull loop on a retained pattern's consumer.

    Args:
        nc: the connection.
        streams: the retained streams (for start positions).
        stream: the stream holding ``pattern``.
        dead_letters: where a durable subscription's rejects go.
        counts: the topic counters.
        pattern: the pigeon pattern.
        sink: where deliveries go.
        options: name, policy, buffer, start, and prefetch/lease/attempts.
        on_disconnect: told once why, if policy ``disconnect`` cuts it off.
        pull_expires: seconds a pull request waits.
        max_ack_pending: JetStream's cap on unacked messages (raised to prefetch).
        on_cancel: told once it has stopped.
    """

    def __init__(
        self,
        nc: Client,
        streams: TopicStreams,
        stream: TopicStream,
        dead_letters: DeadLetters,
        counts: TopicCounts,
        *,
        pattern: str,
        sink: DeliverySink,
        options: SubscribeOptions,
        on_disconnect: Callable[[str], None],
        pull_expires: float,
        max_ack_pending: int,
        on_cancel: Callable[[Any], None],
    ) -> None:
        super().__init__(
            nc,
            _Placement(stream.name, self._create),
            dead_letters,
            counts,
            queue=options.name or pattern,
            subject=stream.subject_of(pattern),
            sink=sink,
            options=options.consume,
            pull_expires=pull_expires,
            on_cancel=on_cancel,
        )
        self.topic_counts = counts
        self.streams = streams
        self.retained = stream
        self.pattern = pattern
        self.sub_options = options
        self.on_disconnect = on_disconnect
        self.max_ack_pending = max(max_ack_pending, options.consume.prefetch)
        self.ephemeral = options.name is None
        self.durable = durable_name(options.name) if options.name else f"e_{new_id()}"
        self.last_seq = 0  # the last stream sequence delivered here (Rule 6)
        self.placement = positions.Placement()  # where it started (Rule 7)
        self._created = False
        self._cut = False
        self._ending: asyncio.Task[None] | None = None

    # -- the consumer (Rules 2, 3 and 6) ---------------------------------

    async def _create(self) -> None:
        if self._created:
            if await self._existing() is not None:
                return  # still there (a pull went unanswered for another reason)
            self.topic_counts["consumers_recreated"] += 1
            if self.last_seq:
                start = positions.after(self.last_seq)
            else:
                start = self.placement.config
            await self._put(self._config(start))
            return
        if not self.ephemeral:
            existing = await self._existing()
            if existing is not None:
                self._check_same(existing)
                config = existing.config
                config.ack_wait = self.options.lease_ttl
                config.max_ack_pending = self.max_ack_pending
                await self._put(config)
                self._created = True
                return
        self.placement = await positions.place(
            self.streams, self.retained, self.pattern, self.sub_options.start
        )
        await self._put(self._config(self.placement.config))
        self._created = True

    def _config(self, start: dict[str, Any]) -> ConsumerConfig:
        return ConsumerConfig(
            name=self.durable,
            durable_name=None if self.ephemeral else self.durable,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.options.lease_ttl,
            max_ack_pending=self.max_ack_pending,
            max_deliver=-1,
            inactive_threshold=max(60.0, 2 * self.options.lease_ttl) if self.ephemeral else None,
            **start,
        )

    def _check_same(self, existing: ConsumerInfo) -> None:
        have = existing.config.filter_subject
        if have != self.subject:
            raise ConfigurationError(
                f"durable subscription {self.queue!r} exists on {have!r}, not {self.subject!r}: "
                f"use another name (or delete consumer {self.durable} of stream "
                f"{self.retained.name})"
            )

    async def _existing(self) -> ConsumerInfo | None:
        subject = f"{_API}.CONSUMER.INFO.{self.retained.name}.{self.durable}"
        what = f"look up subscription {self.queue!r}"
        reply = await self._api(what, subject, None)
        error = reply.get("error")
        if error and error.get("code") == 404:
            return None
        _raise(error, what)
        info: ConsumerInfo = ConsumerInfo.from_response(reply)
        return info

    async def _put(self, config: ConsumerConfig) -> None:
        """Create or update the consumer under its own name (the 2.9 API's
        ``CONSUMER.CREATE.<stream>.<name>``: a filter with wildcards cannot
        go in the subject, as nats-py would put it)."""
        subject = f"{_API}.CONSUMER.CREATE.{self.retained.name}.{self.durable}"
        body = {"stream_name": self.retained.name, "config": config.as_dict()}
        what = f"subscribe to {self.pattern!r}"
        reply = await self._api(what, subject, body)
        _raise(reply.get("error"), what)

    async def _api(self, what: str, subject: str, body: dict[str, Any] | None) -> dict[str, Any]:
        timeout = self.streams.options.ack_timeout
        data = json.dumps(body).encode() if body is not None else b""
        with map_exceptions(what, timeout=timeout):
            msg = await self.nc.request(subject, data, timeout=timeout)
        reply: dict[str, Any] = json.loads(msg.data or b"{}")
        return reply

    # -- deliveries (Rules 5 and 7) --------------------------------------

    def _skipped(self, message: Message, seq: int) -> bool:
        """Is this history numbered below ``from_seq`` in its topic (Rule 7)?"""
        placement = self.placement
        if not placement.below or seq > placement.cut:
            return False
        found = message.headers
        number = found.get(pigeon_headers.SEQ, "")
        return (
            found.get(pigeon_headers.SOURCE) == placement.source
            and number.isdigit()
            and int(number) < placement.below
        )

    async def _admit(self, delivery: Delivery, meta: Msg.Metadata) -> bool:
        msg: Msg = delivery.tag
        if self._cut:
            await self._quietly(msg.nak(), "nak")
            return False
        seq = meta.sequence.stream
        self.last_seq = max(self.last_seq, seq)
        topic = msg.subject[len(self.retained.root) :]
        delivery.queue = topic
        delivery.message = checked(delivery.message, topic, self.topic_counts)
        if self._skipped(delivery.message, seq):
            self.topic_counts["skipped"] += 1
            await self._quietly(msg.ack(), "ack")
            self._wake.set()  # credit it did not take: the pull loop may ask again
            return False
        behind = meta.num_pending
        if self.sub_options.policy == SlowPolicy.DISCONNECT and behind > self.sub_options.buffer:
            await self._quietly(msg.nak(), "nak")
            self._disconnect(behind)
            return False
        return True

    def _disconnect(self, behind: int) -> None:
        reason = (
            f"{behind} messages were pending for this subscriber, more than its buffer "
            f"of {self.sub_options.buffer} (policy disconnect)"
        )
        self._cut = True
        self.topic_counts["disconnected"] += 1
        log.warning("subscription to %r disconnected: %s", self.pattern, reason)
        self._ending = asyncio.get_running_loop().create_task(self.cancel())
        try:
            self.on_disconnect(reason)
        except Exception:  # the subscriber's callback; its failure is not ours
            log.exception("on_disconnect for %r failed", self.pattern)

    async def _bury(self, delivery: Delivery, reason: str, *, attempts: int) -> None:
        if not self.ephemeral:
            await super()._bury(delivery, reason, attempts=attempts)
            return
        # No dead-letter queue without a name (Rule 3): counted, kept in stats.
        self.topic_counts["rejected"] += 1
        self.topic_counts.last_rejected = (
            f"{delivery.queue}: message {delivery.message.id}: {reason}"
        )
        await self._quietly(delivery.tag.term(), "term")

    # -- stopping --------------------------------------------------------

    async def cancel(self) -> None:
        """Stop pulling (pull.py); an ephemeral consumer is deleted too."""
        if self.closed:
            return
        await super().cancel()
        if self.ephemeral and self._created:
            try:
                with map_exceptions(
                    f"delete the consumer of {self.pattern!r}",
                    timeout=self.streams.options.ack_timeout,
                ):
                    await self.streams.js.delete_consumer(self.retained.name, self.durable)
            except PigeonError as exc:  # JetStream drops it once inactive
                self.topic_counts["consumer_delete_failures"] += 1
                log.debug("%s", exc)
