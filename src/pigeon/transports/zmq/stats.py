"""What a ZeroMQ node counts (``stats()``, and ``pigeon.info`` for others)."""

from __future__ import annotations

from typing import Any, Protocol

from ..._core.liveness import OwnStalls
from ..._core.service_stats import ServiceTally
from ..host import QueueHost
from ..local import LocalServices
from ..topic_host import TopicHost
from .caller import Caller
from .config import NodeConfig
from .consumers import RemoteConsumers
from .discovery import Discovery
from .link import Link
from .router import RouterSide
from .security import Security
from .sender import Sender
from .zap import Domain


class CountedNode(Protocol):
    """The parts of a node its stats read."""

    config: NodeConfig
    router: RouterSide | None
    services: LocalServices
    discovery: Discovery | None
    sender: Sender
    links: list[Link]
    caller: Caller
    consumers: RemoteConsumers
    zap: Domain | None
    security: Security
    host: QueueHost
    topics: TopicHost
    bound: list[str]
    restored: int
    store_path: str | None
    last_remote_error: str
    own_stalls: OwnStalls


def node_stats(node: CountedNode) -> dict[str, Any]:
    """Everything a node counts (``pigeon.info`` serves this)."""
    router, sender, links = node.router, node.sender, node.links
    guard = router.guard if router is not None else None
    discovery = node.discovery
    return {
        "node": node.config.node_id,
        # What this node serves (its Hello says the same to every peer).
        "services": sorted(node.services.names()),
        "sent": sender.sent,
        "unconfirmed": sum(len(link.outbox) for link in links),
        "unconfirmed_at_close": sender.unconfirmed_at_close,
        "withdrawn": sender.withdrawn,
        "request_retries": node.caller.correlator.retries,
        "late_replies": node.caller.correlator.late_replies,
        "last_remote_error": node.last_remote_error,
        # Settles of deliveries whose lease was gone: this node's (its host
        # restarted, or said so) and its peers' to this node's queues.
        "stale_settles": sum(link.stale_settles for link in links)
        + (router.stale_settles if router else 0),
        # Of these, settles naming a queue this node does not hold.
        "unknown_queue_settles": node.host.unknown_queue_settles,
        "protocol_errors": sum(link.protocol_errors for link in links)
        + (router.protocol_errors if router else 0),
        "malformed_frames": sum(link.pump.malformed for link in links)
        + (router.pump.malformed if router and router.pump else 0),
        "peers_lost": router.peers_lost if router else 0,
        # Heartbeat checks that ran over two intervals late (this node's loop
        # was held up), and the seconds of silence excused to peers for them.
        "loop_stalls": node.own_stalls.stalls,
        "stall_seconds_excused": round(node.own_stalls.excused, 3),
        # Peers that do not speak pigeon (a REQ, a PUSH, garbage; a REP or
        # PUSH this node connected to), each counted and logged once.
        "foreign_peers": (router.foreign.count if router else 0)
        + sum(link.foreign_peers for link in links),
        "last_foreign_peer": _last_foreign(router, links),
        # Times a link to a node this one connects to went down.
        "links_lost": sum(link.times_lost for link in links),
        # Frames a peer's full pipe (it stopped reading) would not take; that
        # peer is given up.
        "send_failures": router.pump.send_failures if router and router.pump else 0,
        "expired_requests": (router.responder.expired_requests if router else 0)
        + node.caller.services.expired_requests,
        # Calls relayed to servers connected to this node (see relay.py).
        "relay": router.relay.stats() if router else None,
        # Calls, errors and latency of each service served or relayed here.
        "service_stats": _service_stats(node),
        # Servers connected to this node whose services it relays (the first
        # MAX_LISTED of them; "servers" in "relay" counts them all).
        "relayed_servers": _relayed_servers(node),
        "reply_cache_hits": router.responder.replies.hits if router else 0,
        # Sends and requests refused because their peer was over its budget
        # of work held for it (see pigeon._core.budget).
        "peer_busy": (
            router.storing.refused
            + router.responder.budget.refused
            + router.responder.repeats_refused
        )
        if router
        else 0,
        "links": {link.address: _link_stats(link) for link in links},
        "links_added": discovery.links_added if discovery else 0,
        "links_removed": discovery.links_removed if discovery else 0,
        "discovery_errors": discovery.roster.errors if discovery else 0,
        "discovery": discovery.stats() if discovery else None,
        # Unconfirmed sends of removed links: resent through another link,
        # or failed with no other link to go to.
        "sends_moved": sender.moved,
        "sends_failed_on_removal": sender.failed_on_removal,
        "bound": list(node.bound),
        "secure": node.security.server is not None or node.security.client is not None,
        "auth_failures": (node.zap.refused if node.zap else 0)
        + sum(link.auth_failures for link in links),
        "forbidden": (guard.forbidden if guard else 0) + node.consumers.forbidden,
        "last_forbidden": guard.last_forbidden if guard else node.consumers.last_forbidden,
        "identity_conflicts": guard.identity_conflicts if guard else 0,
        "granted": {
            f"{queue}@{address}": {"prefetch": prefetch, "lease_ttl": lease}
            for (address, queue), (prefetch, lease) in node.consumers.granted.items()
        },
        "durable": node.store_path is not None,
        "restored": node.restored,
        "store_errors": node.host.store_errors,
        "backlog_errors": node.host.backlog_errors,
        "store": node.host.store.stats() if node.host.store is not None else None,
        "outbox": sender.outbox.stats() if sender.outbox is not None else None,
        "queues_forgotten": node.host.table.forgotten,
        "purged": node.host.purged,
        "queues_refused": node.host.table.refused,
        "bytes_held": node.host.bytes_held(),
        "memory_refused": node.host.table.memory_refused,
        "queue_policies": node.host.policies.overrides(),
        "queues": node.host.stats(),
        "topics": node.topics.stats(),
    }


