"""Polls a pigeon system through ``pigeon.admin`` on an interval and keeps
the last snapshot and each queue's history for the page.

The system may be down when the dashboard starts, go away and come back:
every failure (nothing reachable, forbidden, a late answer) is kept as the
snapshot's ``error`` with the last numbers known, counted, and the session
is opened again on the next poll. The page always has something to show.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..admin import Admin
from ..errors import PigeonError, TransportError
from .history import QueueHistory

OpenAdmin = Callable[[], Awaitable[Admin]]


def describe_error(exc: BaseException) -> dict[str, str]:
    """An error as the page shows it: its kind and its message."""
    if isinstance(exc, TimeoutError) and not isinstance(exc, PigeonError):
        return {"kind": "Timeout", "message": "no answer in time"}
    return {"kind": type(exc).__name__, "message": str(exc) or type(exc).__name__}


class Watcher:
    """The admin session, the latest snapshot and the history behind it."""

    def __init__(
        self,
        open_admin: OpenAdmin,
        *,
        url: str,
        interval: float = 1.0,
        timeout: float = 3.0,
        history: QueueHistory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._open_admin = open_admin
        self.url = url
        self.interval = interval
        self.timeout = timeout
        self.history = history or QueueHistory()
        self._clock = clock
        self._admin: Admin | None = None
        self._opening = asyncio.Lock()
        self.counts = {"polls": 0, "poll_errors": 0, "opens": 0, "open_errors": 0}
        self.error: dict[str, str] | None = None
        self.failure: BaseException | None = None  # what error describes
        self.read_once = asyncio.Event()  # set when a first poll has ended
        self._wake = asyncio.Event()
        self.updated: float | None = None  # when the numbers shown were read
        self._data: dict[str, Any] = {"info": {}, "queues": {}, "services": {}, "peers": []}

    async def admin(self) -> Admin:
        """The open session; opened now if it is not.

        Raises:
            PigeonError: it cannot be opened (``Unreachable``, ...).
        """
        async with self._opening:
            if self._admin is None:
                self.counts["opens"] += 1
                try:
                    self._admin = await asyncio.wait_for(self._open_admin(), self.timeout * 2)
                except BaseException:
                    self.counts["open_errors"] += 1
                    raise
            return self._admin

    async def drop(self) -> None:
        """Close the session: the next call opens a new one (after the
        system went away, a fresh session finds it again)."""
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except PigeonError:
                pass  # it is going away: nothing to tell anyone

    async def poll(self) -> None:
        """Read everything once; a failure becomes ``error``, never a raise."""
        try:
            await self._poll()
        finally:
            self.read_once.set()

    async def _poll(self) -> None:
        self.counts["polls"] += 1
        try:
            admin = await self.admin()
            async with asyncio.timeout(self.timeout * 2):
                info = await admin.info()
                queues = await admin.queues()
                services = await admin.services()
                peers = await admin.peers()
        except (PigeonError, TimeoutError) as exc:
            self.counts["poll_errors"] += 1
            self.error, self.failure = describe_error(exc), exc
            if isinstance(exc, TransportError | TimeoutError):
                await self.drop()
            return
        now = self._clock()
        rates = self.history.add(now, queues)
        self._data = {
            "info": info,
            "queues": {name: {**row, **rates[name]} for name, row in queues.items()},
            "services": services,
            "peers": peers,
        }
        self.error = self.failure = None
        self.updated = now

    def refresh(self) -> None:
        """Poll now rather than at the end of the interval (after an action,
        so the page shows its result). Polls stay one after another."""
        self._wake.set()

    async def run(self) -> None:
        """Poll every ``interval`` seconds (or when refreshed) until cancelled."""
        try:
            while True:
                await self.poll()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.interval)
                except TimeoutError:
                    pass  # the interval passed: the usual case
                self._wake.clear()
        finally:
            await self.drop()

    def snapshot(self) -> dict[str, Any]:
        """What the page shows: the last numbers read, when, and the error
        of the last poll (None when it succeeded)."""
        return {
            "url": self.url,
            "now": self._clock(),
            "updated": self.updated,
            "interval": self.interval,
            "error": self.error,
            **self._data,
            "history": self.history.series(),
            "untracked": self.history.untracked,
            "watcher": dict(self.counts),
        }
