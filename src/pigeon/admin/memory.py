"""The admin backend of ``memory://NAME``: the in-process broker of *this*
process. Another process's memory:// broker cannot be seen: from a separate
``pigeon`` command, memory://NAME is an empty broker of its own."""

from __future__ import annotations

import time
from typing import Any

from .._core.ledger import dead_letter_queue
from ..transports import memory
from ..transports.zmq.admin import dead_letter_row
from .base import Admin, QueueRow, ServiceRow, service_row
from .node import _with_dead_counts


class MemoryAdmin(Admin):
    """Admin of an in-process broker; see ``pigeon.admin.open_admin``."""

    transport = "memory"

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = url.partition("://")[2] or "default"

    @classmethod
    async def open(cls, url: str, *, timeout: float = 3.0, **options: Any) -> MemoryAdmin:
        """Always reachable: the broker is in this process (maybe empty)."""
        return cls(url)

    def _hub(self) -> Any:
        # A broker exists while some connection to its name is open.
        return memory._hubs.get(self.name)

    async def info(self) -> dict[str, Any]:
        hub = self._hub()
        return {
            "transport": "memory",
            "address": self.url,
            "node": None,
            "version": None,
            "services": hub.services.names() if hub is not None else [],
            "peers": [],
            "connections": hub.users if hub is not None else 0,
        }

    async def queues(self) -> dict[str, QueueRow]:
        hub = self._hub()
        if hub is None:
            return {}
        return _with_dead_counts(hub.host.stats())

    async def services(self) -> dict[str, ServiceRow]:
        hub = self._hub()
        if hub is None:
            return {}
        counted = hub.services.stats()
        return {
            name: service_row({"servers": hub.services.servers(name), **counted.get(name, {})})
            for name in hub.services.names()
        }

    async def peers(self) -> list[dict[str, Any]]:
        return []

    async def dead(self, queue: str, limit: int = 20) -> list[dict[str, Any]]:
        hub = self._hub()
        ledger = hub.host.queues.get(dead_letter_queue(queue)) if hub is not None else None
        if ledger is None:
            return []
        return [dead_letter_row(letter) for letter in ledger.peek_ready(limit)]

    async def replay(self, queue: str, limit: int | None = None) -> int:
        hub = self._hub()
        return hub.host.replay_dead(queue, limit) if hub is not None else 0

    async def purge(self, queue: str, *, dead: bool = False) -> int:
        hub = self._hub()
        if hub is None:
            return 0
        return int(hub.host.purge(dead_letter_queue(queue) if dead else queue))

    async def ping(self) -> float:
        started = time.perf_counter()
        self._hub()
        return time.perf_counter() - started

    async def close(self) -> None:
        """Nothing to close: the broker belongs to its connections."""
