"""Discovery for a ZeroMQ node: looks at its source (a file of addresses, or
DNS) and opens and closes links as the set of nodes changes.

What to do with what was read is the core's (:mod:`pigeon._core.discovery`,
whose rules are cited below); this adapter stats and reads the file, asks
the resolver, and keeps one task that looks when the schedule says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

from ..._core.discovery import (
    Change,
    Roster,
    Schedule,
    Source,
    SourceKind,
    parse_node_file,
    tcp_url,
)
from ...errors import ConfigurationError, TransportError

if TYPE_CHECKING:
    import dns.asyncresolver

log = logging.getLogger("pigeon")

DNS_LIFETIME = 5.0  # seconds one SRV query may take, retries included
Found = tuple[list[str], list[str]]  # addresses, and parts of the read that failed


class LinkTable(Protocol):
    """What discovery changes on its node."""

    def add_link(self, address: str) -> None:
        """Open a link to ``address``.

        Raises:
            TransportError: the address cannot be connected to.
        """

    def remove_link(self, address: str) -> None:
        """Close the link to ``address`` as a lost peer's is closed."""


class Discovery:
    """Keeps a node's links in step with its discovery source.

    Raises:
        ConfigurationError: an ``srv://`` source without dnspython installed.
    """

    def __init__(
        self,
        source: Source,
        links: LinkTable,
        *,
        fixed: list[str],
        nameserver: tuple[str, int] | None = None,
    ) -> None:
        self.source = source
        self._links = links
        self.roster = Roster(fixed)
        self.schedule = Schedule(source.interval)
        self._srv = _SrvResolver(nameserver) if source.kind is SourceKind.SRV else None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._failing = False
        self._closed = False
        self.links_added = 0
        self.links_removed = 0

    async def start(self) -> None:
        """Look once (the node starts with what the source lists now), then
        keep looking. A first look that fails is counted, not raised: the
        node starts with no discovered link and finds them when it can."""
        await self.look()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            delay = self.schedule.wait(time.monotonic())
            if delay > 0:
                self._wakeup = waiter = loop.create_future()
                timer = loop.call_later(delay, _settle, waiter)
                try:
                    await waiter
                finally:
                    timer.cancel()
                    self._wakeup = None
                continue  # woken early (Rule 5) or due: ask the schedule again
            await self.look()

    def link_lost(self) -> None:
        """A link went down: look again soon (Rule 5)."""
        self.schedule.hurry(time.monotonic())
        if self._wakeup is not None:
            _settle(self._wakeup)

    async def look(self) -> None:
        """Read the source once and apply what changed."""
        self.schedule.looked(time.monotonic())
        errors = self.roster.errors
        found: Found | None = None
        try:
            found = await self._read()
        except Exception as exc:
            # Rule 1, and the one place a source's failure is translated:
            # whatever a read raised (the file system, the resolver, a name
            # that will not encode), the node goes on with the last good set.
            self.roster.failed(f"{self.source}: {exc}")
        else:
            if found is not None and not self._closed:  # (None: a file that has not changed)
                self._apply(self.roster.found(*found))
        if self.roster.errors == errors:
            self._failing = self._failing and found is None
        elif not self._failing:  # logged once per failing spell, not once a look
            self._failing = True
            log.warning(
                "discovery: %s (keeping the %d nodes found before)",
                self.roster.last_error,
                len(self.roster.current),
            )

    def _apply(self, change: Change) -> None:
        # Added first, so the sends of a removed node have somewhere to go.
        for address in change.added:
            try:
                self._links.add_link(address)
            except TransportError as exc:
                self.roster.forget(address, str(exc))
                continue
            self.links_added += 1
        for address in change.removed:
            self._links.remove_link(address)
            self.links_removed += 1

    async def _read(self) -> Found | None:
        source = self.source
        if source.kind is SourceKind.FILE:
            return await asyncio.to_thread(self._read_file, source.target)
        if source.kind is SourceKind.DNS:
            return await _resolve(source.target, source.port), []
        assert self._srv is not None
        return await _resolve_srv(self._srv, source.target)

    def _read_file(self, path: str) -> Found | None:
        # (In a thread: a stat or read on a network file system may hang.)
        try:
            info = os.stat(path)
        except OSError as exc:
            signature: object = ("missing", exc.errno)
            if not self.roster.changed(signature):
                return None  # still missing: counted once (Rule 4)
            raise
        signature = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if not self.roster.changed(signature):
            return None
        with open(path, encoding="utf-8") as file:
            return parse_node_file(file.read()), []

    async def close(self) -> None:
        """Stop looking; no link is added or removed after this returns."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # A resolver may swallow the cancel (asyncio.wait_for can, on
            # Python 3.11); the flag then ends the loop after its current
            # look, which a query's lifetime bounds.
            await asyncio.wait([task], timeout=DNS_LIFETIME + 1.0)
            if task.done() and not task.cancelled():
                task.exception()  # (retrieved: the loop ends only by the flag)

    def stats(self) -> dict[str, Any]:
        roster = self.roster
        return {
            "source": str(self.source),
            "nodes": list(roster.current),
            "reads": roster.reads,
            "last_error": roster.last_error,
        }


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _resolve(host: str, port: int) -> list[str]:
    """Every address of ``host`` (A and AAAA, through the system resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [tcp_url(str(info[4][0]), port) for info in infos]


class _SrvResolver:
    """Asks DNS for SRV records: the system's resolver, or ``nameserver``."""

    def __init__(self, nameserver: tuple[str, int] | None) -> None:
        try:
            import dns.asyncresolver  # noqa: F401 (here only to say what is missing at once)
        except ImportError:
            raise ConfigurationError(
                "srv:// discovery needs dnspython: pip install 'pigeon-queues[dns]'"
            ) from None
        self._nameserver = nameserver
        self._made: dns.asyncresolver.Resolver | None = None

    def resolver(self) -> dns.asyncresolver.Resolver:
        # Made at the first look, not in the constructor: a system without
        # a resolver configuration then fails a read (counted), not start().
        if self._made is None:
            import dns.asyncresolver

            nameserver = self._nameserver
            resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
            if nameserver is not None:
                resolver.nameservers = [nameserver[0]]
                resolver.port = nameserver[1]
            resolver.lifetime = DNS_LIFETIME
            self._made = resolver
        return self._made


async def _resolve_srv(srv: _SrvResolver, name: str) -> Found:
    """Every target of ``name``'s SRV records at its port. A target's
    addresses come from the answer's additional section when the server put
    them there, else from the system resolver; one that does not resolve
    is a problem of the read, not its failure (Rule 6). Priority and weight
    are not used: a client links to every node and balances by load."""
    import dns.rdatatype

    answer = await srv.resolver().resolve(name, "SRV")
    known: dict[str, list[str]] = {}
    response: Any = answer.response
    for rrset in response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            owner = rrset.name.to_text(omit_final_dot=True).lower()
            known.setdefault(owner, []).extend(rr.address for rr in rrset)
    addresses: list[str] = []
    problems: list[str] = []
    for record in answer:
        target = record.target.to_text(omit_final_dot=True).lower()
        if not target or target == ".":
            continue  # "no such service here" (RFC 2782)
        ips = known.get(target)
        if ips:
            addresses.extend(tcp_url(ip, record.port) for ip in ips)
            continue
        try:
            addresses.extend(await _resolve(target, record.port))
        except OSError as exc:
            problems.append(f"{name}: target {target}: {exc}")
    return addresses, problems
