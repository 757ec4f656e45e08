"""``pigeon dashboard``: a small web page that shows a pigeon system live
(queues with sparklines, services, peers) and lets an admin replay or purge
dead letters. Its numbers come from ``pigeon.admin``; its assets are
bundled in the package (``static/``), with nothing loaded from elsewhere.

>>> async def main():                                      # doctest: +SKIP
...     async with open_dashboard("tcp://127.0.0.1:5555", port=8642) as board:
...         print(board.address, board.token)
...         await asyncio.Event().wait()
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..admin import Admin, open_admin
from .guard import is_loopback
from .history import QueueHistory
from .routes import Routes
from .server import DashboardServer
from .watcher import Watcher

__all__ = ["Dashboard", "open_dashboard"]


@dataclass
class Dashboard:
    """A running dashboard: where it serves, its token, its parts."""

    address: str  # http://HOST:PORT/
    token: str
    watcher: Watcher
    server: DashboardServer


@contextlib.asynccontextmanager
async def open_dashboard(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    interval: float = 1.0,
    timeout: float = 3.0,
    points: int = 120,
    **connect_options: Any,
) -> AsyncIterator[Dashboard]:
    """Serve the dashboard of the system at ``url`` until the block ends.

    Args:
        url: the system to watch, as ``pigeon.admin.open_admin`` takes it.
        host: the address to serve on (loopback by default).
        port: the port (0: any free one; see ``Dashboard.address``).
        token: what replay and purge requests must carry (None: a new
            random one).
        interval: seconds between two readings of the system.
        timeout: seconds to wait for the system to answer.
        points: readings each queue's sparkline keeps.
        connect_options: ``key``, ``server_key``, ... for ``open_admin``.

    Raises:
        TransportError: ``host:port`` cannot be bound.
    """

    async def admin() -> Admin:
        return await open_admin(url, timeout=timeout, **connect_options)

    watcher = Watcher(
        admin, url=url, interval=interval, timeout=timeout, history=QueueHistory(points=points)
    )
    token = token or secrets.token_urlsafe(18)
    loopback = is_loopback(host)
    routes = Routes(watcher, token=token, port=port, loopback=loopback)
    server = DashboardServer(routes)
    routes.port = bound = await server.start(host, port)
    shown = f"[{host}]" if ":" in host else host
    polling = asyncio.create_task(watcher.run())
    try:
        yield Dashboard(f"http://{shown}:{bound}/", token, watcher, server)
    finally:
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await server.close()
