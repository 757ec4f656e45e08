"""The blocking twin of :mod:`pigeon.admin`: ``open_admin`` and ``Admin``
with the same methods and arguments, each run on the shared loop thread of
:mod:`pigeon.sync` (re-exported there as ``pigeon.sync.open_admin`` and
``pigeon.sync.Admin``).

    >>> import pigeon.sync
    >>> with pigeon.sync.open_admin("memory://doc") as admin:   # doctest: +SKIP
    ...     for name, row in admin.queues().items():
    ...         print(name, row["ready"], row["in_flight"], row["dead"])

Since ``memory://`` connections made with :func:`pigeon.sync.connect` live on
that same loop thread, a sync admin on ``memory://NAME`` sees the broker they
share in this process.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from . import admin as _admin
from . import sync as _sync
from .admin.base import QueueRow, ServiceRow

__all__ = ["Admin", "open_admin"]

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    # pigeon.sync imports this module before it defines _runner: looked up per call.
    return _sync._runner.run(coro)


class Admin:
    """Blocking twin of :class:`pigeon.admin.Admin`: the same methods with the
    same arguments; each call runs on the shared loop thread and blocks until
    it is done, raising what the async one raises (``Unreachable``,
    ``Forbidden``, ``Timeout``, ``NotSupported``). Use it with ``with`` or
    call :meth:`close`."""

    def __init__(self, admin: _admin.Admin) -> None:
        self._admin = admin
        self.transport: str = admin.transport
        self.url: str = admin.url
        _sync._runner._admins.add(admin)  # closed at exit if still open

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def info(self) -> dict[str, Any]:
        """See :meth:`pigeon.admin.Admin.info`."""
        return _run(self._admin.info())

    def overview(self) -> dict[str, Any]:
        """See :meth:`pigeon.admin.Admin.overview`."""
        return _run(self._admin.overview())

    def queues(self) -> dict[str, QueueRow]:
        """See :meth:`pigeon.admin.Admin.queues`."""
        return _run(self._admin.queues())

    def services(self) -> dict[str, ServiceRow]:
        """See :meth:`pigeon.admin.Admin.services`."""
        return _run(self._admin.services())

    def peers(self) -> list[dict[str, Any]]:
        """See :meth:`pigeon.admin.Admin.peers`."""
        return _run(self._admin.peers())

    def dead(self, queue: str, limit: int = 20) -> list[dict[str, Any]]:
        """See :meth:`pigeon.admin.Admin.dead`."""
        return _run(self._admin.dead(queue, limit))

    def replay(self, queue: str, limit: int | None = None) -> int:
        """See :meth:`pigeon.admin.Admin.replay`."""
        return _run(self._admin.replay(queue, limit))

    def purge(self, queue: str, *, dead: bool = False) -> int:
        """See :meth:`pigeon.admin.Admin.purge`."""
        return _run(self._admin.purge(queue, dead=dead))

    def ping(self) -> float:
        """See :meth:`pigeon.admin.Admin.ping`."""
        return _run(self._admin.ping())

    def close(self) -> None:
        """Close the session (idempotent); one left open is closed at exit."""
        _sync._runner._admins.discard(self._admin)
        _run(self._admin.close())


def open_admin(url: str, *, timeout: float = 3.0, **connect_options: Any) -> Admin:
    """Blocking twin of :func:`pigeon.admin.open_admin` (same arguments, same
    errors): the admin session is opened on the shared loop thread."""
    return Admin(_run(_admin.open_admin(url, timeout=timeout, **connect_options)))
