"""Request-reply decisions: which server gets a call, when a call is retried
elsewhere or fails, and the server's reply cache.

Client rules:
Rule 1: a call goes to the live server with the fewest calls outstanding;
servers not yet tried for this call come first (``policy.least_loaded``).
Rule 2: a call is retried, with the same request id, on another server when
its attempt times out, its server is lost, or its server answers that it
does not serve the service (it withdrew it: a server draining; that server
is not asked again for this call); it fails with ``Timeout`` at its
deadline, never later, and with ``NoResponders`` when no server is left.
Rule 3: a reply for a call that is no longer pending is dropped and counted.

Server rules:
Rule 4: a request id seen before is never run again: while it runs, the
retry waits for the same result; once done, the cached reply is sent again.
Rule 5: a request's deadline is absolute (wall clock). Clocks may disagree,
so the receiver trusts the earlier of that deadline and "received + the
seconds the caller had left when it sent". A request whose deadline has
passed is never started: its caller has given up.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from .policy import least_loaded

# The content type of a gathered answer (see ``headers.SCATTER``).
REPLIES_TYPE = "application/vnd.pigeon.replies+msgpack"


@dataclass(slots=True)
class PendingCall:
    request_id: str
    service: str
    deadline: float
    attempt_timeout: float
    server: Hashable | None = None
    attempt_deadline: float = 0.0
    tried: list[Hashable] = field(default_factory=list)


class Correlator:
    """The client side: pending calls and their servers."""

    def __init__(self) -> None:
        self._calls: dict[str, PendingCall] = {}
        self._outstanding: dict[Hashable, int] = {}
        self._rotation = itertools.count()
        self.late_replies = 0
        self.retries = 0

    def start(
        self, request_id: str, service: str, now: float, *, timeout: float, attempt_timeout: float
    ) -> PendingCall:
        call = PendingCall(request_id, service, now + timeout, attempt_timeout)
        self._calls[request_id] = call
        return call

    def choose(
        self, call: PendingCall, candidates: Iterable[Hashable], now: float
    ) -> Hashable | None:
        """Pick the server for the call's next attempt (Rule 1), or None.

        Ties rotate: each choice starts looking one candidate further on, so
        equally loaded servers take turns.
        """
        servers = list(candidates)
        chosen = least_loaded(
            servers, lambda s: self._outstanding.get(s, 0), next(self._rotation), call.tried
        )
        if chosen is not None:
            self._assign(call, chosen, now)
        return chosen

    def _assign(self, call: PendingCall, server: Hashable, now: float) -> None:
        self._unassign(call)
        if call.tried:
            self.retries += 1
        call.server = server
        call.tried.append(server)
        call.attempt_deadline = min(call.deadline, now + call.attempt_timeout)
        self._outstanding[server] = self._outstanding.get(server, 0) + 1

    def _unassign(self, call: PendingCall) -> None:
        if call.server is not None:
            left = self._outstanding.get(call.server, 1) - 1
            if left > 0:
                self._outstanding[call.server] = left
            else:
                self._outstanding.pop(call.server, None)
            call.server = None

    def finish(self, request_id: str) -> PendingCall | None:
        """A reply arrived (or the caller gave up): the call is no longer pending."""
        call = self._calls.pop(request_id, None)
        if call is None:
            self.late_replies += 1
            return None
        self._unassign(call)
        return call

    def discard(self, request_id: str) -> None:
        """The caller is done with a call (answered, failed or gave up)."""
        call = self._calls.pop(request_id, None)
        if call is not None:
            self._unassign(call)

    def due(self, now: float) -> tuple[list[PendingCall], list[PendingCall]]:
        """Return ``(expired, to_retry)``: calls past their deadline, and calls
        whose attempt timed out and that should move to another server."""
        expired: list[PendingCall] = []
        retry: list[PendingCall] = []
        for call in self._calls.values():
            if now >= call.deadline:
                expired.append(call)
            elif call.server is not None and now >= call.attempt_deadline:
                retry.append(call)
        for call in expired:
            self.finish(call.request_id)
        return expired, retry

    def server_lost(self, server: Hashable) -> list[PendingCall]:
        """Calls whose server died: they must be retried elsewhere (Rule 2)."""
        lost = [call for call in self._calls.values() if call.server == server]
        for call in lost:
            self._unassign(call)
        self._outstanding.pop(server, None)
        return lost

    def sent_to(self, request_id: str, server: Hashable) -> bool:
        """True if ``request_id``'s current attempt went to ``server``."""
        call = self._calls.get(request_id)
        return call is not None and call.server == server

    def next_wakeup(self) -> float | None:
        times = [
            min(c.deadline, c.attempt_deadline) if c.server is not None else c.deadline
            for c in self._calls.values()
        ]
        return min(times) if times else None

    def load(self, server: Hashable) -> int:
        return self._outstanding.get(server, 0)

    def __len__(self) -> int:
        return len(self._calls)


def seconds_left(sent_left: float, deadline: float | None, now: float) -> float:
    """Rule 5: seconds a request has left, received at wall-clock ``now``.

    ``sent_left`` is what the caller had left when it sent; ``deadline`` is
    its absolute deadline (None from a peer that sends none).
    """
    if deadline is None:
        return sent_left
    return min(sent_left, deadline - now)


class CacheState(Enum):
    NEW = "new"
    RUNNING = "running"
    DONE = "done"


class ReplyCache:
    """The server side of Rule 4: remembers recent request ids and replies.

    Bounded by count and by the bytes of the replies it holds: past either,
    the oldest finished entries go first (a request still running is kept,
    so its retry waits rather than runs twice).
    """

    def __init__(
        self, *, max_entries: int = 10_000, ttl: float = 300.0, max_bytes: int = 32 << 20
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._entries: OrderedDict[str, tuple[float, object | None]] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self.bytes = 0
        self.hits = 0

    def begin(self, request_id: str, now: float) -> tuple[CacheState, object | None]:
        """Note a request; says whether to run it, wait for it, or resend a reply."""
        # Only what must go now is pruned here; the aged rest goes in
        # finish, which every run ends in (a prune per begin cost as much
        # as the rest of begin).
        if len(self._entries) >= self.max_entries:
            self._prune(now)
        entry = self._entries.get(request_id)
        if entry is not None and entry[1] is not None and now - entry[0] > self.ttl:
            self.forget(request_id)  # an answer too old to give again
            entry = None
        if entry is None:
            self._entries[request_id] = (now, None)
            return CacheState.NEW, None
        self.hits += 1
        reply = entry[1]
        return (CacheState.RUNNING, None) if reply is None else (CacheState.DONE, reply)

    def forget(self, request_id: str) -> None:
        """A request noted by ``begin`` was not run after all (refused)."""
        if self._entries.pop(request_id, None) is not None:
            self.bytes -= self._sizes.pop(request_id, 0)

    def finish(self, request_id: str, reply: object, now: float, size: int = 0) -> None:
        self._entries[request_id] = (now, reply)
        self._entries.move_to_end(request_id)
        self.bytes += size - self._sizes.get(request_id, 0)
        self._sizes[request_id] = size
        self._prune(now)

    def _prune(self, now: float) -> None:
        entries = self._entries
        while entries:
            oldest_id, (stamp, reply) = next(iter(entries.items()))
            too_many = len(entries) > self.max_entries or self.bytes > self.max_bytes
            if not too_many and now - stamp <= self.ttl:
                break
            if reply is None and not too_many:
                break  # still running: keep it so a retry does not run it twice
            entries.popitem(last=False)
            self.bytes -= self._sizes.pop(oldest_id, 0)
