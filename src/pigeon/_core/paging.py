"""Where a durable queue's backlog lives: a window in memory, the rest on disk.

A durable host stores every message before it confirms it, so a body held
in memory is only a copy. A queue keeps at most a window of ready messages
in memory; past it, committed messages stay on disk only, and the host
reads them back, a window at a time and in the order they were stored, as
consumers take what is in memory. RAM then holds the window and the
deliveries in flight, whatever the backlog: the backlog is bounded by disk.

Rule 1: a message the store has just committed joins the in-memory window
when the queue has nothing on disk and the window has room; otherwise it
stays on disk and the queue is marked as paging.
Rule 2: a paging queue reads its next rows (after the position of the last
row it read) when its window is half empty and it has consumers, one read
at a time.
Rule 3: a row read back whose id the queue holds, or forgot just now (acked
or dead-lettered while the read was on its way), is skipped: it is in
memory already, or done with.
Rule 4: a read that reached the end of the queue's rows ends paging: what
commits later joins the window again (Rule 1).
Rule 5: rows that were in the store at a restart come back marked
redelivered, since they may have been handed out before it.

Reads are ordered with writes by the store's writer (see
:mod:`pigeon.store.committer`), and answered after them: that is what makes
Rules 3 and 4 exact.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_WINDOW = 1024  # ready messages a durable queue holds in memory
PAGE_WINDOW_BYTES = 8 << 20  # bytes of them (a window of large messages is shorter)


@dataclass(frozen=True, slots=True)
class Window:
    """How much of a durable queue's backlog stays in memory."""

    messages: int = PAGE_WINDOW
    bytes: int = PAGE_WINDOW_BYTES

    def __post_init__(self) -> None:
        if self.messages < 1 or self.bytes < 1:
            raise ValueError(f"a page window holds at least 1 message and 1 byte, not {self}")


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One read of a queue's backlog: rows after ``after``, within the bounds."""

    after: int
    limit: int
    max_bytes: int


@dataclass(slots=True)
class DiskBacklog:
    """A queue's part of the backlog that is on disk only.

    Attributes:
        paging: the store holds ready messages of the queue that are not in
            memory.
        count: about how many (for depth figures; exact after a restart).
        bytes: about how many bytes they hold (counted as they are written;
            after a restart, as they are read back).
        cursor: the store position of the last row read back.
        seen_through: rows at or before this position were in the store at
            a restart (Rule 5).
        reading: a read is on its way (Rule 2: one at a time).
    """

    paging: bool = False
    count: int = 0
    bytes: int = 0
    cursor: int = 0
    seen_through: int = 0
    reading: bool = False

    def restored(self, count: int, through: int) -> None:
        """A restart found ``count`` live rows; every row up to ``through`` was there."""
        self.paging = count > 0
        self.count = count
        self.bytes = 0
        self.cursor = 0
        self.seen_through = through

    def spill(self, size: int) -> None:
        """A committed message of ``size`` bytes stays on disk (Rule 1)."""
        self.paging = True
        self.count += 1
        self.bytes += size

    def request(self, ready: int, held_bytes: int, window: Window) -> PageRequest | None:
        """The read to make now (Rule 2), or None; marks it on its way."""
        if not self.paging or self.reading or ready > window.messages // 2:
            return None
        self.reading = True
        return PageRequest(
            self.cursor,
            window.messages - ready,
            # In-flight bodies count too, but never shrink a read below half
            # a window: consumers with credit would get one row per read.
            max(window.bytes // 2, window.bytes - held_bytes),
        )

    def loaded(self, last_position: int, taken: int, size: int, more: bool) -> None:
        """A read came back: ``taken`` rows of ``size`` bytes joined the
        window (Rules 3, 4)."""
        self.reading = False
        self.cursor = max(self.cursor, last_position)
        self.count = max(0, self.count - taken)
        self.bytes = max(0, self.bytes - size)
        if not more:
            self.paging = False
            self.count = 0
            self.bytes = 0

    def failed(self) -> None:
        """A read failed; the next dispatch pass tries again."""
        self.reading = False
