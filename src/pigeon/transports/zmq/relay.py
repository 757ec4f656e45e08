"""Servers behind a node (the zguide's Majordomo): a node relays a request
for a service it does not serve itself to a peer connected to it that does.

Servers then need no open port and no known address: they connect to the
node, say which services they offer in their Hello, and come and go behind
its one address. The node advertises the services it relays in the Hello
it sends its own peers, and a call to one of them goes, through the node,
to the least loaded server offering it, with the same failover, deadlines
and request ids as a direct call: the relay is a :class:`Caller` whose
servers are the node's peers. A node relays one hop: the Hello it sends to
nodes it connects to lists only what it serves itself, so relays never
form a loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..._core import frames
from ..._core.service_stats import ServiceCounts
from ...message import Message
from ..local import LocalServices
from .admin import ADMIN_SERVICES
from .caller import Caller
from .config import Waiters

Send = Callable[[bytes, frames.Frame], None]


class RoutedPeer:
    """A peer connected to the node's ROUTER, seen as a server to call."""

    __slots__ = ("identity", "services", "_send")

    up = True  # a lost peer is dropped from the table, never kept down
    auth_error = None
    pending_handshake = False  # it spoke first: it said Hello
    grace_ends = 0.0
    not_pigeon = None  # it spoke pigeon to reach the table

    def __init__(self, identity: bytes, send: Send) -> None:
        self.identity = identity
        self.services: frozenset[str] = frozenset()
        self._send = send

    def offers(self, service: str) -> bool:
        return service in self.services

    def send_frame(self, frame: frames.Frame) -> bool:
        self._send(self.identity, frame)
        return True


class Relay:
    """The peers of one node's ROUTER that serve, and the calls relayed to them."""

    def __init__(self, send: Send, *, attempt_timeout: float | None) -> None:
        self._send = send
        self.peers: dict[bytes, RoutedPeer] = {}
        self._targets: list[Any] = []  # the caller's view of them: its servers
        self.caller = Caller(
            self._targets, LocalServices(), attempt_timeout=attempt_timeout, heard=Waiters()
        )
        self.refused_services = 0  # advertised, but the peer may not serve them (ACL)
        self.counts = ServiceCounts()  # calls relayed, by service

    def services(self) -> set[str]:
        """Every service some peer offers here."""
        offered: set[str] = set()
        for peer in self.peers.values():
            offered |= peer.services
        return offered

    def serves(self, service: str) -> bool:
        return any(peer.offers(service) for peer in self.peers.values())

    def advertised(
        self, identity: bytes, services: list[str], allowed: Callable[[str], bool]
    ) -> bool:
        """A peer's Hello listed ``services``; keep those it may serve (not
        the node's own admin services). True if what the node relays changed."""
        offered = frozenset(s for s in services if s not in ADMIN_SERVICES and allowed(s))
        self.refused_services += len(set(services) - offered - ADMIN_SERVICES)
        peer = self.peers.get(identity)
        if peer is None:
            if not offered:
                return False
            peer = self.peers[identity] = RoutedPeer(identity, self._send)
            self._targets.append(peer)
        if peer.services == offered:
            return False
        before = self.services()
        # A service withdrawn (a server draining) gets no new calls here; the
        # calls it runs stay with it, and its answers still count.
        peer.services = offered
        return self.services() != before

    def forget(self, identity: bytes) -> bool:
        """The peer is gone: calls on it move to other servers. True if
        what the node relays changed."""
        peer = self.peers.pop(identity, None)
        if peer is None:
            return False
        self._targets.remove(peer)
        self.caller.server_lost(peer)
        return bool(peer.services)

    async def call(self, service: str, message: Message, *, timeout: float) -> Message:
        """Relay a call (see :meth:`Caller.request`)."""
        started, failed = time.perf_counter(), True
        try:
            reply = await self.caller.request(service, message, timeout=timeout)
            failed = False
            return reply
        finally:
            self.counts.record(service, time.perf_counter() - started, failed=failed)

    def servers(self, service: str) -> int:
        """How many peers here serve ``service``."""
        return sum(1 for peer in self.peers.values() if peer.offers(service))

    def on_reply(self, identity: bytes, reply: frames.Reply) -> None:
        """A server answered: only the one the call went to counts."""
        self.caller.on_reply(reply, source=self.peers.get(identity, identity))

    def stats(self) -> dict[str, object]:
        correlator = self.caller.correlator
        return {
            "services": sorted(self.services()),
            "servers": sum(1 for peer in self.peers.values() if peer.services),
            "in_flight": len(correlator),
            "retries": correlator.retries,
            # Answers from a server the call did not (or no longer) go to.
            "late_replies": correlator.late_replies,
            "refused_services": self.refused_services,
        }

    def close(self) -> None:
        self.caller.close()
