"""The JetStream side of the queues: pigeon's stream and its durable consumers."""

from __future__ import annotations

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from ...errors import ConfigurationError
from ..base import ConsumeOptions
from . import envelope
from .errors import map_exceptions
from .options import NatsOptions


class Stream:
    """The work-queue stream holding every queue, and the queues' consumers.

    Args:
        js: the JetStream context of the connection.
        options: the transport's options (stream name, subject prefix,
            duplicate window, ``max_ack_pending``).
    """

    def __init__(self, js: JetStreamContext, options: NatsOptions) -> None:
        self.js = js
        self.name = options.stream
        self.subjects = [f"{options.prefix}.q.>"]
        self.duplicate_window = options.duplicate_window
        self.max_ack_pending = options.max_ack_pending

    async def ensure(self) -> None:
        """Create the stream if it is missing and check that it fits.

        Raises:
            TransportError: JetStream is unreachable or failed.
            ConfigurationError: the stream exists but is not a work-queue
                stream on pigeon's subjects.
        """
        with map_exceptions(f"create stream {self.name}"):
            try:
                info = await self.js.stream_info(self.name)
            except nats.js.errors.NotFoundError:
                info = await self.js.add_stream(
                    StreamConfig(
                        name=self.name,
                        subjects=self.subjects,
                        retention=RetentionPolicy.WORK_QUEUE,
                        storage=StorageType.FILE,
                        duplicate_window=self.duplicate_window,
                    )
                )
        config = info.config
        wrong = config.retention != RetentionPolicy.WORK_QUEUE
        if wrong or self.subjects[0] not in (config.subjects or []):
            raise ConfigurationError(
                f"stream {self.name} exists but is not a work-queue stream on {self.subjects[0]}"
            )

    async def ensure_consumer(self, queue: str, subject: str, options: ConsumeOptions) -> None:
        """Create the queue's durable consumer, or update its ack wait and limits.

        Workers of one queue share the consumer, so the last one to start
        sets its ``lease_ttl``.

        Raises:
            TransportError: JetStream is unreachable or failed.
            ConfigurationError: JetStream refused the configuration.
        """
        config = ConsumerConfig(
            durable_name=envelope.durable_name(queue),
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=options.lease_ttl,
            max_ack_pending=max(self.max_ack_pending, options.prefetch),
            max_deliver=-1,
        )
        with map_exceptions(f"create the consumer of {queue!r}"):
            await self.js.add_consumer(self.name, config)
