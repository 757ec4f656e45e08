"""The admin backend of ``nats://`` (and ``tls://``): the JetStream API.

Queues are subjects ``<prefix>.q.<queue>`` of the work-queue stream
(``PIGEON_Q``), each read by the durable consumer ``q_<queue>``
(docs/transports-nats.md). What each field comes from:

- ``ready``: the consumer's ``num_pending`` (not yet delivered), or the
  subject's message count where no consumer reads the queue yet;
- ``in_flight``: the consumer's ``num_ack_pending``;
- ``consumers``: the consumer's ``num_waiting`` (pull requests waiting: the
  workers idle right now; a busy worker has none out);
- ``dead``: the message count of the subject ``<prefix>.q.<queue>.dead``;
- ``delayed``, ``received``, ``acked``, ``redelivered``, ``dead_lettered``:
  None, JetStream keeps no such count per subject.

``replay`` publishes each dead letter again into its queue (confirmed by the
pub ack) and only then deletes it from the stream; ``purge`` is a stream purge
filtered by the queue's subject, which also removes messages delivered and
not yet acked (their acks then fail). Services are core NATS subscriptions,
of which the server tells a client nothing: ``services()`` is empty.
"""

from __future__ import annotations

import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import RawStreamMsg

from .._core import policy
from .._core.ledger import dead_letter_queue
from ..errors import AuthenticationError, PigeonError, Timeout, TransportError
from ..transports.nats import client, envelope
from ..transports.nats.errors import map_exceptions
from ..transports.nats.options import parse as parse_options
from ..transports.nats.security import redact
from ..transports.zmq.admin import dead_letter_row
from .base import Admin, QueueRow, ServiceRow
from .errors import Unreachable
from .rows import PullCounts, jetstream_rows

MAX_SCAN = 10_000  # dead letters looked at per call at most


