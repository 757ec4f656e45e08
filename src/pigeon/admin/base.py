"""The admin interface every backend implements, and the shapes it answers.

Rule 1: every count a backend cannot know is ``None`` (never a made-up 0).
Rule 2: ``queues()`` answers at least ``QUEUE_FIELDS`` for every queue,
``services()`` at least ``SERVICE_FIELDS`` for every service.
Rule 3: dead letters of queue ``Q`` are counted in ``Q``'s ``dead`` field;
where the system keeps them as a queue of their own (``Q.dead``), that queue
is listed too, as the system shows it.
"""

from __future__ import annotations

import abc
from typing import Any

# The fields of one queue in ``queues()``.
QUEUE_FIELDS = (
    "ready",  # waiting to be delivered
    "delayed",  # waiting for a delay (a nack with delay, a scheduled send)
    "in_flight",  # delivered, not yet settled
    "consumers",
    "received",  # counters since the queue's host started
    "acked",
    "redelivered",
    "dead_lettered",
    "dead",  # dead letters held now (in Q.dead)
)
# The fields of one service in ``services()``.
SERVICE_FIELDS = ("servers", "calls", "errors", "p50_ms", "p99_ms")

QueueRow = dict[str, Any]  # field -> int | None (a node adds its own fields)
ServiceRow = dict[str, Any]  # field -> int | float | None


def queue_row(counts: dict[str, Any]) -> QueueRow:
    """``counts`` with every one of ``QUEUE_FIELDS``, unknown ones None
    (fields beyond them are kept: a node counts more)."""
    return {**{name: None for name in QUEUE_FIELDS}, **counts}


def service_row(counts: dict[str, Any]) -> ServiceRow:
    """``counts`` with every one of ``SERVICE_FIELDS``, unknown ones None."""
    return {**{name: None for name in SERVICE_FIELDS}, **counts}


class Admin(abc.ABC):
    """An open admin session on one pigeon system; see ``open_admin``.

    Use it as an async context manager (``async with await open_admin(url)
    as admin``) or call ``close()``. Every method may raise ``Unreachable``
    (nothing answers any more), ``Forbidden`` (the system's ACL refuses),
    ``Timeout`` (no answer in time) or ``NotSupported``.
    """

    transport: str  # "zmq", "memory", "nats" or "amqp"
    url: str

    async def __aenter__(self) -> Admin:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abc.abstractmethod
    async def info(self) -> dict[str, Any]:
        """What the system is: ``transport``, ``address``, ``node`` (id, or
        None), ``version`` (the broker's, or None), ``services`` (names) and
        ``peers`` (see ``peers()``); a node adds every stat it counts."""

    async def overview(self) -> dict[str, Any]:
        """``info()`` with ``queues``: what ``pigeon queues --json`` prints."""
        return {**(await self.info()), "queues": await self.queues()}

    @abc.abstractmethod
    async def queues(self) -> dict[str, QueueRow]:
        """Every queue by name, each with ``QUEUE_FIELDS`` (Rule 1 to 3)."""

    @abc.abstractmethod
    async def services(self) -> dict[str, ServiceRow]:
        """Every service by name, each with ``SERVICE_FIELDS``: servers
        offering it, calls and errors counted, latency percentiles (ms)."""

    @abc.abstractmethod
    async def peers(self) -> list[dict[str, Any]]:
        """Who the system is connected to: each ``{"address", "node", "up",
        "services"}`` (unknown ones None)."""

    @abc.abstractmethod
    async def dead(self, queue: str, limit: int = 20) -> list[dict[str, Any]]:
        """The oldest ``limit`` dead letters of ``queue``, left in place:
        each ``{"id", "reason", "attempts", "content_type", "body"}`` (body:
        its first 200 bytes as text)."""

    @abc.abstractmethod
    async def replay(self, queue: str, limit: int | None = None) -> int:
        """Move up to ``limit`` (None: all) dead letters of ``queue`` back
        into it; returns how many moved."""

    @abc.abstractmethod
    async def purge(self, queue: str, *, dead: bool = False) -> int:
        """Remove the ready messages of ``queue`` (its dead letters with
        ``dead=True``); returns how many were removed. Messages in flight
        stay with their consumers."""

    @abc.abstractmethod
    async def ping(self) -> float:
        """One round trip to the system; returns its seconds."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the session (idempotent)."""
