"""The JetStream side of the queues: pigeon's stream and its durable consumers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from ...errors import ConfigurationError, Timeout, TransportError
from ..base import ConsumeOptions
from . import envelope
from .errors import map_exceptions
from .options import NatsOptions

T = TypeVar("T")

# In a cluster, JetStream answers the creation of a replicated stream or
# consumer once the new asset's group has elected a leader. With a server of
# the cluster down that can take an election timeout (up to about 9 s in
# nats-server), longer than one ack_timeout; while the cluster elects its
# meta leader, JetStream answers 503 "temporarily unavailable". Creating is
# idempotent (the same configuration again changes nothing), so such a
# request is made again, within this many ack_timeouts in all.
_ADMIN_BUDGET = 3
_ADMIN_PAUSE = 0.25  # seconds after a 503, doubling up to 1 s


class Stream:
    """The work-queue stream holding every queue, and the queues' consumers.

    Args:
        js: the JetStream context of the connection.
        options: the transport's options (stream name, subject prefix,
            duplicate window, replicas, ``max_ack_pending``, ``ack_timeout``).
    """

    def __init__(self, js: JetStreamContext, options: NatsOptions) -> None:
        self.js = js
        self.name = options.stream
        self.subjects = [f"{options.prefix}.q.>"]
        self.duplicate_window = options.duplicate_window
        self.max_ack_pending = options.max_ack_pending
        self.replicas = options.replicas
        self.timeout = options.ack_timeout

    async def _admin(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run an idempotent JetStream API call, again while it times out or
        JetStream is temporarily unavailable (503), for ``_ADMIN_BUDGET``
        ack_timeouts.

        Raises:
            Timeout: still no answer when the time is up.
            TransportError: still unavailable then (or another failure).
            (and what else :func:`map_exceptions` raises)
        """
        deadline = time.monotonic() + _ADMIN_BUDGET * self.timeout
        pause = _ADMIN_PAUSE
        while True:
            try:
                with map_exceptions(what, timeout=self.timeout):
                    return await call()
            except Timeout:
                if time.monotonic() >= deadline:
                    raise
            except TransportError as exc:
                unavailable = isinstance(exc.__cause__, nats.js.errors.ServiceUnavailableError)
                if not unavailable or time.monotonic() + pause >= deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(2 * pause, 1.0)

    async def ensure(self) -> None:
        """Create the stream if it is missing and check that it fits.

        Raises:
            TransportError: JetStream is unreachable or failed.
            Timeout: JetStream did not answer (within three ``ack_timeout``).
            ConfigurationError: the stream exists but is not a work-queue
                stream on pigeon's subjects, or has fewer than ``replicas``;
                or JetStream cannot place ``replicas`` copies (not a
                cluster, too few servers).
        """
        try:
            info = await self._admin(f"create stream {self.name}", self._info_or_create)
        except ConfigurationError as exc:
            if self.replicas == 1:
                raise
            error = ConfigurationError(
                f"{exc} (replicas={self.replicas} needs a JetStream cluster of at least "
                f"{self.replicas} servers)"
            )
            raise error from exc.__cause__
        config = info.config
        wrong = config.retention != RetentionPolicy.WORK_QUEUE
        if wrong or self.subjects[0] not in (config.subjects or []):
            raise ConfigurationError(
                f"stream {self.name} exists but is not a work-queue stream on {self.subjects[0]}"
            )
        # A stream with fewer copies than asked would survive less than the
        # caller counts on. pigeon changes no stream it did not just create,
        # so the caller decides: update the stream, or ask for fewer.
        have = config.num_replicas or 1
        if have < self.replicas:
            raise ConfigurationError(
                f"stream {self.name} exists with {have} replica(s), fewer than "
                f"replicas={self.replicas}: update the stream (nats stream edit "
                f"{self.name} --replicas {self.replicas}) or ask for fewer"
            )

    async def _info_or_create(self) -> StreamInfo:
        try:
            return await self.js.stream_info(self.name)
        except nats.js.errors.NotFoundError:
            pass
        config = StreamConfig(
            name=self.name,
            subjects=self.subjects,
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=self.duplicate_window,
            num_replicas=self.replicas,
        )
        try:
            return await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as refused:
            # A server of a cluster that has just come back may call a stream
            # missing before it has caught up; creating it is then refused
            # (with a server down, for want of peers). Look once more before
            # reporting the refusal.
            try:
                return await self.js.stream_info(self.name)
            except nats.js.errors.NotFoundError:
                raise refused from None

    async def ensure_consumer(self, queue: str, subject: str, options: ConsumeOptions) -> None:
        """Create the queue's durable consumer, or update its ack wait and limits.

        Workers of one queue share the consumer, so the last one to start
        sets its ``lease_ttl``. In a replicated stream the consumer has as
        many replicas as the stream.

        Raises:
            TransportError: JetStream is unreachable or failed.
            Timeout: JetStream did not answer (within three ``ack_timeout``).
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
        await self._admin(
            f"create the consumer of {queue!r}", lambda: self.js.add_consumer(self.name, config)
        )
