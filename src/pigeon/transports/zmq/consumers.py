"""Consuming queues that remote nodes host: registering with every link,
handing deliveries to the worker's sink, and the hosts' verdicts.

A host answers each Consume with a Verdict. ``consume`` waits for the
verdicts of the links that are up (a host that is down answers when it
comes back, and a refusal then is counted), so a key the host does not let
consume a queue gets ``Forbidden`` from ``consume`` itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..._core import frames
from ..._core.acl import Verb
from ...errors import ConfigurationError, DeliveryError, Forbidden, ReplayTrimmed
from ...message import Message
from ..base import Delivery, DeliverySink
from .config import Waiters
from .link import Link


class RemoteSubscription:
    def __init__(self, consumers: RemoteConsumers, queue: str) -> None:
        self._consumers = consumers
        self.queue = queue

    async def drain(self) -> None:
        self._consumers.drain(self.queue)

    async def cancel(self) -> None:
        self._consumers.cancel(self.queue)


class RemoteConsumers:
    """This node's consumers of queues hosted elsewhere."""

    def __init__(self, links: list[Link], *, verdict_timeout: float) -> None:
        self.links = links  # the node's own list
        self.verdict_timeout = verdict_timeout
        self._sinks: dict[str, DeliverySink] = {}
        self._consumes: dict[str, frames.Consume] = {}  # for links added later
        self._draining: set[str] = set()
        self._verdicts: dict[tuple[Link, str], bool] = {}
        self._reasons: dict[tuple[Link, str], str] = {}
        self._trimmed: dict[tuple[Link, str], tuple[str, int]] = {}
        # Subscriptions: told why when their host cuts them off later.
        self._cut: dict[str, Callable[[str], None]] = {}
        self._changed = Waiters()
        self.forbidden = 0
        self.last_forbidden = ""
        self.granted: dict[tuple[str, str], tuple[int, float]] = {}

    async def consume(
        self,
        queue: str,
        sink: DeliverySink,
        consume: frames.Consume,
        *,
        subscribe: frames.Subscribe | None = None,
        link: Link | None = None,
        on_cut: Callable[[str], None] | None = None,
    ) -> RemoteSubscription:
        """Register with every link (or only ``link``, sending ``subscribe``
        first: a topic subscription lives on one host); wait for the
        verdicts of those up.

        Raises:
            Forbidden: a host refused this node's key the queue.
            ReplayTrimmed: a subscription's replay is no longer retained.
            ConfigurationError: a host refused a subscription (says why).
        """
        self._sinks[queue] = sink
        if link is None:
            self._consumes[queue] = consume
        if on_cut is not None:
            self._cut[queue] = on_cut
        targets = self.links if link is None else [link]
        asking = [t for t in targets if t.up]
        for target in targets:
            self._verdicts.pop((target, queue), None)
            self._trimmed.pop((target, queue), None)
            if subscribe is not None:
                target.subscriptions[queue] = subscribe
                target.send_frame(subscribe)
            target.consumers[queue] = consume
            target.send_frame(consume)

        def answered() -> bool:
            return all((link, queue) in self._verdicts or not link.up for link in asking)

        await self._changed.wait_until(answered, time.monotonic() + self.verdict_timeout)
        refused = [link for link in asking if self._verdicts.get((link, queue)) is False]
        if refused:
            address = refused[0].address
            reason = self._reasons.get((refused[0], queue))
            trimmed = self._trimmed.get((refused[0], queue))
            self.cancel(queue)
            if trimmed is not None and subscribe is not None:
                raise ReplayTrimmed(trimmed[0], subscribe.from_seq or 0, trimmed[1])
            if reason and subscribe is not None:
                why = f"the node at {address} refused the subscription: {reason}"
                raise ConfigurationError(why)
            if reason:
                raise DeliveryError(f"the node at {address} refused to deliver {queue!r}: {reason}")
            raise Forbidden(Verb.CONSUME.value, queue, address=address)
        return RemoteSubscription(self, queue)

    def drain(self, queue: str) -> None:
        """Hosts send nothing more of ``queue``; what they sent already still
        reaches the sink, and its leases stay ours to settle."""
        self._draining.add(queue)
        self._consumes.pop(queue, None)
        for link in self.links:
            # Popped: a link that comes back does not ask for the queue again.
            if link.consumers.pop(queue, None) is not None:
                link.send_frame(frames.Cancel(queue, keep_leases=True))

    def cancel(self, queue: str) -> None:
        self._sinks.pop(queue, None)
        self._consumes.pop(queue, None)
        self._cut.pop(queue, None)
        draining = queue in self._draining
        self._draining.discard(queue)
        for link in self.links:
            # What hosts answered for it goes too: subscriptions' queue
            # names are new each time, and would pile up here.
            self._verdicts.pop((link, queue), None)
            self._reasons.pop((link, queue), None)
            self._trimmed.pop((link, queue), None)
            self.granted.pop((link.address, queue), None)
            link.subscriptions.pop(queue, None)
            if link.consumers.pop(queue, None) is not None or draining:
                # Settles still batched for this turn leave first: a host
                # that read the Cancel first would take those leases back
                # and then find the acks stale (the message would run again).
                link.flush()
                link.send_frame(frames.Cancel(queue))

    def cancel_all(self) -> None:
        for queue in list(self._sinks):
            self.cancel(queue)

    def delivered(self, link: Link, queue: str, messages: list[Message]) -> None:
        sink = self._sinks.get(queue)
        if sink is None:
            # Cancelled meanwhile: hand them straight back.
            settle = link.pending_settle(queue)
            settle.nacks.extend((m.id, 0.0, "") for m in messages)
            return
        settler = link.settler
        sink([Delivery(queue, m, settler) for m in messages])

    def attach(self, link: Link) -> None:
        """A link added after ``consume`` (discovery found its node): it asks
        its host for every queue consumed here once the host says Hello."""
        link.consumers.update(self._consumes)

    def detach(self, link: Link) -> None:
        """A link removed for good: forget what its host answered."""
        for key in [key for key in self._verdicts if key[0] is link]:
            self._verdicts.pop(key, None)
            self._reasons.pop(key, None)
        for grant in [grant for grant in self.granted if grant[0] == link.address]:
            del self.granted[grant]

    def link_changed(self) -> None:
        """A link went down: a verdict it owed is not coming."""
        self._changed.wake()

    def verdict(self, link: Link, verdict: frames.Verdict) -> None:
        if verdict.verb != Verb.CONSUME.value:
            return
        name, allowed = verdict.name, verdict.allowed
        known = (link, name) in self._verdicts
        self._verdicts[(link, name)] = allowed
        self._reasons[(link, name)] = verdict.reason
        if verdict.first_retained:
            self._trimmed[(link, name)] = (verdict.trimmed_topic, verdict.first_retained)
        if allowed:
            # What the host granted may be less than we asked (its policy).
            self.granted[(link.address, name)] = (verdict.prefetch, verdict.lease_ttl)
        else:
            # Refused now, or a grant taken away by a reload: the host has
            # already put back what we held; stop asking it again.
            self.forbidden += 1
            self.last_forbidden = f"{link.address}: consume {name!r}"
            link.consumers.pop(name, None)
            link.subscriptions.pop(name, None)
            cut = self._cut.pop(name, None) if known else None
            if cut is not None:  # a subscription its host ended after granting it
                cut(verdict.reason or "its host ended the subscription")
        self._changed.wake()
