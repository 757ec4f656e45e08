"""The queues a host holds, with the node's bounds on them: how many queues,
and how many bytes of bodies (the memory alarm)."""

from __future__ import annotations

import time
from collections.abc import Callable

from .._core.ledger import QueueLedger
from .._core.limits import QueuePolicy
from .._core.paging import Window
from ..errors import Backpressure

DEFAULT_MAX_MEMORY = 128 << 20  # bytes of bodies before the memory alarm
FAIR_SHARE = 8  # past max_memory, a queue holding less than 1/8 of it still takes sends
MEMORY_RECOUNT = 0.01  # seconds between sums of the bytes held
IDLE_SCAN_INTERVAL = 0.5  # seconds between scans for idle queues at the queue cap


class QueueTable:
    """Named ledgers, made on first use, within ``max_queues`` and ``max_memory``.

    ``queues`` is a plain dict that callers may read; only this table adds
    to it or forgets from it.
    """

    def __init__(
        self,
        *,
        policy_for: Callable[[str], QueuePolicy],
        max_queues: int = 10_000,
        max_memory: int | None = DEFAULT_MAX_MEMORY,
        window: Window | None = None,
        initial_credit: int | None = None,
    ) -> None:
        self.policy_for = policy_for
        self.max_queues = max_queues
        self.max_memory = max_memory
        self.window = window or Window()
        self.initial_credit = initial_credit
        self.queues: dict[str, QueueLedger] = {}
        self.forgotten = 0
        self.refused = 0
        self.memory_refused = 0
        self._bytes_held = 0
        self._bytes_counted_at = -1.0
        self._next_idle_scan = 0.0

    def ledger(self, queue: str, *, over_cap: bool = False) -> QueueLedger:
        """The ledger of ``queue``, made if new.

        Raises:
            Backpressure: the node holds ``max_queues`` queues and none is
                idle (``over_cap`` lets a dead-letter queue past the cap).
        """
        ledger = self.queues.get(queue)
        if ledger is None:
            if len(self.queues) >= self.max_queues and not over_cap:
                now = time.monotonic()
                if now >= self._next_idle_scan:
                    # One scan per interval: a flood of new names must not
                    # cost a scan each.
                    self._next_idle_scan = now + IDLE_SCAN_INTERVAL
                    self._forget_idle()
                if len(self.queues) >= self.max_queues:
                    self.refused += 1
                    raise Backpressure("queues on this node", self.max_queues)
            rules = self.policy_for(queue)
            ledger = self.queues[queue] = QueueLedger(
                queue,
                lease_ttl=rules.lease_ttl,
                max_attempts=rules.max_attempts or None,
                max_delay=rules.max_delay,
                window=self.window,
                initial_credit=self.initial_credit,
            )
        return ledger

    def new_ledger(self, queue: str) -> QueueLedger | None:
        """Like ``ledger``, but None where that would raise (refused like a full queue)."""
        try:
            return self.ledger(queue)
        except Backpressure:
            return None

    def forget(self, queue: str) -> bool:
        """Forget ``queue`` now if it is idle (a subscription that ended)."""
        ledger = self.queues.get(queue)
        if ledger is None or not ledger.is_idle():
            return False
        del self.queues[queue]
        return True

    def _forget_idle(self) -> None:
        # At the cap (a flood of new names, most likely), idle queues go;
        # a durable store still de-duplicates resends by its tombstones.
        idle = [name for name, ledger in self.queues.items() if ledger.is_idle()]
        for name in idle:
            del self.queues[name]
        self.forgotten += len(idle)

    def bytes_held(self) -> int:
        """Bodies held by every queue (ready, delayed, in flight)."""
        return sum(ledger.bytes_held for ledger in self.queues.values())

    def added(self, size: int) -> None:
        """``size`` bytes of bodies were just taken in."""
        self._bytes_held += size

    def memory_full(self, ledger: QueueLedger) -> bool:
        """The node's memory alarm, for a send to ``ledger``'s queue.

        Rule 1: below ``max_memory`` of bodies held, every send is taken.
        Rule 2: past it, a send is refused (producers see Backpressure)
        if its queue holds at least 1/FAIR_SHARE of ``max_memory``: the
        queues that filled the node wait for their consumers, while queues
        that are kept drained go on.
        Rule 3: past twice ``max_memory``, every send is refused.

        Puts add to the running figure at once (``added``); the true sum,
        which also sees acks, is taken again at most every MEMORY_RECOUNT
        seconds.
        """
        return self.memory_room(ledger, [0]) == 0

    def below_limit(self, size: int) -> bool:
        """Whether ``size`` more bytes of bodies keep the node below
        ``max_memory`` (Rule 1): sends adding up to them are all taken,
        whatever queue they go to."""
        limit = self.max_memory
        if limit is None:
            return True
        now = time.monotonic()
        if now - self._bytes_counted_at >= MEMORY_RECOUNT:
            self._bytes_counted_at = now
            self._bytes_held = self.bytes_held()
        return self._bytes_held + size < limit

    def memory_room(self, ledger: QueueLedger, sizes: list[int]) -> int:
        """How many of a batch of sends (their ``sizes``, in order) to
        ``ledger``'s queue the memory alarm takes: ``memory_full`` applied
        to each in turn, as if the ones before it were taken. Counts each
        refused one in ``memory_refused``."""
        limit = self.max_memory
        if limit is None:
            return len(sizes)
        now = time.monotonic()
        if now - self._bytes_counted_at >= MEMORY_RECOUNT:
            self._bytes_counted_at = now
            self._bytes_held = self.bytes_held()
        held, mine = self._bytes_held, ledger.bytes_held
        taken = 0
        for size in sizes:
            if not (held < limit or (held < 2 * limit and mine < limit // FAIR_SHARE)):
                break
            held += size
            mine += size
            taken += 1
        self.memory_refused += len(sizes) - taken
        return taken