def _service_stats(node: CountedNode) -> dict[str, dict[str, Any]]:
    """Per service: servers (local handlers, or peers it is relayed to) and
    what was counted of its calls here."""
    relay = node.router.relay if node.router is not None else None
    none_yet = ServiceTally().snapshot()
    out: dict[str, dict[str, Any]] = {}
    for name, counts in node.services.stats().items():
        out[name] = {"servers": node.services.servers(name), **counts}
    if relay is not None:
        for name, counts in relay.counts.snapshot().items():
            out.setdefault(name, {"servers": relay.servers(name), **counts})
        for name in relay.services():
            out.setdefault(name, {"servers": relay.servers(name), **none_yet})
    for name in node.services.names():
        out.setdefault(name, {"servers": node.services.servers(name), **none_yet})
    return out


MAX_LISTED = 100


def _relayed_servers(node: CountedNode) -> list[dict[str, Any]]:
    if node.router is None:
        return []
    peers = [p for p in node.router.relay.peers.values() if p.services][:MAX_LISTED]
    return [
        {
            "address": None,  # a peer that connected here: its address is its own
            "node": peer.identity.decode("utf-8", "replace"),
            "up": True,
            "services": sorted(peer.services),
        }
        for peer in peers
    ]


def _link_stats(link: Link) -> dict[str, Any]:
    """A link, and what the node at its end said in its last Hello."""
    remote = link.remote
    return {
        "up": link.up,
        # Connect attempts refused before the first handshake (nothing listens).
        "connect_failures": link.connect_failures,
        "node": remote.node if remote is not None else None,
        "services": sorted(remote.services) if remote is not None else [],
        "hosts_queues": remote.hosts_queues if remote is not None else False,
    }


def _last_foreign(router: RouterSide | None, links: list[Link]) -> str:
    """The last foreign peer seen: where, and what it looked like."""
    for link in links:
        if link.foreign is not None:
            return f"{link.address}: {link.foreign.value}"
    return router.foreign.last if router is not None else ""
