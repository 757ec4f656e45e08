"""The admin backend of a brokerless node (tcp://, ipc://, inproc://): the
node's admin services, asked over a pigeon connection (``pigeon.info``,
``pigeon.dead``, ``pigeon.replay``, ``pigeon.purge``; the ACL's admin grant
on a node with keys)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .. import connection
from ..errors import NoPigeonNode, NoResponders, TransportError
from ..transports import masked
from ..transports.zmq.admin import DEAD_SERVICE, INFO_SERVICE, PURGE_SERVICE, REPLAY_SERVICE
from .base import Admin, QueueRow, ServiceRow, queue_row, service_row
from .errors import Unreachable
from .reach import refused_at

DEAD_SUFFIX = ".dead"


class NodeAdmin(Admin):
    """Admin of one pigeon node; see ``pigeon.admin.open_admin``."""

    transport = "zmq"

    def __init__(self, url: str, conn: connection.Connection, timeout: float) -> None:
        self.url = url
        self._conn = conn
        self._timeout = timeout
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, timeout: float = 3.0, **options: Any) -> NodeAdmin:
        """Connect, and make sure a node answers (``Unreachable`` if not)."""
        why = refused_at(url)
        if why:
            raise Unreachable(masked(url), why)
        # The node is expected to be there: wait for its handshake as long as
        # the whole timeout, not just the default grace.
        conn = connection.connect(url, connect_grace=timeout, **options)
        await conn.start()
        admin = cls(url, conn, timeout)
        try:
            await _until_linked(conn, url, timeout)
            await admin.ping()
        except BaseException:
            await conn.close(timeout=1.0)
            raise
        return admin

    async def _ask(self, service: str, payload: Any) -> Any:
        try:
            reply = await self._conn.request(service, payload, timeout=self._timeout)
        except (NoResponders, TransportError) as exc:
            # A call no node answered because none is up at the URL is
            # Unreachable, not NoResponders.
            links = self._conn.stats().get("links", {})
            if isinstance(exc, NoPigeonNode) or not any(link.get("up") for link in links.values()):
                raise Unreachable(masked(self.url), str(exc)) from exc
            raise
        return reply.decode()

    async def _all_pages(self) -> dict[str, Any]:
        """pigeon.info answers a page of queues at a time; gather them all."""
        info: dict[str, Any] = {}
        queues: dict[str, Any] = {}
        after: str | None = ""
        while after is not None:
            info = await self._ask(INFO_SERVICE, {"after": after})
            queues.update(info["queues"])
            after = info.get("next")
        info["queues"] = queues
        return info

    async def overview(self) -> dict[str, Any]:
        """The node's own stats with every queue (what ``pigeon queues
        --json`` prints)."""
        info = await self._all_pages()
        info["queues"] = _with_dead_counts(info["queues"])
        return {**_described(self.url, info), **info}

    async def info(self) -> dict[str, Any]:
        info = await self._ask(INFO_SERVICE, {"limit": 1})
        info.pop("queues", None)
        info.pop("next", None)
        return {**info, **_described(self.url, info)}

    async def queues(self) -> dict[str, QueueRow]:
        return _with_dead_counts((await self._all_pages())["queues"])

    async def services(self) -> dict[str, ServiceRow]:
        info = await self._ask(INFO_SERVICE, {"limit": 1})
        return node_services(info)

    async def peers(self) -> list[dict[str, Any]]:
        info = await self._ask(INFO_SERVICE, {"limit": 1})
        return node_peers(info)

    async def dead(self, queue: str, limit: int = 20) -> list[dict[str, Any]]:
        letters: list[dict[str, Any]] = await self._ask(
            DEAD_SERVICE, {"queue": queue, "limit": limit}
        )
        return letters

    async def replay(self, queue: str, limit: int | None = None) -> int:
        answer = await self._ask(REPLAY_SERVICE, {"queue": queue, "limit": limit})
        return int(answer["replayed"])

    async def purge(self, queue: str, *, dead: bool = False) -> int:
        answer = await self._ask(PURGE_SERVICE, {"queue": queue, "dead": dead})
        return int(answer["purged"])

    async def ping(self) -> float:
        started = time.perf_counter()
        await self._ask(INFO_SERVICE, {"limit": 1})
        return time.perf_counter() - started

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._conn.close(timeout=1.0)


async def _until_linked(conn: connection.Connection, url: str, timeout: float) -> None:
    """Wait until a link is up; raise ``Unreachable`` as soon as every link's
    connect was refused (rather than after the whole timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        links = conn.stats().get("links", {}).values()
        if any(link.get("up") for link in links):
            return
        if links and all(link.get("connect_failures", 0) > 0 for link in links):
            raise Unreachable(masked(url), "connection refused")
        await asyncio.sleep(0.02)


def _described(url: str, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "transport": "zmq",
        "address": masked(url),
        "node": info.get("node"),
        "version": info.get("version"),
        # What it serves, and what it relays to servers connected to it.
        "services": sorted(
            set(info.get("services", [])) | set((info.get("relay") or {}).get("services", []))
        ),
        "peers": node_peers(info),
    }


def _with_dead_counts(queues: dict[str, Any]) -> dict[str, QueueRow]:
    """Each queue's row, with ``dead``: the ready count of its ``.dead`` queue."""
    rows = {name: queue_row(counts) for name, counts in queues.items()}
    for name, row in rows.items():
        letters = queues.get(name + DEAD_SUFFIX)
        row["dead"] = letters.get("ready", 0) if letters else 0
    return rows


def node_services(info: dict[str, Any]) -> dict[str, ServiceRow]:
    """The services a node serves or relays, with what it counted of each
    (``service_stats`` in its info; a node that does not count them gives
    None)."""
    counted: dict[str, Any] = info.get("service_stats") or {}
    relay = info.get("relay") or {}
    names = set(info.get("services", [])) | set(relay.get("services", [])) | set(counted)
    return {name: service_row(counted.get(name, {})) for name in sorted(names)}


def node_peers(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The nodes a node links to, and the servers connected to it."""
    peers = [
        {
            "address": address,
            "node": link.get("node"),
            "up": link.get("up"),
            "services": link.get("services", []),
        }
        for address, link in sorted((info.get("links") or {}).items())
    ]
    peers += info.get("relayed_servers") or []
    return peers