class NatsAdmin(Admin):
    """Admin of pigeon's queues on a NATS server; see the module docstring."""

    transport = "nats"

    def __init__(self, url: str, nc: Client, stream: str, prefix: str, timeout: float) -> None:
        self.url = url
        self._nc = nc
        self._js = nc.jetstream(timeout=timeout)
        self._jsm = nc.jsm(timeout=timeout)
        self._stream = stream
        self._prefix = prefix
        self._timeout = timeout

    @classmethod
    async def open(cls, url: str, *, timeout: float = 3.0, **options: Any) -> NatsAdmin:
        """Connect (``Unreachable`` if no server answers)."""
        address = redact(url)
        servers, opts = parse_options(url, {"connect_timeout": timeout, **options})
        try:
            nc = await client.connect(
                address,
                servers,
                opts,
                tls=opts.ssl_context(),
                on_error=_ignore,
                on_disconnected=_nothing,
                on_reconnected=_nothing,
            )
        except AuthenticationError:
            raise  # something answered, and refused us
        except (Timeout, TransportError) as exc:
            raise Unreachable(address, str(exc)) from exc
        return cls(address, nc, opts.stream, opts.prefix, timeout)

    def _queue_subject(self, queue: str) -> str:
        return envelope.subject(self._prefix, "q", queue)

    async def _subjects(self) -> dict[str, int]:
        """Message counts of the stream's queue subjects (empty: no stream)."""
        try:
            with map_exceptions(f"stream info of {self._stream}", timeout=self._timeout):
                info = await self._jsm.stream_info(
                    self._stream, subjects_filter=f"{self._prefix}.q.>"
                )
        except TransportError as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return {}
            raise
        return dict(info.state.subjects or {})

    async def _consumers(self) -> list[Any]:
        try:
            with map_exceptions(f"consumers of {self._stream}", timeout=self._timeout):
                return list(await self._jsm.consumers_info(self._stream))
        except TransportError as exc:
            if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                return []
            raise

    async def info(self) -> dict[str, Any]:
        version = self._nc.connected_server_version
        return {
            "transport": "nats",
            "address": self.url,
            "node": None,
            "version": str(version) if version is not None else None,
            "services": [],
            "peers": await self.peers(),
            "stream": self._stream,
            "prefix": self._prefix,
        }

    async def queues(self) -> dict[str, QueueRow]:
        pulls = {
            consumer.config.filter_subject: PullCounts(
                consumer.num_pending or 0,
                consumer.num_ack_pending or 0,
                consumer.num_waiting or 0,
            )
            for consumer in await self._consumers()
            if consumer.config.filter_subject
        }
        return jetstream_rows(self._prefix, await self._subjects(), pulls)

    async def services(self) -> dict[str, ServiceRow]:
        return {}

    async def peers(self) -> list[dict[str, Any]]:
        connected = self._nc.connected_url
        peers: list[dict[str, Any]] = [
            {
                "address": connected.netloc if connected else None,
                "node": None,
                "up": self._nc.is_connected,
                "services": [],
            }
        ]
        for server in self._nc.discovered_servers:
            peers.append({"address": server.netloc, "node": None, "up": None, "services": []})
        return peers

    async def _letters(self, queue: str, limit: int) -> list[RawStreamMsg]:
        """The oldest ``limit`` dead letters of ``queue``, left in place."""
        subject = self._queue_subject(dead_letter_queue(queue))
        letters: list[RawStreamMsg] = []
        seq = 1
        while len(letters) < min(limit, MAX_SCAN):
            try:
                with map_exceptions(f"dead letters of {queue!r}", timeout=self._timeout):
                    msg = await self._jsm.get_msg(self._stream, seq, subject=subject, next=True)
            except TransportError as exc:
                if isinstance(exc.__cause__, nats.js.errors.NotFoundError):
                    break  # no more (or no stream)
                raise
            letters.append(msg)
            seq = (msg.seq or seq) + 1
        return letters

    async def dead(self, queue: str, limit: int = 20) -> list[dict[str, Any]]:
        return [_letter_row(msg) for msg in await self._letters(queue, limit)]

    async def replay(self, queue: str, limit: int | None = None) -> int:
        subject = self._queue_subject(queue)
        moved = 0
        for msg in await self._letters(queue, limit or MAX_SCAN):
            message = _message(msg)
            message.headers = policy.without_dead_letter_headers(message.headers)
            headers = envelope.to_headers(message, check=False)
            headers[envelope.REDELIVERED] = "1"  # seen before, as on the other transports
            # Its own dedupe id: the original's may still be in the duplicate
            # window, and a replay asked again for the same letter is one.
            headers[envelope.MSG_ID] = f"{queue}:{message.id}:replay:{msg.seq}"
            with map_exceptions(f"replay into {queue!r}", timeout=self._timeout):
                await self._js.publish(
                    subject, msg.data or b"", headers=headers, stream=self._stream
                )
                # Confirmed stored in the queue: only now may the letter go.
                await self._jsm.delete_msg(self._stream, msg.seq or 0)
            moved += 1
        return moved

    async def purge(self, queue: str, *, dead: bool = False) -> int:
        subject = self._queue_subject(dead_letter_queue(queue) if dead else queue)
        before = (await self._subjects()).get(subject, 0)
        with map_exceptions(f"purge {subject}", timeout=self._timeout):
            await self._jsm.purge_stream(self._stream, subject=subject)
        return before

    async def ping(self) -> float:
        started = time.perf_counter()
        with map_exceptions("ping", timeout=self._timeout):
            await self._nc.flush(timeout=max(1, round(self._timeout)))
        return time.perf_counter() - started

    async def close(self) -> None:
        if not self._nc.is_closed:
            try:
                await self._nc.close()
            except (nats.errors.Error, OSError, PigeonError):
                pass  # closing a connection already lost


async def _ignore(exc: Exception) -> None:
    """Errors while connecting come back from connect(); later ones end calls."""


async def _nothing() -> None:
    return None


def _message(msg: RawStreamMsg) -> Any:
    return envelope.from_headers(
        msg.data or b"", msg.headers, fallback_id=f"{msg.stream}:{msg.seq}"
    )


def _letter_row(msg: RawStreamMsg) -> dict[str, Any]:
    return dead_letter_row(_message(msg)) | {"seq": msg.seq}
